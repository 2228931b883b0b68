"""The GPU benchmark of issue 17 in one command, sized for a few minutes of GPU time:

    make benchmark-gpu                       # = python -m benchmarks.gpu  (paper preset, CUDA)
    python -m benchmarks.bench --gpu         # the same, through the main benchmark's driver
    python -m benchmarks.gpu --device cpu --preset cpu --timed-steps 1   # a smoke run anywhere

Paper preset: ResNet-18 student, WRN-34-10 teacher, batch 128, n = 10 attack steps. Cases, in
order of importance (a time budget, ``--budget-s``, skips what does not fit and says so):

- ``matmul``: the measured bf16 matmul throughput (the denominator of "fraction of peak");
- ``darwin_default``: DARWIN as training runs it now, the fast path chosen by ``run.precision:
  auto``, ``run.channels_last: auto``, ``run.compile: auto`` (robustkd.capability: bf16 autocast
  with losses in float32, channels_last, compiled student where the probes pass);
- ``darwin_fp32_eager``: the former defaults;
- ``methods``: every student method of the registry and the TRADES teacher on the fast path,
  in one process (one compiled student, re-initialised per method), for the full-run hours;
- ``darwin_bf16_cl_eager``: bf16 + channels_last without compile; ``darwin_reduce_overhead``:
  the fast path with CUDA graphs (``run.compile_mode: reduce-overhead``); ``darwin_fast_b512``:
  the fast path at batch 512.

Each group runs in its own process (a crash is reported as a failed case, with the signal's
name, and the others still run). FLOPs per step are counted from the passes of one eager step
(``benchmarks.common.PassCounter``: forward = 1, backward = 2 forwards), so "fraction of the
FLOP limit" is the step's images/s over the images/s the measured bf16 peak would allow.
Full-run hours: 50,000 images x the method's official epochs / images/s (one GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "paper": {"student": "resnet18", "teacher": "wrn34_10", "batch": 128, "steps": 10, "train_images": 50000},
    "cpu": {"student": "resnet10_w8", "teacher": "resnet10_w16", "batch": 32, "steps": 2, "train_images": 3000},
}
# (name, precision, channels_last, compile, compile_mode, batch multiplier)
DARWIN_CASES = [
    ("darwin_default", "auto", "auto", "auto", "default", 1),
    ("darwin_fp32_eager", "fp32", False, False, "default", 1),
    ("darwin_bf16_cl_eager", "bf16", True, False, "default", 1),
    ("darwin_reduce_overhead", "auto", "auto", "auto", "reduce-overhead", 1),
    ("darwin_fast_b512", "auto", "auto", "auto", "default", 4),
]
# In order of importance: the run stops starting cases when --budget-s is spent.
GROUPS = ["matmul", "darwin_default", "darwin_fp32_eager", "methods", "darwin_bf16_cl_eager",
          "darwin_reduce_overhead", "darwin_fast_b512"]


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _batch(n: int, device, channels_last: bool):
    import torch

    from robustkd.data import Batch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % 10
    xp = torch.rand(n, 3, 32, 32, generator=g)
    yp = (y + 1 + torch.randint(0, 9, (n,), generator=g)) % 10
    b = Batch(x.to(device), y.to(device), xp.to(device), yp.to(device), index=torch.arange(n, device=device))
    if channels_last:
        b.x = b.x.contiguous(memory_format=torch.channels_last)
        b.x_pair = b.x_pair.contiguous(memory_format=torch.channels_last)
    return b


def _flops_per_step(method: str, student, teacher, batch: int, device, steps: int) -> float | None:
    """FLOPs of one step from the passes of one eager fp32 step on a small batch."""

    from benchmarks.common import PassCounter, counted_models, estimate_flops, trains_teacher
    from robustkd.utils import make_generator

    small = min(batch, 16)
    model = teacher if trains_teacher(method) else student
    obj = _objective(method, steps, 4096, student, teacher).to(device)
    counter = PassCounter(counted_models(method, student, teacher), small)
    counter.enabled = True
    import warnings

    try:
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss, _ = obj(model.train(), teacher, _batch(small, device, False), generator=make_generator(0, device))
        loss.backward()
    finally:
        counter.remove()
    model.zero_grad(set_to_none=True)
    counts = dict(counter.counts)
    return estimate_flops(counts, student, teacher, method, batch, device)


def _objective(method: str, steps: int, pool: int, student, teacher):
    """``method``'s objective; GACD's memory bank over a pool of the training set's size."""
    import torch

    from robustkd.methods import DataInfo, attack_steps, create_objective

    return create_objective(method, attack_steps(method, steps), data=DataInfo(10, torch.arange(pool) % 10,
                                                            student.feature_dim, teacher.feature_dim))


