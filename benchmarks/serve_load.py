"""Load on the ONNX student's HTTP server (pipeline/serve_model.py): requests per second and p50/p99
latency from a few client threads with keep-alive connections; no timing is asserted anywhere.

    python -m benchmarks.serve_load                                  # starts a server on models/student.onnx
    python -m benchmarks.serve_load --model models:/robustkd-student@champion --requests 2000 --threads 8
    python -m benchmarks.serve_load --url http://127.0.0.1:8080      # a server that is already running
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np


def request_body(images_per_request: int, seed: int = 0) -> bytes:
    images = np.random.default_rng(seed).random((images_per_request, 3, 32, 32), dtype=np.float32)
    return json.dumps({"instances": np.round(images, 4).tolist()}).encode()


def run_load(base_url: str, requests: int = 200, threads: int = 4, images_per_request: int = 1,
             timeout: float = 60.0) -> dict:
    """``requests`` POST /predict spread over ``threads`` keep-alive connections. Returns the
    status codes seen, requests/s and latency percentiles (ms)."""
    url = urllib.parse.urlsplit(base_url)
    body = request_body(images_per_request)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    failures: list[str] = []
    lock = threading.Lock()
    share = [requests // threads + (i < requests % threads) for i in range(threads)]

    def worker(n: int) -> None:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    payload = resp.read()
                    ok = resp.status == 200 and len(json.loads(payload)["predictions"]) == images_per_request
                    status = resp.status if ok else -resp.status
                except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                    status = 0
                    with lock:
                        failures.append(repr(exc))
                    conn.close()
                    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    statuses[status] = statuses.get(status, 0) + 1
        finally:
            conn.close()

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(n,)) for n in share]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "threads": threads, "images_per_request": images_per_request,
            "statuses": statuses, "failures": failures[:5], "seconds": wall,
            "requests_per_s": len(latencies) / wall, "images_per_s": len(latencies) * images_per_request / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def describe(result: dict) -> str:
    return (f"{result['requests']} requests x {result['images_per_request']} image(s) from {result['threads']} "
            f"threads: {result['requests_per_s']:.0f} requests/s ({result['images_per_s']:.0f} images/s), "
            f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, max {result['max_ms']:.1f} ms; "
            f"statuses {result['statuses']}")


def start_server(model: str, extra: list[str] = (), cwd: Path | None = None, env: dict | None = None,
                 ready_timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """``python -m pipeline.serve_model --port 0`` in its own process; returns it and its base URL
    once /ready answers 200. The caller stops it (terminate, wait)."""
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "pipeline.serve_model", "--model", model, "--port", "0",
                             *extra], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://127.0.0.1:" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r} {proc.stderr.read()[-3000:]}")
    base = line.strip().rsplit(" ", 1)[-1]
    deadline = time.monotonic() + ready_timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=5) as resp:
                if resp.status == 200:
                    return proc, base
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server not ready: {proc.stderr.read()[-3000:]}")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/student.onnx", help="ONNX file or MLflow model URI")
    p.add_argument("--url", help="measure a server that is already running instead of starting one")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    proc = None
    if args.url:
        base = args.url.rstrip("/")
    else:
        if "://" not in args.model and ":/" not in args.model and not Path(args.model).is_file():
            p.error(f"{args.model} does not exist: run the pipeline first or pass --model / --url")
        proc, base = start_server(args.model, ["--max-batch", str(args.max_batch), "--max-wait-ms",
                                               str(args.max_wait_ms)], env={**os.environ})
    try:
        run_load(base, requests=min(50, args.requests), threads=args.threads,
                 images_per_request=args.images_per_request)  # warm-up
        result = run_load(base, args.requests, args.threads, args.images_per_request)
        import urllib.request
        with urllib.request.urlopen(f"{base}/health", timeout=10) as resp:
            result["batching"] = json.loads(resp.read()).get("batching")
    finally:
        if proc:
            stop_server(proc)
    print(describe(result))
    if result.get("batching"):
        print(f"micro-batching: {result['batching']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
