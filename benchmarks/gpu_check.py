"""The GPU check of issue 25 in one command that fits in a device lease (8 minutes on one GPU):

    make gpu-check                                   # = python3 -m benchmarks.gpu_check (CUDA)
    python -m benchmarks.gpu_check --device cpu --budget-s 120   # the CI smoke run anywhere

No network, no setup step: it runs on the Python whose torch is already there (``GPU_PY`` in the
Makefile; pytest is needed for the tier, numpy, and timm for the AT-PRM case). Two parts, each
inside its share of ``--budget-s``:

1. the GPU test tier, ``pytest -m gpu tests/test_gpu.py`` (skipped without CUDA): one training
   step of every registry method and the TRADES and AT-PRM teachers on the fast path, compiled
   against eager loss and gradients, no host synchronisation in a DARWIN step, DDP with NCCL at
   one rank, evaluation compiled against eager on 256 images; at most ``--tier-s`` (200 s);
2. the benchmark (benchmarks/gpu.py) with what is left: the bf16 matmul peak, DARWIN on the
   default path, DARWIN in fp32 eager, RSLAD and TRADES on the fast path; images/s, fraction of
   the FLOP limit, peak GiB, full-run hours. A group stopped by the budget reports the cases it
   finished; the groups it never started are listed as skipped.

Writes benchmarks/results-gpu-check.json (``--out``) and prints the tier's counts and the table.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu  # noqa: E402

GROUPS = ["matmul", "darwin_default", "darwin_fp32_eager", "methods"]
METHODS = ["rslad", "trades"]
OUTCOME = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def tier_counts(output: str) -> dict:
    """Counts of a ``pytest -v`` run's outcomes (also of a run stopped before its end)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failures = []
    for line in output.splitlines():
        m = OUTCOME.match(line.strip())
        if not m:
            continue
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(m.group(2), "skipped")
        counts[key] += 1
        if key in ("failed", "errors"):
            failures.append(m.group(1))
    return {**counts, "failures": failures}


def run_tier(timeout_s: float) -> dict:
    """``pytest -m gpu`` in a child, stopped after ``timeout_s`` (then the finished tests count)."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"error": "pytest is not installed for this Python: the GPU tier did not run", "seconds": 0.0}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-v", "-p", "no:cacheprovider",
           "-p", "no:xdist", "-p", "no:logging"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout_s, 1))
        output, timed_out, rc = proc.stdout + proc.stderr, False, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        output, timed_out, rc = out.decode(errors="replace") if isinstance(out, bytes) else out, True, None
    result = {**tier_counts(output), "timed_out": timed_out, "returncode": rc,
              "seconds": round(time.perf_counter() - start, 1)}
    summary = [ln for ln in output.splitlines() if re.match(r"^=+ .*(passed|failed|skipped|error).* =+$", ln)]
    result["summary"] = summary[-1].strip("= ") if summary else ("stopped by the tier's time" if timed_out else "")
    if rc not in (0, 5, None) and not (result["failed"] or result["errors"]):   # 5: nothing collected
        result["tail"] = output.strip().splitlines()[-5:]
    return result


def run_benchmark(args, budget_s: float) -> tuple[list[dict], str, dict]:
    """The benchmark's groups, each in its own child, until ``budget_s`` is spent."""
    bench_args = argparse.Namespace(preset=args.preset, device=args.device, timed_steps=args.timed_steps,
                                    threads=args.threads, methods=METHODS)
    deadline = time.perf_counter() + budget_s
    results: list[dict] = []
    for group in GROUPS:
        left = deadline - time.perf_counter()
        if left < 5:
            results.append({"case": group, "error": "skipped: the check's budget was spent"})
            print(f"  {group}: skipped (budget)", flush=True)
            continue
        for r in gpu._child(group, bench_args, left):
            results.append(r)
            if "images_per_s" in r:
                brief = f"{r['images_per_s']:.1f} images/s ({r.get('fast_path')})"
            elif "tflops" in r:
                brief = f"{r['tflops']:.3g} TFLOP/s (bf16 matmul)"
            else:
                brief = r.get("error", "")
            print(f"  {r['case']}: {brief}", flush=True)
    text, summary = gpu.summarise(results, gpu.PRESETS[args.preset])
    return results, text, summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", choices=sorted(gpu.PRESETS), help="default: paper on CUDA, cpu elsewhere")
    p.add_argument("--budget-s", type=float, default=480, help="the whole check's time (default 8 minutes)")
    p.add_argument("--tier-s", type=float, default=200, help="at most this much of it for the test tier")
    p.add_argument("--timed-steps", type=int, help="timed steps per case (default: 5 on CUDA, 1 elsewhere)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results-gpu-check.json"))
    args = p.parse_args(argv)
    import torch

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device here (torch.cuda.is_available() is False); "
                         "the smoke run on this machine: python -m benchmarks.gpu_check --device cpu --budget-s 120")
    args.preset = args.preset or ("paper" if cuda else "cpu")
    args.timed_steps = args.timed_steps or (5 if cuda else 1)
    start = time.perf_counter()
    machine = {"platform": platform.platform(), "python": sys.executable, "torch": torch.__version__,
               "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
               "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    print(f"gpu-check on {machine}, budget {args.budget_s:.0f} s", flush=True)
    tier_s = min(args.tier_s, 0.45 * args.budget_s)
    print(f"1. GPU test tier (pytest -m gpu, at most {tier_s:.0f} s)", flush=True)
    tier = run_tier(tier_s)
    print(f"   {tier.get('summary') or tier.get('error')}: passed {tier.get('passed', 0)}, failed "
          f"{tier.get('failed', 0)}, errors {tier.get('errors', 0)}, skipped {tier.get('skipped', 0)} "
          f"in {tier['seconds']:.0f} s" + (" (stopped by its time)" if tier.get("timed_out") else ""), flush=True)
    for name in tier.get("failures", []):
        print(f"   FAILED {name}", flush=True)
    left = args.budget_s - (time.perf_counter() - start)
    print(f"2. benchmark (preset {args.preset}, {args.timed_steps} timed steps per case, {left:.0f} s left)",
          flush=True)
    results, text, summary = run_benchmark(args, left)
    report = {"machine": machine, "budget_s": args.budget_s, "tier": tier, "preset": args.preset,
              "settings": gpu.PRESETS[args.preset], "results": results, "summary": summary,
              "wall_s": round(time.perf_counter() - start, 1)}
    out = gpu.write_report(report, Path(args.out), text, summary)
    print(f"gpu-check: {report['wall_s']:.0f} s in all; written to {out}")
    return report


if __name__ == "__main__":
    main()
