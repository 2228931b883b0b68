"""The deployed student: an ONNX file run by onnxruntime, found by path or registry URI.

Input is float32 NCHW RGB in [0, 1] (normalisation is inside the graph); the class names and
the method travel in the file's metadata_props (written by the export_onnx stage).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

INPUT_NAME, OUTPUT_NAME = "image", "logits"
IMAGE_SIZE = 32


def resolve_model(source: str) -> Path:
    """A local ``.onnx`` path, or an MLflow URI (``models:/robustkd-student@champion``,
    ``runs:/...``) downloaded from the tracking server / SQLite store."""
    if "://" not in source and ":/" not in source:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        return path
    import mlflow

    from services.tracking import MLFLOW_ENV, keep_environment, tracking_uri

    uri = tracking_uri()
    store = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if store is not None and not store.is_file():   # MLflow would make an empty store here
        raise FileNotFoundError(f"{source}: no MLflow store at {store}; run from the project folder (where "
                                f"`make run` made mlflow.db) or set MLFLOW_TRACKING_URI to the tracking server")
    from mlflow.exceptions import MlflowException
    with keep_environment(*MLFLOW_ENV):
        mlflow.set_tracking_uri(uri)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source))
        except MlflowException as exc:   # an unknown model, alias or version: one line
            raise FileNotFoundError(f"{source}: {exc.message.splitlines()[0]} in the MLflow store {uri}") from None
    found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
    if not found:
        raise FileNotFoundError(f"{source}: no .onnx file in the downloaded model ({local})")
    return found[0]


class OnnxStudent:
    def __init__(self, path: Path):
        import onnxruntime as ort

        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.classes = json.loads(meta["classes"]) if "classes" in meta else None

    def logits(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"expected images of shape (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) in [0, 1], "
                             f"found {images.shape}")
        if images.size and (images.min() < 0 or images.max() > 1):
            raise ValueError(f"expected pixel values in [0, 1], found [{images.min():.3g}, {images.max():.3g}]")
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]

    def predict(self, images: np.ndarray) -> list[dict]:
        logits = self.logits(images)
        e = np.exp(logits - logits.max(1, keepdims=True))
        prob = e / e.sum(1, keepdims=True)
        out = []
        for row, p in zip(logits, prob):
            k = int(row.argmax())
            out.append({"class_index": k, "class": self.classes[k] if self.classes else str(k),
                        "probability": float(p[k])})
        return out


def load_image_file(path: str | Path) -> np.ndarray:
    """An image file -> (3, 32, 32) float32 in [0, 1] (RGB; resized when not 32x32)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None
    return arr.transpose(2, 0, 1)


def decode_image_bytes(data: bytes) -> np.ndarray:
    import io

    return load_image_file(io.BytesIO(data))
