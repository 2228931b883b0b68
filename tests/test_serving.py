"""The HTTP server of the ONNX student (FastAPI + uvicorn, pipeline/serve_model.py) on 127.0.0.1,
with a tiny linear ONNX model in the deployed format: OpenAPI, health and readiness, clear 4xx
errors, the body limit, micro-batching, and a bounded load (figures printed, never asserted)."""

import io
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest

from benchmarks.serve_load import describe, run_load, start_server, stop_server

from .stage_fixtures import ROOT

CLASSES = [f"c{i}" for i in range(10)]


def tiny_onnx(path, seed=0):
    """logits = flatten(image) @ W + b, with the input/output names and class metadata of the
    export_onnx stage's files."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(0, 0.05, (3 * 32 * 32, 10)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"], axis=1), helper.make_node("Gemm", ["flat", "W", "b"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"classes": json.dumps(CLASSES), "method": "test"})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_onnx(tmp_path_factory.mktemp("serve") / "student.onnx")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc, base = start_server(str(model), ["--max-body-mb", "1", "--max-wait-ms", "5", "--max-batch", "32"],
                              cwd=ROOT, env=env)
    try:
        yield base, model
    finally:
        stop_server(proc)
    assert proc.returncode is not None


def call(url, body=None, ctype="application/json", method=None):
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"),
                                 headers={"Content-Type": ctype} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def images(n, seed=0):
    return np.random.default_rng(seed).random((n, 3, 32, 32)).round(4)


def test_health_ready_and_openapi(server):
    base, _ = server
    code, health = call(f"{base}/health")
    assert code == 200 and health["status"] == "ok" and health["classes"] == CLASSES
    assert call(f"{base}/ready") == (200, {"status": "ready"})
    code, spec = call(f"{base}/openapi.json")
    assert code == 200 and {"/predict", "/health", "/ready"} <= set(spec["paths"])
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "image/png"} <= set(body)
    assert "instances" in json.dumps(body["application/json"])


def test_docs_page_loads_only_files_the_server_serves(server):
    """/docs offline: Swagger UI's script, style and icon come from the server (swagger-ui-py),
    not from a CDN; /redoc (no offline package) is off."""
    import re

    base, _ = server
    with urllib.request.urlopen(f"{base}/docs", timeout=30) as resp:
        page = resp.read().decode()
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page) + re.findall(r"""url: *["']([^"']+)["']""", page)
    assert refs and not [r for r in refs if r.startswith(("http:", "https:", "//"))], refs
    assert {"/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css", "/openapi.json"} <= set(refs)
    for ref in refs:
        with urllib.request.urlopen(base + ref, timeout=30) as resp:
            assert resp.status == 200 and len(resp.read()) > 500, ref
    assert call(f"{base}/redoc")[0] == 404
    # FastAPI writes OpenAPI 3.1, which Swagger UI 4 refuses ("Unable to render this definition"):
    # the served bundle must carry Swagger UI 5's OpenAPI 3.1 plugin
    assert call(f"{base}/openapi.json")[1]["openapi"].startswith("3.1")
    with urllib.request.urlopen(f"{base}/docs-assets/swagger-ui-bundle.js", timeout=30) as resp:
        assert b"OpenAPI31" in resp.read()


def test_predictions_match_onnxruntime(server):
    import onnxruntime as ort

    base, model = server
    x = images(3)
    code, out = call(f"{base}/predict", json.dumps({"instances": x.tolist()}).encode())
    assert code == 200 and len(out["predictions"]) == 3
    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        None, {"image": x.astype(np.float32)})[0]
    assert [p["class_index"] for p in out["predictions"]] == logits.argmax(1).tolist()
    assert [p["class"] for p in out["predictions"]] == [CLASSES[k] for k in logits.argmax(1)]


def test_image_file_body(server):
    from PIL import Image

    base, _ = server
    buf = io.BytesIO()
    Image.fromarray((images(1)[0].transpose(1, 2, 0) * 255).astype(np.uint8)).resize((48, 40)).save(buf, "PNG")
    code, out = call(f"{base}/predict", buf.getvalue(), "image/png")
    assert code == 200 and len(out["predictions"]) == 1 and out["predictions"][0]["class"] in CLASSES
    code, out = call(f"{base}/predict", b"not a png", "image/png")
    assert code == 400 and "image" in out["error"]


@pytest.mark.parametrize("body, status, words", [
    (b'{"instances": [[[0.1, ', 400, "malformed JSON"),
    (b'[1, 2]', 422, "instances"),
    (json.dumps({"instances": [[1, 2]]}).encode(), 422, "wrong shape at instances[0]"),
    (json.dumps({"instances": images(1)[:, :2].tolist()}).encode(), 422, "wrong shape at instances[0]"),
    (json.dumps({"instances": []}).encode(), 422, "wrong shape at instances"),
    (json.dumps({"instances": images(1).tolist(), "extra": 1}).encode(), 422, "unknown field at extra"),
])
def test_bad_requests_get_clear_4xx(server, body, status, words):
    base, _ = server
    code, out = call(f"{base}/predict", body)
    assert code == status and words in out["error"], out


def test_nan_and_values_outside_unit_range_are_refused(server):
    base, _ = server
    x = images(2)
    x[1, 2, 3, 4] = 0.77777   # a value no other pixel has (four decimals), replaced by a NaN token
    nan = json.dumps({"instances": x.tolist()}).replace("0.77777", "NaN")
    code, out = call(f"{base}/predict", nan.encode())
    assert code == 422 and "not a finite number at instances[1][2][3][4]" in out["error"], out
    x[0, 0, 0, 0] = 1.5
    code, out = call(f"{base}/predict", json.dumps({"instances": x.tolist()}).encode())
    assert code == 422 and "outside [0, 1] at instances[0][0][0][0]" in out["error"], out


def test_body_limit_and_content_type(server):
    base, _ = server
    import http.client
    import urllib.parse
    url = urllib.parse.urlsplit(base)
    big = json.dumps({"instances": images(80).tolist()}).encode()   # about 1.8 MB > 1 MiB
    assert len(big) > 2**20
    # refused from its Content-Length alone, before the body is sent
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(big)))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "limit" in json.loads(resp.read())["error"]
    conn.close()
    # the same body without Content-Length (chunked): refused once 1 MiB has streamed in
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("POST", "/predict", iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                     {"Content-Type": "application/json"}, encode_chunked=True)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while the rest was still being sent
    resp = conn.getresponse()
    assert resp.status == 413 and "limit" in json.loads(resp.read())["error"]
    conn.close()
    code, out = call(f"{base}/predict", b"x=1", "application/x-www-form-urlencoded")
    assert code == 415 and "Content-Type" in out["error"]
    assert call(f"{base}/ready")[0] == 200    # the server survives all of it


def test_bounded_load_with_micro_batching(server):
    base, _ = server
    before = call(f"{base}/health")[1]["batching"]
    result = run_load(base, requests=200, threads=4, images_per_request=2)
    print("\nserving load:", describe(result))
    after = call(f"{base}/health")[1]["batching"]
    print("micro-batching:", after)
    assert result["statuses"] == {200: 200}, (result["statuses"], result["failures"])
    # every request went through the batcher, each image once
    assert after["requests"] - before["requests"] == 200 and after["images"] - before["images"] == 400
    assert after["largest_batch"] <= 32


def test_predict_from_the_registry_outside_the_project_is_one_line_and_makes_no_store(tmp_path, monkeypatch, capsys):
    """`robustkd-predict --model models:/...` where there is no MLflow store: one line naming it and the
    fix, exit 2, and no empty mlflow.db left behind (MLflow would create one)."""
    from PIL import Image

    from pipeline.predict import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    with pytest.raises(SystemExit) as err:
        main(["--model", "models:/robustkd-student@champion", "x.png"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and "no MLflow store at" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
