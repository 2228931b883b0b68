"""What the stage CLIs share, and nothing the core library needs: the typed params schema and
its checks (params, param_checks), MLflow tracking behind a small interface (tracking), the
project's paths, file IO and the stage CLI wrapper (common), the training run of train_teacher and
distill (training), the result-file formats and tables (results, tables) and the ONNX export
(onnx_export). ``stages/`` holds only the stage scripts; ``pipeline/`` and ``benchmarks/`` import
from here, never a stage module."""
