"""`make gpu-check` (benchmarks/gpu_check.py) as CI runs it: the smoke run on a CPU within its budget.

The GPU tier is collected and skipped (no CUDA), the benchmark's groups run on the CPU preset, and
the JSON report names every group: measured, or skipped by the budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "results-gpu-check.json"
    env = {**os.environ, "ROBUSTKD_PROBE_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--budget-s", "120",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    tier = report["tier"]
    assert tier["skipped"] >= 10 and tier["failed"] == tier["errors"] == 0 and not tier["timed_out"], tier
    cases = {r["case"] for r in report["results"]}
    assert {"matmul", "darwin_default", "darwin_fp32_eager"} <= cases
    assert "method_rslad" in cases or any(c.startswith("methods") for c in cases)   # measured or skipped
    default = next(r for r in report["results"] if r["case"] == "darwin_default")
    assert default["images_per_s"] > 0 and default["fraction_of_flop_limit"] > 0 and default["full_run_hours"] > 0
    assert report["wall_s"] < 120 + 30        # the budget holds (children stopped at it)
    assert "gpu-check:" in proc.stdout and "| darwin_default |" in proc.stdout
