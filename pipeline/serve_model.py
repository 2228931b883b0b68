"""Serve the ONNX student over HTTP: FastAPI + uvicorn + onnxruntime (127.0.0.1 by default).

    python -m pipeline.serve_model --model models:/robustkd-student@champion --port 8080

- ``GET  /health``  liveness: {"status": "ok", "model": ..., "classes": [...], "batching": {...}}
- ``GET  /ready``   readiness: 200 once the model answered a warm-up batch and the batcher runs, else 503
- ``POST /predict`` with ``Content-Type: application/json`` and ``{"instances": [...]}``
  (N x 3 x 32 x 32 floats in [0, 1]), an image file as the body (``image/png``, ``image/jpeg``, ...,
  resized to 32 x 32), or a ``multipart/form-data`` upload with the file in the form field ``image``
  (``curl -F image=@cat.png``) -> {"predictions": [{"class", "class_index", "probability"}, ...]}
- ``GET  /openapi.json``: the OpenAPI description (``/docs``: Swagger UI, its files served offline by the server).

Errors are JSON ``{"error": "..."}``, never a Python repr: 400 malformed JSON, an unreadable or
truncated image or a decompression bomb, 404/405 unknown paths and methods, 408 a body not received
within ``--body-timeout-s``, 413 a body over ``--max-body-mb`` or an image over ``--max-image-mb`` /
``--max-image-pixels`` (from its header, before decoding), 415 other content types, 422 a body of
the wrong shape, a NaN or a value outside [0, 1] (naming where), 429 more than ``--max-uploads``
bodies arriving at once. Bodies are parsed and images decoded in a pool of ``--decode-workers``
threads, so ``/health`` and other clients never wait on one image; a connection that has not sent
its request head within ``--header-timeout-s`` is closed. Concurrent requests are micro-batched: a
queue gathers requests for up to ``--max-wait-ms`` or ``--max-batch`` images and runs them through
onnxruntime as one batch (FastAPI/uvicorn: https://fastapi.tiangolo.com, https://www.uvicorn.org).
``mlflow models serve -m models:/robustkd-student@champion --env-manager local`` serves the same
registered model through MLflow's scoring server as well.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .onnx_student import (IMAGE_FORMATS, IMAGE_SIZE, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, ImageRejected, OnnxStudent,
                           decode_image_bytes, resolve_model)

MAX_BODY_BYTES = 16 * 1024 * 1024   # one image as JSON is about 60 kB
MAX_INSTANCES = 1024
# Hostile clients ([choice] each; the CLI flags of the same names change them): threads that parse
# bodies and decode images (off the event loop), bodies read at once (the 429 beyond), seconds a body
# and a request head may take to arrive (slow clients, "slowloris", get 408 / a closed connection).
DECODE_WORKERS = 2
MAX_UPLOADS = 16
BODY_TIMEOUT_S = 10.0
HEADER_TIMEOUT_S = 10.0
MULTIPART_FIELD = "image"           # the form field of a multipart/form-data upload
MULTIPART_OVERHEAD = 64 * 1024      # part headers and boundaries beyond the image's own bytes

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
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


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


async def read_body(request, limit: int, timeout: float | None = None) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes
    (from Content-Length, or while streaming a chunked body), with 408 when it has not all arrived
    within ``timeout`` seconds; a client that went away gets no traceback in the log."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, f"request body not complete after {timeout:g} s ({size} bytes received); "
                                "the server's limit is --body-timeout-s", {"Connection": "close"}) from None
    except ClientDisconnect:
        raise RequestError(400, "the client closed the connection before the body was complete") from None
    return b"".join(chunks)


def multipart_image(content_type: str, body: bytes) -> bytes:
    """The file of form field ``image`` of a multipart/form-data body (RFC 7578: parts between
    ``--boundary`` lines, each with its headers, a blank line and its bytes). Split as bytes, with the
    standard library reading each part's headers: python-multipart is not a dependency of this
    project, and the bytes are copied about twice, never decoded to text."""
    from email import policy
    from email.message import Message
    from email.parser import BytesHeaderParser

    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise RequestError(400, "multipart/form-data without a boundary parameter in Content-Type")
    names = []
    for segment in body.split(b"--" + boundary.encode("latin-1"))[1:]:
        if segment.startswith(b"--"):        # the closing delimiter
            break
        head, blank, content = segment.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not blank:
            raise RequestError(400, "malformed multipart/form-data body: a part without a blank line after its headers")
        part = BytesHeaderParser(policy=policy.HTTP).parsebytes(head + b"\r\n\r\n")
        name = part.get_param("name", header="content-disposition")
        names.append(name)
        if name == MULTIPART_FIELD:
            return content.removesuffix(b"\r\n")
    raise RequestError(422, f"multipart/form-data: expected the image file in form field {MULTIPART_FIELD!r}, "
                            f"found the fields {names}")


def parse_body(content_type: str, body: bytes, max_pixels: int, max_image_bytes: int) -> np.ndarray:
    """The images of one /predict body (N x 3 x 32 x 32 float32); runs in the decode pool."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype.startswith("image/") or ctype == "multipart/form-data":
        data = multipart_image(content_type, body) if ctype == "multipart/form-data" else body
        try:
            return decode_image_bytes(data, max_pixels, max_image_bytes)[None]
        except ImageRejected as exc:
            raise RequestError(exc.status, str(exc) if exc.status == 413 else f"unreadable image: {exc}") from None
    if ctype in ("application/json", ""):
        try:  # pydantic parses and validates in one pass (NaN and Infinity tokens are refused)
            req = PredictRequest.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            if first["type"] == "json_invalid":
                raise RequestError(400, f"malformed JSON: {first['msg']}") from None
            raise RequestError(422, describe_validation_error(exc)) from None
        return np.asarray(req.instances, dtype=np.float32)
    raise RequestError(415, f"Content-Type {ctype!r}; expected application/json, multipart/form-data "
                            "(field 'image') or an image type such as image/png or image/jpeg")


