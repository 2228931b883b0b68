"""The ONNX student's HTTP server (pipeline/serve_model.py) under hostile input, bounded in count and
time, on 127.0.0.1 only: a decompression-bomb header, an image of too many pixels and one of too many
bytes, a truncated file, slow bodies and slow request heads ("slowloris", 3 connections each), one
upload beyond --max-uploads, a client that goes away mid-body, multipart uploads, 404 and 405. The
server's RSS is sampled throughout (before / peak / after printed); asserted: no HTTP 5xx, every
error in the JSON shape without a Python repr, /health answering while slow clients hold
connections and while a large image decodes, no traceback in the server's log, and peak RSS under
RSS_BOUND_MB."""

import http.client
import io
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import psutil
import pytest

from .stage_fixtures import ROOT
from .test_serving import tiny_onnx

# [choice] The stated bound of the issue ("e.g. 300 MB for the CPU student"): the server holds
# python, FastAPI, onnxruntime and the tiny model (about 100 MB), and decodes at most
# --decode-workers images of at most 2048 x 2048 pixels at a time (about 16 MB each, a few copies).
RSS_BOUND_MB = 300
BODY_TIMEOUT_S = HEADER_TIMEOUT_S = 2.0
MAX_UPLOADS = 3
SLOW_CONNECTIONS = 3


class Server:
    """pipeline.serve_model on 127.0.0.1 (a free port), its stderr in a file, its RSS sampled every 10 ms."""

    def __init__(self, model, log):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.serve_model", "--model", str(model), "--host", "127.0.0.1", "--port", "0",
             "--body-timeout-s", str(BODY_TIMEOUT_S), "--header-timeout-s", str(HEADER_TIMEOUT_S),
             "--max-uploads", str(MAX_UPLOADS), "--decode-workers", "2", "--log-level", "info"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        line = self.proc.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, log.read_text()[-3000:])
        self.port = int(line.strip().rsplit(":", 1)[-1])
        self.statuses: list[int] = []
        self.lock = threading.Lock()
        deadline = time.monotonic() + 120
        while self.request("GET", "/ready", record=False)[0] != 200:
            assert self.proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        self.ps = psutil.Process(self.proc.pid)
        self.peak = self.before = self.rss()
        self.sampling = True
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def _sample(self):
        while self.sampling:
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.Error:
                return
            time.sleep(0.01)

    def record(self, status):
        with self.lock:
            self.statuses.append(status)

    def request(self, method, path, body=None, headers=None, record=True, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body, headers or {})
            resp = conn.getresponse()
            status, payload = resp.status, resp.read()
        except OSError:
            status, payload = 0, b""
        finally:
            conn.close()
        if record:
            self.record(status)
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload.decode(errors="replace")

    def stop(self):
        self.sampling = False
        self.sampler.join()
        self.after = self.rss()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    srv = Server(tiny_onnx(tmp / "student.onnx"), tmp / "server.log")
    try:
        yield srv
    finally:
        srv.stop()
    mb = 2**20
    print(f"\nhostile serving: {len(srv.statuses)} HTTP requests, "
          f"{sum(s >= 500 for s in srv.statuses)} 5xx, statuses {dict(sorted(_count(srv.statuses).items()))}; "
          f"server RSS before {srv.before / mb:.0f} MB, peak {srv.peak / mb:.0f} MB, after {srv.after / mb:.0f} MB "
          f"(bound {RSS_BOUND_MB} MB)")
    log = srv.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert not any(s >= 500 or s == 0 for s in srv.statuses), _count(srv.statuses)
    assert srv.peak < RSS_BOUND_MB * mb, f"peak RSS {srv.peak / mb:.0f} MB"


def _count(values):
    out = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width=30000, height=30000) -> bytes:
    """A file of about a hundred bytes whose header claims width x height RGB pixels."""
    idat = zlib.compress(b"\x00" * (1 + 3 * 64), 9)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def smooth(size) -> np.ndarray:
    """A size x size gradient: a real image of many pixels in few bytes."""
    y, x = np.indices((size, size))
    return np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)


