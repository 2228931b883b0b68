"""Serve the ONNX student over HTTP with onnxruntime (127.0.0.1 by default).

    python -m pipeline.serve_model --model models:/robustkd-student@champion --port 8080

- ``GET  /health``   -> {"status": "ok", "model": ..., "classes": [...]}
- ``POST /predict``  with ``Content-Type: application/json`` and ``{"instances": [...]}``
  (N x 3 x 32 x 32 floats in [0, 1]), or with an image file as the body (``Content-Type: image/png``,
  ``image/jpeg``) -> {"predictions": [{"class": ..., "class_index": ..., "probability": ...}, ...]}

Bad requests get HTTP 400 with {"error": "..."}. ``mlflow models serve -m models:/...@champion
--env-manager local`` serves the same registered model through MLflow's pyfunc server as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from .onnx_student import OnnxStudent, decode_image_bytes, resolve_model

MAX_BODY_BYTES = 64 * 1024 * 1024


def make_handler(student: OnnxStudent):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path.rstrip("/") in ("/health", "/ping"):
                self._send(200, {"status": "ok", "model": str(student.path), "classes": student.classes,
                                 "metadata": student.metadata})
            else:
                self._send(404, {"error": f"no route {self.path}; use GET /health or POST /predict"})

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") not in ("/predict", "/invocations"):
                self._send(404, {"error": f"no route {self.path}; use POST /predict"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY_BYTES:
                self._send(400, {"error": f"body of {length} bytes; expected 1..{MAX_BODY_BYTES}"})
                return
            body = self.rfile.read(length)
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            try:
                if ctype.startswith("image/"):
                    images = decode_image_bytes(body)[None]
                elif ctype == "application/json":
                    payload = json.loads(body)
                    if not isinstance(payload, dict) or "instances" not in payload:
                        raise ValueError('expected a JSON object {"instances": [...]}')
                    images = np.asarray(payload["instances"], dtype=np.float32)
                else:
                    raise ValueError(f"Content-Type {ctype!r}; expected application/json or image/*")
                self._send(200, {"predictions": student.predict(images)})
            except (ValueError, TypeError) as exc:
                self._send(400, {"error": str(exc)})

        def log_message(self, fmt, *args):
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    return Handler


def make_server(student: OnnxStudent, host: str, port: int) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), make_handler(student))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models:/robustkd-student@champion",
                   help="ONNX file or MLflow model URI (default: models:/robustkd-student@champion)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    args = p.parse_args(argv)
    try:
        student = OnnxStudent(resolve_model(args.model))
    except Exception as exc:  # noqa: BLE001 - any failure to find the model is reported plainly
        print(f"error: cannot load {args.model}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    server = make_server(student, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {args.model} ({student.path}) on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