def header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol with a deadline for each request head: uvicorn times out idle
    keep-alive connections only, so a client sending its headers a byte at a time would hold a
    connection for good. Such a connection is closed after ``timeout_s`` (no response: there is no
    request to answer yet); the body's own deadline is the app's (408)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        head_deadline = None

        def _arm(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
            self.head_deadline = self.loop.call_later(timeout_s, self._head_too_slow)

        def _head_too_slow(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:   # a malformed request: the JSON error shape too
            import json

            import h11

            body = json.dumps({"error": f"invalid HTTP request: {msg}"}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return HeaderTimeoutH11


DOCS_ASSETS = "/docs-assets"


def mount_offline_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI with its scripts and styles served by this process from the
    swagger-ui-py package (https://pypi.org/project/swagger-ui-py/, Swagger UI 5, which reads the
    OpenAPI 3.1 description FastAPI writes; Swagger UI 4 refuses it). FastAPI's default page loads
    them from a CDN, so it is blank on an offline machine. ReDoc has no such package: ``/redoc`` is
    off (docs/operations.md, "Serving the ONNX student")."""
    import importlib.util
    from pathlib import Path

    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    spec = importlib.util.find_spec("swagger_ui")   # its folder only: the package's web-framework glue is not needed
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the server's /docs needs the swagger-ui-py package (pip install swagger-ui-py==25.7.1)")
    swagger_ui_path = Path(spec.submodule_search_locations[0]) / "static"

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title}: API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


def create_app(student: OnnxStudent, max_batch: int = 64, max_wait_ms: float = 5.0,
               max_body_bytes: int = MAX_BODY_BYTES, model_name: str | None = None,
               decode_workers: int = DECODE_WORKERS, max_uploads: int = MAX_UPLOADS,
               body_timeout_s: float = BODY_TIMEOUT_S, max_image_pixels: int = MAX_IMAGE_PIXELS,
               max_image_bytes: int = MAX_IMAGE_BYTES):
    batcher = MicroBatcher(student, max_batch, max_wait_ms)
    state = {"ready": False}
    uploads = {"active": 0, "refused": 0}
    pool = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="decode")
    limits = {"max_body_bytes": max_body_bytes, "max_image_bytes": max_image_bytes,
              "max_image_pixels": max_image_pixels, "decode_workers": decode_workers, "max_uploads": max_uploads,
              "body_timeout_s": body_timeout_s}

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        await batcher.predict(np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32))  # warm-up
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.stop()
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="robustkd student", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="The adversarially robust distilled student (ONNX, onnxruntime). Inputs are RGB "
                              f"images, {IMAGE_SIZE} x {IMAGE_SIZE}, values in [0, 1]; the model normalises them.")
    app.state.batcher = batcher
    mount_offline_docs(app)

    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):   # 404, 405, ...: the same JSON shape
        allow = (exc.headers or {}).get("Allow")
        message = f"{request.method} {request.url.path}: {str(exc.detail).lower()}"
        return JSONResponse({"error": message + (f"; allowed: {allow}" if allow else "")},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):   # a bug: JSON too; Starlette still logs the traceback
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server's log"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return JSONResponse({"error": f"invalid request at {where}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict:
        return {"status": "ok", "model": model_name or str(student.path), "classes": student.classes,
                "metadata": student.metadata, "batching": batcher.stats(), "limits": limits,
                "uploads": dict(uploads)}

    @app.get("/ready", summary="Readiness: the model answered a warm-up batch and the batcher runs",
             responses={503: {"model": ErrorResponse}})
    async def ready():
        if state["ready"] and batcher.running:
            return {"status": "ready"}
        return JSONResponse({"error": "not ready: the model is loading or the batcher stopped"}, status_code=503)

    image_body = {"schema": {"type": "string", "format": "binary"}}
    form_body = {"schema": {"type": "object", "required": [MULTIPART_FIELD], "properties": {MULTIPART_FIELD: {
        "type": "string", "format": "binary",
        "description": f"the image file ({', '.join(IMAGE_FORMATS)}; at most {max_image_pixels} pixels and "
                       f"{max_image_bytes} bytes)"}}}}
    openapi_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": PredictRequest.model_json_schema()},
        "multipart/form-data": form_body, "image/png": image_body, "image/jpeg": image_body}}}

    @app.post("/predict", response_model=PredictResponse, openapi_extra=openapi_body,
              summary="Class of each image (JSON arrays, one image file, or a form upload of field 'image')",
              responses={code: {"model": ErrorResponse} for code in (400, 408, 413, 415, 422, 429)})
    async def predict(request: Request):
        if uploads["active"] >= max_uploads:
            uploads["refused"] += 1
            raise RequestError(429, f"{uploads['active']} request bodies are arriving already, the limit of "
                                    "--max-uploads; retry later", {"Retry-After": "1", "Connection": "close"})
        content_type = request.headers.get("content-type") or ""
        ctype = content_type.split(";")[0].strip().lower()
        limit = max_body_bytes
        if ctype.startswith("image/"):
            limit = min(max_body_bytes, max_image_bytes)
        elif ctype == "multipart/form-data":
            limit = min(max_body_bytes, max_image_bytes + MULTIPART_OVERHEAD)
        uploads["active"] += 1
        try:
            body = await read_body(request, limit, body_timeout_s)
            images = await asyncio.get_running_loop().run_in_executor(
                pool, parse_body, content_type, body, max_image_pixels, max_image_bytes)
        finally:
            uploads["active"] -= 1
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
    p.add_argument("--max-image-mb", type=float, default=MAX_IMAGE_BYTES / 2**20,
                   help=f"image file limit in MiB (default {MAX_IMAGE_BYTES / 2**20:g}); larger files get 413")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help=f"width x height limit of an image, read from its header before decoding "
                        f"(default {MAX_IMAGE_PIXELS} = 2048 x 2048); larger images get 413")
    p.add_argument("--decode-workers", type=int, default=DECODE_WORKERS,
                   help=f"threads that parse bodies and decode images (default {DECODE_WORKERS})")
    p.add_argument("--max-uploads", type=int, default=MAX_UPLOADS,
                   help=f"request bodies read at once; more get 429 (default {MAX_UPLOADS})")
    p.add_argument("--body-timeout-s", type=float, default=BODY_TIMEOUT_S,
                   help=f"seconds a request body may take to arrive; slower ones get 408 (default {BODY_TIMEOUT_S:g})")
    p.add_argument("--header-timeout-s", type=float, default=HEADER_TIMEOUT_S,
                   help=f"seconds a request head may take to arrive before the connection is closed "
                        f"(default {HEADER_TIMEOUT_S:g})")
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    if args.max_batch < 1 or args.max_wait_ms < 0 or args.max_body_mb <= 0:
        p.error("--max-batch must be >= 1, --max-wait-ms >= 0 and --max-body-mb > 0")
    if min(args.max_image_mb, args.max_image_pixels, args.decode_workers, args.max_uploads,
           args.body_timeout_s, args.header_timeout_s) <= 0:
        p.error("--max-image-mb, --max-image-pixels, --decode-workers, --max-uploads, --body-timeout-s and "
                "--header-timeout-s must be > 0")
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

    app = create_app(student, args.max_batch, args.max_wait_ms, int(args.max_body_mb * 2**20), args.model,
                     decode_workers=args.decode_workers, max_uploads=args.max_uploads,
                     body_timeout_s=args.body_timeout_s, max_image_pixels=args.max_image_pixels,
                     max_image_bytes=int(args.max_image_mb * 2**20))
    host, port = sock.getsockname()[:2]
    print(f"serving {args.model} ({student.path}) on http://{host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, timeout_graceful_shutdown=5,
                            http=header_timeout_protocol(args.header_timeout_s))
    t0 = time.perf_counter()
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        print(f"stopped after {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
