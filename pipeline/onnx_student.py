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


def check_served_input(session, path: Path) -> None:
    """The file takes what the server sends (services/onnx_input.py: one float32 N x 3 x H x W
    input) and at the size it resizes to: H x W symbolic or 32 x 32; else one line at load."""
    from services.onnx_input import EXPECTED_INPUT, check_onnx_input

    check_onnx_input(session, path)
    inp = session.get_inputs()[0]
    fixed = [d for d in inp.shape[2:] if isinstance(d, int)]
    if any(d != IMAGE_SIZE for d in fixed):
        from robustkd.errors import InputError

        raise InputError(f"{path}: ONNX input {inp.name!r}: expected {EXPECTED_INPUT} with H x W = {IMAGE_SIZE} x "
                         f"{IMAGE_SIZE} (what the server resizes to), found {inp.type} {list(inp.shape)}")


class OnnxStudent:
    def __init__(self, path: Path):
        import onnxruntime as ort

        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        check_served_input(self.session, self.path)
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


# Limits of an uploaded image, checked from the file's header before any pixel is decoded, so one
# request never decodes more than about 2048 x 2048 x 4 bytes (16 MiB) per worker. [choice]: 2048 x
# 2048 pixels (64 times the model's 32 x 32 input, far above any photo worth resizing to it) and
# 8 MiB of file; the server's --max-image-pixels and --max-image-mb change them.
MAX_IMAGE_PIXELS = 2048 * 2048
MAX_IMAGE_BYTES = 8 * 2**20
# [choice]: the raster formats a client sends; PIL's other readers (EPS through Ghostscript, ICNS,
# PSD, ...) are not offered to untrusted bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")


class ImageRejected(ValueError):
    """An uploaded image refused before or while decoding; ``status`` is the HTTP answer
    (400 unreadable, truncated or a decompression bomb, 413 over a size limit)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _to_array(img) -> np.ndarray:
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return (np.asarray(img, dtype=np.float32) / 255.0).transpose(2, 0, 1)


def load_image_file(path: str | Path) -> np.ndarray:
    """An image file -> (3, 32, 32) float32 in [0, 1] (RGB; resized when not 32x32)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            arr = _to_array(img)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None
    return arr


def decode_image_bytes(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS,
                       max_bytes: int = MAX_IMAGE_BYTES) -> np.ndarray:
    """Uploaded image bytes -> (3, 32, 32) float32 in [0, 1], as :func:`load_image_file`.

    The byte count and the pixel count of the header are checked before decoding (ImageRejected
    413 naming the limit); unreadable, truncated files and decompression bombs (PIL's
    DecompressionBombError) are ImageRejected 400. Messages name no Python object."""
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    if len(data) > max_bytes:
        raise ImageRejected(413, f"image file of {len(data)} bytes exceeds the limit of {max_bytes} bytes "
                                 f"({max_bytes / 2**20:g} MiB)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageRejected(413, f"image of {width} x {height} pixels exceeds the limit of "
                                             f"{max_pixels} pixels (e.g. {int(max_pixels ** 0.5)} x "
                                             f"{int(max_pixels ** 0.5)})")
                return _to_array(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(400, f"refused as a decompression bomb ({str(exc).rstrip('.')}); the limit here is "
                                 f"{max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise ImageRejected(400, f"not an image of the formats {', '.join(IMAGE_FORMATS)} "
                                 f"({len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, ImageRejected):
            raise
        words = "truncated" if "truncated" in str(exc) or isinstance(exc, EOFError) else "corrupt"
        raise ImageRejected(400, f"{words} image file ({len(data)} bytes): {exc}") from None