def measure(method: str, preset: dict, device, precision, channels_last, compile_, compile_mode, batch: int,
            timed_steps: int, student=None, teacher=None, compiled_cache: dict | None = None) -> dict:
    """Images/s of ``method``'s training step under the resolved fast path (the Trainer's step:
    loss, backward, SGD step; no host synchronisation inside the timed steps)."""
    import torch

    from benchmarks.common import trains_teacher
    from robustkd.capability import resolve_fast_path
    from robustkd.models import create_model
    from robustkd.utils import autocast, make_generator

    torch.manual_seed(0)
    student = student or create_model(preset["student"], 10).to(device)
    teacher = teacher or create_model(preset["teacher"], 10).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    fast = resolve_fast_path(device, precision, channels_last, compile_, compile_mode)
    model = teacher if trains_teacher(method) else student
    if trains_teacher(method):
        for p in teacher.parameters():
            p.requires_grad_(True)
    flops = _flops_per_step(method, student, teacher, batch, device, preset["steps"])
    if fast.channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    run_model = model
    if fast.compile:
        key = (id(model), fast.compile_mode)
        if compiled_cache is not None and key in compiled_cache:
            run_model = compiled_cache[key]
        else:
            run_model = torch.compile(model, mode=None if fast.compile_mode == "default" else fast.compile_mode,
                                      dynamic=False)   # as the Trainer: one graph per shape
            if compiled_cache is not None:
                compiled_cache[key] = run_model
    obj = _objective(method, preset["steps"], preset["train_images"], student, teacher).to(device)
    opt = torch.optim.SGD(list(model.parameters()) + list(obj.parameters()), lr=0.01, momentum=0.9)
    data = _batch(batch, device, fast.channels_last)
    amp = lambda: autocast(device, fast.bf16)  # noqa: E731
    model.train()

    graphs = fast.compile and fast.compile_mode == "reduce-overhead" and device.type == "cuda"

    def step(i):
        if graphs:   # CUDA graph trees: one generation per training step, as the Trainer does
            torch.compiler.cudagraph_mark_step_begin()
        loss, _ = obj(run_model, teacher, data, generator=make_generator(i, device), autocast=amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    first = step(0)
    step(1)   # reduce-overhead records its graphs on a later call
    _sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(timed_steps):
        last = step(i + 2)
    _sync(device)
    elapsed = time.perf_counter() - t0
    out = {"method": method, "batch": batch, "images_per_s": timed_steps * batch / elapsed,
           "step_s": elapsed / timed_steps, "warmup_s": warm_s, "fast_path": fast.describe(),
           "fast_path_notes": fast.notes, "loss_step1": float(first.detach()), "loss_last": float(last.detach()),
           "flops_per_step": flops}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run_group(group: str, args) -> list[dict]:
    import torch

    from robustkd.methods import DISTILL_METHODS
    from robustkd.utils import select_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    preset = PRESETS[args.preset]
    if group == "matmul":
        from benchmarks.common import matmul_case

        return [matmul_case(device)]
    if group == "methods":
        from robustkd.models import create_model

        torch.manual_seed(0)
        student = create_model(preset["student"], 10).to(device)
        teacher = create_model(preset["teacher"], 10).to(device).eval()
        s0 = {k: v.clone() for k, v in student.state_dict().items()}
        t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
        cache: dict = {}
        results = []
        for method in args.methods or [*DISTILL_METHODS, "trades"]:
            student.load_state_dict(s0)
            teacher.load_state_dict(t0)
            try:
                r = measure(method, preset, device, "auto", "auto", "auto", "default", preset["batch"],
                            args.timed_steps, student=student, teacher=teacher, compiled_cache=cache)
            except Exception as exc:  # noqa: BLE001 - reported per method, the others still run
                r = {"method": method, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            r["case"] = f"method_{method}"
            results.append(r)
            # each finished case at once: a group stopped by the budget still reports these
            print(CASE_PREFIX + json.dumps(r), flush=True)
            print(f"# {r['case']}: {r.get('images_per_s', r.get('error'))}", file=sys.stderr, flush=True)
        return results
    name, precision, cl, comp, mode, mult = next(c for c in DARWIN_CASES if c[0] == group)
    r = measure("darwin", preset, device, precision, cl, comp, mode, preset["batch"] * mult, args.timed_steps)
    r["case"] = group
    return [r]


CASE_PREFIX = "CASE "   # a finished case of a group, printed as soon as it is measured


def finished_cases(stdout) -> list[dict]:
    """The cases a group printed before it ended (or was stopped)."""
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    return [json.loads(ln[len(CASE_PREFIX):]) for ln in (stdout or "").splitlines() if ln.startswith(CASE_PREFIX)]


def _child(group: str, args, timeout_s: float) -> list[dict]:
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--group", group, "--preset", args.preset,
           "--device", args.device, "--timed-steps", str(args.timed_steps), "--threads", str(args.threads)]
    if getattr(args, "methods", None):
        cmd += ["--methods", *args.methods]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired as exc:
        wall = time.perf_counter() - start
        done = finished_cases(exc.stdout)
        for r in done:
            r["wall_s"] = wall
        return done + [{"case": group if not done else f"{group}_rest",
                        "error": f"timeout after {timeout_s:.0f} s ({len(done)} case(s) of the group finished)",
                        "wall_s": wall}]
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        if proc.returncode < 0:
            try:
                cause = f"killed by {signal.Signals(-proc.returncode).name}"
            except ValueError:
                cause = f"killed by signal {-proc.returncode}"
        else:
            lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            cause = f"exit {proc.returncode}: {lines[-1][:300] if lines else 'no output'}"
        return [{"case": group, "error": cause, "wall_s": wall}]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    results = json.loads(lines[-1]) if lines else [{"case": group, "error": "no result printed"}]
    for r in results:
        r["wall_s"] = wall
    return results


def summarise(results: list[dict], preset: dict) -> tuple[str, dict]:
    from robustkd.methods import get_method

    by = {r["case"]: r for r in results}
    peak = by.get("matmul", {}).get("tflops")
    lines = ["| case | images/s | vs fp32 eager | fraction of FLOP limit | TFLOP/s | peak GiB | full run h | path |",
             "|---|---|---|---|---|---|---|---|"]
    base = by.get("darwin_fp32_eager", {}).get("images_per_s")
    summary = {"bf16_matmul_tflops": peak}
    for r in results:
        if r["case"] == "matmul":
            continue
        if "error" in r:
            lines.append(f"| {r['case']} | {r['error']} | | | | | | |")
            continue
        ips = r["images_per_s"]
        method = r.get("method", "darwin")
        flops = r.get("flops_per_step")
        tflops = flops * ips / r["batch"] / 1e12 if flops else None
        limit = peak * 1e12 / (flops / r["batch"]) if flops and peak else None   # images/s at the peak
        frac = ips / limit if limit else None
        sched = get_method(method).schedules.get("cifar10")
        hours = preset["train_images"] * sched.epochs / ips / 3600 if sched else None
        r.update({"tflops": tflops, "flop_limit_images_per_s": limit, "fraction_of_flop_limit": frac,
                  "full_run_hours": hours, "epochs": sched.epochs if sched else None})
        rel = f"{ips / base:.2f}x" if base else "-"
        fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        lines.append(f"| {r['case']} | {ips:.0f} | {rel} | {fmt(frac, '.1%')} | {fmt(tflops, '.1f')} | "
                     f"{fmt(r.get('peak_gib'), '.1f')} | {fmt(hours, '.2f')} | {r['fast_path']} |")
    if "darwin_default" in by and "images_per_s" in by["darwin_default"]:
        d = by["darwin_default"]
        summary.update({"darwin_default_images_per_s": d["images_per_s"],
                        "darwin_default_fraction_of_flop_limit": d.get("fraction_of_flop_limit"),
                        "darwin_default_full_run_hours": d.get("full_run_hours")})
    return "\n".join(lines), summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    p.add_argument("--device", default="cuda")
    p.add_argument("--timed-steps", type=int, default=5, help="timed steps per case, after 2 warm-up steps")
    p.add_argument("--groups", nargs="+", choices=GROUPS, help="subset of the cases (default: all)")
    p.add_argument("--budget-s", type=float, default=280, help="the whole run's time; cases past it are skipped")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", help="JSON file (default: benchmarks/results-gpu-fastpath.json)")
    p.add_argument("--methods", nargs="+", help="the methods group's methods (default: every student method "
                   "and the TRADES teacher)")
    p.add_argument("--group", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.group:
        import warnings

        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        print(json.dumps(run_group(args.group, args)))
        return
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("benchmark-gpu: no CUDA device here (torch.cuda.is_available() is False); "
                         "for a smoke run on this machine: python -m benchmarks.gpu --device cpu --preset cpu")
    preset = PRESETS[args.preset]
    machine = {"platform": platform.platform(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "date": time.strftime("%Y-%m-%d")}
    print(f"GPU benchmark, preset {args.preset} ({preset['student']} student, {preset['teacher']} teacher, "
          f"batch {preset['batch']}, n = {preset['steps']}), {args.timed_steps} timed steps per case, "
          f"on {machine}", flush=True)
    deadline = time.perf_counter() + args.budget_s
    results = []
    for group in args.groups or GROUPS:
        left = deadline - time.perf_counter()
        if left < 10:
            results.append({"case": group, "error": f"skipped: the {args.budget_s:.0f} s budget was spent"})
            print(f"  {group}: skipped (budget)", flush=True)
            continue
        for r in _child(group, args, left):
            results.append(r)
            brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                     if k in ("images_per_s", "tflops", "peak_gib", "warmup_s", "error", "wall_s", "fast_path")}
            print(f"  {r['case']}: {brief}", flush=True)
    text, summary = summarise(results, preset)
    summary["wall_s"] = args.budget_s - (deadline - time.perf_counter())
    report = {"preset": args.preset, "settings": preset, "machine": machine, "results": results, "summary": summary}
    out = write_report(report, Path(args.out or "benchmarks/results-gpu-fastpath.json"), text, summary)
    print(f"written to {out}")


def write_report(report: dict, out: Path, text: str, summary: dict) -> Path:
    """The JSON report written to ``out``; the table and the summary printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(text)
    print()
    print(json.dumps(summary, indent=2))
    return out


if __name__ == "__main__":
    main()
