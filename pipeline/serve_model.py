"""Serve the ONNX student over HTTP: FastAPI + uvicorn + onnxruntime (127.0.0.1 by default).

    python -m pipeline.serve_model --model models:/robustkd-student@champion --port 8080

- ``GET  /health``  liveness: {"status": "ok", "model": ..., "classes": [...], "batching": {...}}
- ``GET  /ready``   readiness: 200 once the model answered a warm-up batch and the batcher runs, else 503
- ``POST /predict`` with ``Content-Type: application/json`` and ``{"instances": [...]}``
  (N x 3 x 32 x 32 floats in [0, 1]), or an image file as the body (``image/png``, ``image/jpeg``,
  any size, resized to 32 x 32) -> {"predictions": [{"class", "class_index", "probability"}, ...]}
- ``GET  /openapi.json``: the OpenAPI description (``/docs``: Swagger UI, scripts from a CDN).

Errors are JSON ``{"error": "..."}``: 400 malformed JSON or unreadable image, 413 body over
``--max-body-mb``, 415 other content types, 422 a body of the wrong shape, a NaN or a value
outside [0, 1] (naming where). Concurrent requests are micro-batched: a queue gathers requests for
up to ``--max-wait-ms`` or ``--max-batch`` images and runs them through onnxruntime as one batch
(FastAPI/uvicorn: https://fastapi.tiangolo.com, https://www.uvicorn.org).
``mlflow models serve -m models:/robustkd-student@champion --env-manager local`` serves the same
registered model through MLflow's scoring server as well.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from contextlib import asynccontextmanager
from typing import Annotated

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .onnx_student import IMAGE_SIZE, OnnxStudent, decode_image_bytes, resolve_model

MAX_BODY_BYTES = 16 * 1024 * 1024   # one image as JSON is about 60 kB
MAX_INSTANCES = 1024

# The request body, validated by pydantic (and described in the OpenAPI document).
Pixel = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Row = Annotated[list[Pixel], Field(min_length=IMAGE_SIZE, max_length=IMAGE_SIZE)]
Channel = Annotated[list[Row], Field(min_length=IMAGE_SIZE, max_length=IMAGE_SIZE)]
Image = Annotated[list[Channel], Field(min_length=3, max_length=3)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: Annotated[list[Image], Field(min_length=1, max_length=MAX_INSTANCES, description=(
        f"N x 3 x {IMAGE_SIZE} x {IMAGE_SIZE} RGB images, channels first, floats in [0, 1] (not normalised)"))]


class Prediction(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_: str = Field(alias="class", description="the predicted class name")
    class_index: int
    probability: float = Field(description="softmax probability of the predicted class")


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class ErrorResponse(BaseModel):
    error: str


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def describe_validation_error(exc: ValidationError) -> str:
    """The first problems of an invalid body in words, with where they are (instances[0][2][5])."""
    errors = exc.errors(include_url=False)
    words = {"too_short": "wrong shape", "too_long": "wrong shape", "list_type": "wrong shape",
             "finite_number": "not a finite number", "greater_than_equal": "value outside [0, 1]",
             "less_than_equal": "value outside [0, 1]", "float_type": "not a number",
             "model_type": "not a JSON object",
             "float_parsing": "not a number", "missing": "missing field", "extra_forbidden": "unknown field"}
    parts = []
    for e in errors[:3]:
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".") or "body"
        parts.append(f"{words.get(e['type'], e['type'])} at {loc}: {e['msg']}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return (f'expected {{"instances": N x 3 x {IMAGE_SIZE} x {IMAGE_SIZE} floats in [0, 1]}}; '
            + "; ".join(parts) + more)


class MicroBatcher:
    """Gathers concurrent requests for up to ``max_wait_ms`` or ``max_batch`` images and runs them
    as one onnxruntime call in a worker thread, so the event loop keeps accepting requests."""

    def __init__(self, student: OnnxStudent, max_batch: int = 64, max_wait_ms: float = 5.0):
        self.student, self.max_batch, self.max_wait = student, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = self.images = self.requests = self.largest = 0

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def predict(self, images: np.ndarray) -> list[dict]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self.queue.get()]
            size = len(pending[0][0])
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                pending.append(item)
                size += len(item[0])
            batch = np.concatenate([images for images, _ in pending])
            try:
                predictions = await loop.run_in_executor(None, self.student.predict, batch)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure
                for _, future in pending:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(batch)
            self.requests += len(pending)
            self.largest = max(self.largest, len(batch))
            start = 0
            for images, future in pending:
                if not future.done():
                    future.set_result(predictions[start:start + len(images)])
                start += len(images)

    def stats(self) -> dict:
        return {"max_batch": self.max_batch, "max_wait_ms": self.max_wait * 1000, "batches": self.batches,
                "requests": self.requests, "images": self.images, "largest_batch": self.largest,
                "mean_batch": round(self.images / self.batches, 2) if self.batches else 0.0}


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes
    (from Content-Length, or while streaming a chunked body)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(student: OnnxStudent, max_batch: int = 64, max_wait_ms: float = 5.0,
               max_body_bytes: int = MAX_BODY_BYTES, model_name: str | None = None):
    batcher = MicroBatcher(student, max_batch, max_wait_ms)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        await batcher.predict(np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32))  # warm-up
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.stop()

    app = FastAPI(title="robustkd student", version="1", lifespan=lifespan,
                  description="The adversarially robust distilled student (ONNX, onnxruntime). Inputs are RGB "
                              f"images, {IMAGE_SIZE} x {IMAGE_SIZE}, values in [0, 1]; the model normalises them.")
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict:
        return {"status": "ok", "model": model_name or str(student.path), "classes": student.classes,
                "metadata": student.metadata, "batching": batcher.stats()}

    @app.get("/ready", summary="Readiness: the model answered a warm-up batch and the batcher runs",
             responses={503: {"model": ErrorResponse}})
    async def ready():
        if state["ready"] and batcher.running:
            return {"status": "ready"}
        return JSONResponse({"error": "not ready: the model is loading or the batcher stopped"}, status_code=503)

    image_body = {"schema": {"type": "string", "format": "binary"}}
    openapi_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": PredictRequest.model_json_schema()},
        "image/png": image_body, "image/jpeg": image_body}}}

    @app.post("/predict", response_model=PredictResponse, openapi_extra=openapi_body,
              summary="Class of each image (JSON arrays or one image file)",
              responses={code: {"model": ErrorResponse} for code in (400, 413, 415, 422)})
    async def predict(request: Request):
        body = await read_body(request, max_body_bytes)
        ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if ctype.startswith("image/"):
            try:
                images = decode_image_bytes(body)[None]
            except ValueError as exc:
                raise RequestError(400, f"unreadable image: {exc}") from None
        elif ctype in ("application/json", ""):
            try:  # pydantic parses and validates in one pass (NaN and Infinity tokens are refused)
                req = PredictRequest.model_validate_json(body)
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                if first["type"] == "json_invalid":
                    raise RequestError(400, f"malformed JSON: {first['msg']}") from None
                raise RequestError(422, describe_validation_error(exc)) from None
            images = np.asarray(req.instances, dtype=np.float32)
        else:
            raise RequestError(415, f"Content-Type {ctype!r}; expected application/json, image/png or image/jpeg")
        return {"predictions": await batcher.predict(images)}

    app.add_api_route("/invocations", predict, methods=["POST"], include_in_schema=False)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free one), so the address is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models:/robustkd-student@champion",
                   help="ONNX file or MLflow model URI (default: models:/robustkd-student@champion)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p.add_argument("--max-batch", type=int, default=64, help="images per onnxruntime call at most (default 64)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others (default 5 ms)")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20,
                   help=f"request body limit in MiB (default {MAX_BODY_BYTES / 2**20:g}); larger bodies get 413")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    if args.max_batch < 1 or args.max_wait_ms < 0 or args.max_body_mb <= 0:
        p.error("--max-batch must be >= 1, --max-wait-ms >= 0 and --max-body-mb > 0")
    try:
        student = OnnxStudent(resolve_model(args.model))
    except Exception as exc:  # noqa: BLE001 - any failure to find the model is reported plainly
        print(f"error: cannot load {args.model}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    import uvicorn

    app = create_app(student, args.max_batch, args.max_wait_ms, int(args.max_body_mb * 2**20), args.model)
    host, port = sock.getsockname()[:2]
    print(f"serving {args.model} ({student.path}) on http://{host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, timeout_graceful_shutdown=5)
    t0 = time.perf_counter()
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        print(f"stopped after {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