def noise(size, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def multipart(fields: dict, boundary="robustkd-test-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body as curl -F writes it: {name: (filename, bytes, content type)}."""
    parts = []
    for name, (filename, data, ctype) in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def assert_clean_error(status, out, expected_status, words):
    assert status == expected_status, (status, out)
    assert isinstance(out, dict) and set(out) == {"error"}, out
    assert words in out["error"], out
    assert "object at 0x" not in out["error"] and "<_io" not in out["error"], out


def test_bomb_huge_truncated_and_oversized_images_are_refused(server):
    status, out = server.request("POST", "/predict", bomb_png(), {"Content-Type": "image/png"})
    assert_clean_error(status, out, 400, "decompression bomb")
    huge = png(smooth(4000))                      # 4000 x 4000, about 50 kB: refused from its header
    assert len(huge) < 2**20
    status, out = server.request("POST", "/predict", huge, {"Content-Type": "image/png"})
    assert_clean_error(status, out, 413, "4000 x 4000 pixels exceeds the limit of 4194304 pixels")
    whole = png(noise(64))
    status, out = server.request("POST", "/predict", whole[:len(whole) // 2], {"Content-Type": "image/png"})
    assert_clean_error(status, out, 400, "truncated image file")
    status, out = server.request("POST", "/predict", b"\x89PNG\r\n\x1a\nnot really", {"Content-Type": "image/png"})
    assert_clean_error(status, out, 400, "unreadable image")
    status, out = server.request("POST", "/predict", b"\0" * (9 * 2**20), {"Content-Type": "image/png"})
    assert_clean_error(status, out, 413, "exceeds the limit of 8388608 bytes")
    # the largest image accepted decodes and is classified
    status, out = server.request("POST", "/predict", png(smooth(2048)), {"Content-Type": "image/png"})
    assert status == 200 and len(out["predictions"]) == 1, out


def test_health_answers_while_a_large_image_decodes(server):
    body = png(smooth(2048))
    done = []
    worker = threading.Thread(target=lambda: done.append(
        [server.request("POST", "/predict", body, {"Content-Type": "image/png"})[0] for _ in range(4)]))
    worker.start()
    waits = []
    while worker.is_alive() and len(waits) < 50:
        t0 = time.perf_counter()
        assert server.request("GET", "/health")[0] == 200
        waits.append(time.perf_counter() - t0)
        time.sleep(0.02)
    worker.join()
    assert done == [[200] * 4]
    print(f"\n/health during 4 decodes of 2048 x 2048: {len(waits)} answers, slowest {max(waits) * 1000:.0f} ms")
    assert max(waits) < 1.0


def test_large_files_near_the_byte_limit_at_once_as_body_and_form(server):
    """Files of about 6 MB that decode (1400 x 1400 noise: no compression helps), --max-uploads (3) at
    once, as the body and as a form upload: the RSS bound holds (asserted when the server stops)."""
    image = png(noise(1400, seed=2))
    assert 5 * 2**20 < len(image) < 8 * 2**20
    form, ctype = multipart({"image": ("noise.png", image, "image/png")})
    answers = []
    threads = [threading.Thread(target=lambda b=b, c=c: answers.append(server.request("POST", "/predict", b, {
        "Content-Type": c}))) for b, c in [(image, "image/png"), (form, ctype), (image, "image/png")]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a[0] for a in answers] == [200] * MAX_UPLOADS, answers
    assert len({json.dumps(a[1]) for a in answers}) == 1      # the same file, the same answer


def slow_client(port: int, head: bytes, trickle: bytes, seconds: float) -> tuple[bytes, float]:
    """Sends ``head`` then one byte of ``trickle`` every 0.25 s until the server answers or closes;
    returns what it answered and when."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=seconds)
    t0, data, i = time.monotonic(), b"", 0
    try:
        sock.sendall(head)
        while time.monotonic() - t0 < seconds:
            readable, _, _ = select.select([sock], [], [], 0.25)
            if readable:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                continue
            if not data and i < len(trickle):
                sock.sendall(trickle[i:i + 1])
                i += 1
    except OSError:
        pass
    finally:
        sock.close()
    return data, time.monotonic() - t0


def test_slow_bodies_get_408_and_the_upload_cap_429_while_health_answers(server):
    head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n")
    results = [None] * SLOW_CONNECTIONS
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(
        k, slow_client(server.port, head, b"x" * 1000, 15))) for k in range(SLOW_CONNECTIONS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while server.request("GET", "/health", record=False)[1]["uploads"]["active"] < SLOW_CONNECTIONS:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # a fourth body while three arrive: 429, at once
    status, out = server.request("POST", "/predict", png(noise(32)), {"Content-Type": "image/png"})
    assert_clean_error(status, out, 429, "--max-uploads")
    t0 = time.perf_counter()
    for _ in range(5):
        assert server.request("GET", "/health")[0] == 200
    health_s = (time.perf_counter() - t0) / 5
    for t in threads:
        t.join()
    for data, seconds in results:
        server.record(int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0)
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert b'"error"' in data and b"--body-timeout-s" in data, data
        assert seconds < BODY_TIMEOUT_S + 3, seconds
    print(f"\n{SLOW_CONNECTIONS} slow bodies: 408 after {max(s for _, s in results):.1f} s; "
          f"/health meanwhile {health_s * 1000:.0f} ms")
    assert health_s < 0.5
    assert server.request("GET", "/health")[1]["uploads"]["active"] == 0


def test_slow_request_heads_are_closed_and_a_client_that_leaves_logs_nothing(server):
    head = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    results = [None] * SLOW_CONNECTIONS
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(
        k, slow_client(server.port, head, b"X-Slow: " + b"y" * 1000, 15))) for k in range(SLOW_CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for data, seconds in results:   # closed without an answer: no request to answer yet
        assert data == b"" and seconds < HEADER_TIMEOUT_S + 3, (data, seconds)
    # a client that sends half a body and goes away
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 5000\r\n\r\n" + b"x" * 100)
        time.sleep(0.1)
        sock.close()
    time.sleep(0.5)
    assert server.request("GET", "/ready")[0] == 200


def test_multipart_uploads_and_the_openapi_form_field(server):
    image = png(noise(40, seed=1))
    body, ctype = multipart({"image": ("cat.png", image, "image/png")})
    status, out = server.request("POST", "/predict", body, {"Content-Type": ctype})
    assert status == 200 and len(out["predictions"]) == 1, out
    direct = server.request("POST", "/predict", image, {"Content-Type": "image/png"})[1]
    assert out == direct          # the same bytes, the same answer
    body, ctype = multipart({"file": ("cat.png", image, "image/png")})
    status, out = server.request("POST", "/predict", body, {"Content-Type": ctype})
    assert_clean_error(status, out, 422, "form field 'image'")
    body, ctype = multipart({"image": ("bomb.png", bomb_png(), "image/png")})
    status, out = server.request("POST", "/predict", body, {"Content-Type": ctype})
    assert_clean_error(status, out, 400, "decompression bomb")
    status, out = server.request("POST", "/predict", b"--x\r\n", {"Content-Type": "multipart/form-data"})
    assert_clean_error(status, out, 400, "boundary")
    spec = server.request("GET", "/openapi.json")[1]
    form = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and form["properties"]["image"]["format"] == "binary"


def test_unknown_paths_and_methods_answer_in_the_json_error_shape(server):
    assert_clean_error(*server.request("GET", "/predict"), 405, "GET /predict: method not allowed; allowed: POST")
    assert_clean_error(*server.request("DELETE", "/health"), 405, "method not allowed")
    assert_clean_error(*server.request("GET", "/nowhere"), 404, "GET /nowhere: not found")
    assert_clean_error(*server.request("POST", "/predict", b"x=1", {"Content-Type": "text/plain"}), 415,
                       "multipart/form-data")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)   # not HTTP at all
    sock.sendall(b"HELLO THERE\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    server.record(int(data.split(b" ", 2)[1]))
    assert data.startswith(b"HTTP/1.1 400") and b'{"error": "invalid HTTP request' in data, data
    assert server.request("GET", "/ready")[0] == 200
