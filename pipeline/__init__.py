"""Orchestration over the DVC stages: the Prefect flow, the MLflow registry, ONNX serving."""
