"""Speed and memory of DARWIN training and robustness evaluation, measured side by side.

    make benchmark                              # CPU profile: resnet10_w8 student, resnet10_w16 teacher
    python -m benchmarks.bench --preset paper   # GPU: ResNet-18 student, WRN-34-10 teacher

Every case runs in its own process (same data, same initial weights, same seed), so each one's
peak memory is its own: peak resident memory above the process's baseline on CPUs, peak CUDA
memory allocated on GPUs. The cases run in interleaved rounds (``--rounds``, A B C, A B C, ...),
so that a busy spell of a shared machine slows every case alike; the table gives the median of
each figure and of each ratio (ratios taken within a round) with its min-max over the rounds. A
case killed by a signal, failing or timing out (``--case-timeout``) is reported with its signal
or error and the last lines of its error output; the other cases still run. Prints a table and
writes JSON (``--out``).

Cases
- training steps (images/s): DARWIN n=10 (the project's defaults), the straightforward DARWIN of
  ``tests/darwin_reference.py`` (each branch, path point and weight its own forward), DARWIN's
  implementation options (batching joint/split, joint BN, bf16, channels_last, torch.compile),
  RSLAD and TRADES (the teacher's objective, on the teacher) at the same attack length; the loss of
  the first step, and the forward/backward passes each makes per batch, counted in units of one
  batch through one model;
- evaluation (images/s): PGD-20, CW-inf (30 steps), AutoAttack standard, on the trained
  student when ``models/student.pt`` exists (a random network is broken at once and would flatter
  AutoAttack);
- inference latency of the ONNX student, onnxruntime against torch eager, batch 1 and 256.
On GPUs also: the measured bf16 matmul throughput, the fraction of it DARWIN's step reaches
(FLOPs counted by torch.utils.flop_counter) and the GPU-hours of a full CIFAR-10 DARWIN run.
"""

from __future__ import annotations

import argparse
import functools
import warnings
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (PassCounter, PeakMemory, counted_models, estimate_flops,  # noqa: E402
                               matmul_case, sync, trains_teacher)

PRESETS = {
    "cpu": {"student": "resnet10_w8", "teacher": "resnet10_w16", "batch": 128, "steps": 10,
            "timed_steps": 2, "eval_images": 100, "aa_images": 100, "train_images": 3000, "epochs": 6},
    "paper": {"student": "resnet18", "teacher": "wrn34_10", "batch": 128, "steps": 10,
              "timed_steps": 10, "eval_images": 1000, "aa_images": 500, "train_images": 50000,
              "epochs": 200},
}
TRAIN_CASES = ["darwin", "darwin_reference", "darwin_batching_joint", "darwin_batching_split",
               "darwin_joint_bn", "darwin_bf16", "darwin_channels_last", "darwin_compile", "rslad",
               "rslad_channels_last", "trades"]
EVAL_CASES = ["pgd20", "cw", "autoattack"]


def registry_cases() -> list[str]:
    """One training case per student method of the registry (robustkd.methods): a method added
    there is benchmarked without editing this file."""
    from robustkd.methods import DISTILL_METHODS

    return [f"method_{m}" for m in DISTILL_METHODS]


def all_train_cases() -> list[str]:
    return TRAIN_CASES + registry_cases()




def build(preset: dict, device, student_path: str | None = None, teacher_path: str | None = None):
    import torch

    from robustkd.checkpoints import load_checkpoint
    from robustkd.models import create_model

    torch.manual_seed(0)
    student = (load_checkpoint(student_path) if student_path else create_model(preset["student"], 10)).to(device)
    teacher = (load_checkpoint(teacher_path) if teacher_path else create_model(preset["teacher"], 10)).to(device)
    return student, teacher.eval()


def fixed_batch(batch: int, device):
    import torch

    from robustkd.data import Batch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g)
    y = torch.arange(batch) % 10
    xp = torch.rand(batch, 3, 32, 32, generator=g)
    yp = (y + 1 + torch.randint(0, 9, (batch,), generator=g)) % 10
    return Batch(x.to(device), y.to(device), xp.to(device), yp.to(device))


def train_case(case: str, preset: dict, device) -> dict:
    import torch

    from robustkd.methods import DataInfo, attack_steps, create_objective
    from tests.darwin_reference import darwin_loss_reference
    from robustkd.utils import autocast, make_generator

    student, teacher = build(preset, device)
    n = preset["steps"]
    batch = fixed_batch(preset["batch"], device)
    bf16 = case == "darwin_bf16"
    amp = lambda: autocast(device, bf16)  # noqa: E731
    method = case[len("method_"):] if case.startswith("method_") else case.split("_")[0]
    settings = attack_steps(method, n)
    if case.startswith("darwin_batching_"):
        settings["batching"] = case.rsplit("_", 1)[1]
    if case == "darwin_joint_bn":
        settings["loss_forward"] = "joint"
    model = teacher.train() if trains_teacher(method) else student.train()
    pool = torch.arange(preset["batch"]) % 10
    batch.index = torch.arange(preset["batch"], device=device)
    objective = create_objective(method, settings,
                                 data=DataInfo(10, pool, student.feature_dim, teacher.feature_dim)).to(device)
    if case.endswith("_channels_last"):
        model.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
        batch.x = batch.x.contiguous(memory_format=torch.channels_last)
        batch.x_pair = batch.x_pair.contiguous(memory_format=torch.channels_last)
    compiled = model
    compile_s = None
    if case == "darwin_compile":
        compiled = torch.compile(model)

    def step(gen):
        if case == "darwin_reference":
            loss, parts = darwin_loss_reference(model, teacher, batch.x, batch.y, batch.x_pair, batch.y_pair,
                                                objective.config, generator=gen)
        else:
            loss, parts = objective(compiled, teacher, batch, generator=gen, autocast=amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item(), {k: float(v) for k, v in parts.items()}

    opt = torch.optim.SGD(list(model.parameters()) + list(objective.parameters()), lr=0.01, momentum=0.9)
    counter = PassCounter(counted_models(method, student, teacher), preset["batch"])
    counter.enabled = True
    mem = PeakMemory(device).__enter__()  # from before the first step: its allocations are the peak's
    t0 = time.perf_counter()
    first_loss, first_parts = step(make_generator(0, device))  # warm-up, and the loss of step 1
    sync(device)
    if case == "darwin_compile":
        compile_s = time.perf_counter() - t0
    counter.enabled = False
    counts = dict(counter.counts)
    counter.remove()
    flops = estimate_flops(counts, student, teacher, method, preset["batch"], device)
    timed = preset["timed_steps"]
    sync(device)
    t0 = time.perf_counter()
    for i in range(timed):
        step(make_generator(i + 1, device))
    sync(device)
    elapsed = time.perf_counter() - t0
    mem.__exit__(None, None, None)
    out = {"case": case, "kind": "train", "images_per_s": timed * preset["batch"] / elapsed,
           "step_s": elapsed / timed, "loss_step1": first_loss, "parts_step1": first_parts,
           "passes": counts, "peak_mib": mem.peak_mib}
    if compile_s is not None:
        out["compile_and_first_step_s"] = compile_s
    if flops is not None:
        out["flops_per_step"] = flops
    return out


def eval_case(case: str, preset: dict, device, student_path: str | None) -> dict:

    from robustkd.evaluation import EvalConfig, run_attack

    student, _ = build(preset, device, student_path=student_path)
    student.eval()
    count = preset["aa_images"] if case == "autoattack" else preset["eval_images"]
    x, y = load_test_images(count)
    cfg = EvalConfig(attacks=[case], batch_size=min(count, 500), checks=False)
    with PeakMemory(device) as mem:
        run_attack(student, x[:8], y[:8], case, EvalConfig(attacks=[case], batch_size=8, checks=False), device)
        sync(device)
        t0 = time.perf_counter()
        correct = run_attack(student, x, y, case, cfg, device)
        sync(device)
        elapsed = time.perf_counter() - t0
    return {"case": case, "kind": "eval", "images_per_s": len(x) / elapsed, "images": len(x),
            "accuracy": 100.0 * correct.float().mean().item(), "peak_mib": mem.peak_mib,
            "model": student_path or "random init"}


def load_test_images(count: int):
    """The first ``count`` CIFAR-10 test images, 10 classes in turn (random images without the data)."""
    import torch

    from robustkd.data import load_image_folder, stratified_first_k, to_float

    root = ROOT.parent / "shared/datasets/cifar10"
    if (root / "test").is_dir():
        test = load_image_folder(root / "test", per_class=-(-count // 10))
        idx = stratified_first_k(test.labels, -(-count // 10), test.num_classes)[:count]
        return to_float(test.images[idx]), test.labels[idx]
    g = torch.Generator().manual_seed(0)
    return torch.rand(count, 3, 32, 32, generator=g), torch.arange(count) % 10


def onnx_case(preset: dict, device, student_path: str | None) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from services.onnx_export import INPUT_NAME, OUTPUT_NAME, export, median_latency_ms

    student, _ = build(preset, torch.device("cpu"), student_path=student_path)
    student.eval()
    out = {"case": "onnx", "kind": "onnx", "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "student.onnx"
        export(student, path, 18, {})
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for bs in (1, 256):
            xb = torch.rand(bs, 3, 32, 32)
            xn = xb.numpy()
            with torch.no_grad():
                with PeakMemory(torch.device("cpu")) as m_t:
                    t_torch = median_latency_ms(lambda: student(xb), 30 if bs == 1 else 10)
            with PeakMemory(torch.device("cpu")) as m_o:
                t_ort = median_latency_ms(lambda: session.run([OUTPUT_NAME], {INPUT_NAME: xn}), 30 if bs == 1 else 10)
            with torch.no_grad():
                diff = float(np.abs(student(xb).numpy() - session.run([OUTPUT_NAME], {INPUT_NAME: xn})[0]).max())
            out[f"batch{bs}"] = {"torch_ms": t_torch, "onnxruntime_ms": t_ort, "speedup": t_torch / t_ort,
                                 "torch_peak_mib": m_t.peak_mib, "onnxruntime_peak_mib": m_o.peak_mib,
                                 "max_abs_diff": diff}
    return out


def run_case(args) -> dict:
    import torch

    from robustkd.utils import select_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    preset = PRESETS[args.preset]
    if args.case in all_train_cases():
        return train_case(args.case, preset, device)
    if args.case in EVAL_CASES:
        return eval_case(args.case, preset, device, args.student)
    if args.case == "onnx":
        return onnx_case(preset, device, args.student)
    if args.case == "matmul":
        return matmul_case(device)
    raise SystemExit(f"unknown case {args.case}")


# ---------------------------------------------------------------- driver
def case_command(case: str, args) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.bench", "--case", case, "--preset", args.preset,
           "--device", args.device, "--threads", str(args.threads)]
    if args.student:
        cmd += ["--student", args.student]
    return cmd


def last_lines(text: str, count: int = 5) -> list[str]:
    """The last ``count`` non-empty lines of a process's output (none when it printed nothing)."""
    return [line.rstrip()[:300] for line in (text or "").splitlines() if line.strip()][-count:]


def run_command(case: str, cmd: list[str], timeout: float) -> dict:
    """Run one case's process; its result, or a record of how it failed: killed by a signal
    (named), an error exit or a timeout, with the last lines of its error output."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        return {"case": case, "error": f"timed out after {timeout:g} s", "stderr_tail": last_lines(err),
                "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    tail = last_lines(proc.stderr) or last_lines(proc.stdout)
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return {"case": case, "error": f"killed by {name}", "signal": name, "stderr_tail": tail, "wall_s": wall}
    if proc.returncode != 0:
        what = tail[-1] if tail else "no error output"
        return {"case": case, "error": f"exit {proc.returncode}: {what}", "stderr_tail": tail, "wall_s": wall}
    try:
        result = json.loads([line for line in proc.stdout.splitlines() if line.strip()][-1])
    except (IndexError, ValueError):
        return {"case": case, "error": "exit 0 without a JSON result line", "stderr_tail": tail, "wall_s": wall}
    result["wall_s"] = wall
    return result


def run_in_subprocess(case: str, args) -> dict:
    return run_command(case, case_command(case, args), args.case_timeout)


def run_rounds(cases: list[str], rounds: int, run, log=functools.partial(print, flush=True)) -> list[list[dict]]:
    """Interleaved rounds (A B C, A B C, ...): a slow spell of the machine touches every case
    alike instead of one. A case that failed is not run again in later rounds."""
    out: list[list[dict]] = []
    failed: set[str] = set()
    for k in range(rounds):
        this = []
        for case in cases:
            if case in failed:
                continue
            r = run(case)
            r["round"] = k + 1
            this.append(r)
            if "error" in r:
                failed.add(case)
            brief = {key: (round(v, 3) if isinstance(v, float) else v) for key, v in r.items()
                     if key in ("images_per_s", "peak_mib", "loss_step1", "tflops", "error", "wall_s")}
            log(f"  round {k + 1}/{rounds} {case}: {brief}")
        out.append(this)
    return out


def _numbers(runs: list, path: tuple = ()) -> dict:
    """{path: [value per run]} of every numeric leaf the runs share (nested dicts walked)."""
    first = runs[0]
    out: dict = {}
    for key, value in first.items():
        if key in ("round",):
            continue
        values = [r.get(key) for r in runs]
        if isinstance(value, dict) and all(isinstance(v, dict) for v in values):
            out.update(_numbers(values, path + (key,)))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[path + (key,)] = [float(v) for v in values]
    return out


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def aggregate(case: str, runs: list[dict]) -> dict:
    """One case over its rounds: the first run's record with every number replaced by its median,
    ``spread`` giving median, min and max per number; a failure is kept as it was reported."""
    failures = [r for r in runs if "error" in r]
    if failures:
        return {**failures[0], "case": case, "rounds_ok": len(runs) - len(failures)}
    out = json.loads(json.dumps(runs[0]))
    out.pop("round", None)
    spreads = {}
    for path, values in _numbers(runs).items():
        target = out
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = statistics.median(values)
        spreads[".".join(path)] = spread(values)
    out["spread"] = spreads
    out["rounds_ok"] = len(runs)
    return out


def ratio_spreads(rounds_results: list[list[dict]], preset: dict) -> dict:
    """Each summary ratio computed within each round (cases of one round ran side by side), then
    its median and min-max over the rounds; and every training case's images/s against DARWIN's."""
    per_key: dict[str, list[float]] = {}
    for this in rounds_results:
        for key, value in summary(this, preset).items():
            per_key.setdefault(key, []).append(value)
        by = {r["case"]: r for r in this if "error" not in r}
        darwin = by.get("darwin", {}).get("images_per_s")
        for case, r in by.items():
            if darwin and r.get("kind") == "train":
                per_key.setdefault(f"vs_darwin.{case}", []).append(r["images_per_s"] / darwin)
    return {key: spread(values) for key, values in per_key.items()}


def fmt_spread(s: dict | None, digits: int = 1, suffix: str = "") -> str:
    if not s:
        return "-"
    text = f"{s['median']:.{digits}f}{suffix}"
    if s["n"] > 1:
        text += f" ({s['min']:.{digits}f}-{s['max']:.{digits}f})"
    return text


def failure_lines(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']}: {r['error']}" + (f" (round {r['round']})" if "round" in r else ""))
            lines += [f"    {line}" for line in r.get("stderr_tail", [])]
    return lines


def table(results: list[dict], preset: dict, ratios: dict | None = None) -> str:
    """Markdown tables: medians over the rounds with (min-max) where there were several."""
    ratios = ratios or {}
    by = {r["case"]: r for r in results}
    lines = ["| case | images/s | vs DARWIN | peak MiB | loss (step 1) | student fwd+bwd | teacher fwd | GFLOP/step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            if r.get("kind", "train") in ("train", "eval"):
                lines.append(f"| {r['case']} | **failed**: {r['error'][:120]} | | | | | | |")
            continue
        if r.get("kind") not in ("train", "eval"):
            continue
        sp = r.get("spread", {})
        p = r.get("passes", {})
        sf = p.get("student_fwd", p.get("model_fwd"))
        sb = p.get("student_bwd", p.get("model_bwd"))
        passes = f"{sf:.0f} + {sb:.0f}" if sf is not None else "-"
        teacher = f"{p['teacher_fwd']:.0f}" if "teacher_fwd" in p else "-"
        rel = fmt_spread(ratios.get(f"vs_darwin.{r['case']}"), 2, "x") if r["kind"] == "train" else "-"
        ips = fmt_spread(sp.get("images_per_s") or {"median": r["images_per_s"], "n": 1})
        peak = fmt_spread(sp.get("peak_mib") or {"median": r["peak_mib"], "n": 1}, 0)
        loss = f"{r['loss_step1']:.6f}" if "loss_step1" in r else f"acc {r.get('accuracy', 0):.1f}%"
        gflop = f"{r['flops_per_step'] / 1e9:.0f}" if "flops_per_step" in r else "-"
        lines.append(f"| {r['case']} | {ips} | {rel} | {peak} | {loss} | {passes} | {teacher} | {gflop} |")
    if "onnx" in by and "error" not in by["onnx"]:
        o = by["onnx"]
        sp = o.get("spread", {})
        lines += ["", "| ONNX student | torch eager ms | onnxruntime ms | speed-up | peak MiB torch / ORT |",
                  "|---|---|---|---|---|"]
        for bs in (1, 256):
            b = o[f"batch{bs}"]
            cell = lambda key, digits, suffix="": fmt_spread(  # noqa: E731
                sp.get(f"batch{bs}.{key}") or {"median": b[key], "n": 1}, digits, suffix)
            lines.append(f"| batch {bs} | {cell('torch_ms', 3)} | {cell('onnxruntime_ms', 3)} | "
                         f"{cell('speedup', 2, 'x')} | {b['torch_peak_mib']:.0f} / {b['onnxruntime_peak_mib']:.0f} |")
    if "matmul" in by and "error" not in by["matmul"]:
        m = by["matmul"]
        tf = fmt_spread(m.get("spread", {}).get("tflops") or {"median": m["tflops"], "n": 1}, 3)
        lines += ["", f"measured {m['dtype']} matmul throughput: {tf} TFLOP/s"]
    return "\n".join(lines)


def summary(results: list[dict], preset: dict) -> dict:
    by = {r["case"]: r for r in results if "error" not in r}
    out = {}
    if "darwin" in by and "darwin_reference" in by:
        d, ref = by["darwin"], by["darwin_reference"]
        out["darwin_vs_straightforward_speedup"] = d["images_per_s"] / ref["images_per_s"]
        out["loss_abs_difference"] = abs(d["loss_step1"] - ref["loss_step1"])
    if "darwin" in by and "rslad" in by:
        out["darwin_step_cost_vs_rslad"] = by["rslad"]["images_per_s"] / by["darwin"]["images_per_s"]
    if "onnx" in by:
        out["onnxruntime_speedup_batch1"] = by["onnx"]["batch1"]["speedup"]
    if "darwin" in by and "rslad" in by and "flops_per_step" in by["darwin"]:
        out["darwin_flops_vs_rslad"] = by["darwin"]["flops_per_step"] / by["rslad"]["flops_per_step"]
    if "darwin" in by and "matmul" in by and "flops_per_step" in by["darwin"]:
        achieved = by["darwin"]["flops_per_step"] / by["darwin"]["step_s"] / 1e12
        out["darwin_tflops"] = achieved
        out["fraction_of_matmul_peak"] = achieved / by["matmul"]["tflops"]
    if "darwin" in by:
        out["full_run_hours_estimate"] = preset["train_images"] * preset["epochs"] / by["darwin"]["images_per_s"] / 3600
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--cases", nargs="+", help="subset of cases (default: all)")
    p.add_argument("--student", help="trained student for evaluation/ONNX (default: models/student.pt if present)")
    p.add_argument("--out", help="JSON file (default: benchmarks/results-cpu.json or -gpu.json)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds of all cases (A B C, A B C, ...); medians and min-max (default 3)")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU benchmark of the fast path instead (benchmarks/gpu.py; make benchmark-gpu)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--case-timeout", type=int, default=1800, help="seconds before a case is stopped")
    args, rest = p.parse_known_args(argv)
    if args.gpu:   # its own options (--timed-steps, --groups, --budget-s) pass through
        from benchmarks import gpu

        return gpu.main(["--preset", "paper" if args.preset == "cpu" else args.preset, "--device",
                         "cuda" if args.device == "auto" else args.device, *rest])
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.case:
        # the pass counter's backward hooks warn when a module's input needs no gradient: expected
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        print(json.dumps(run_case(args)))
        return
    import torch

    if args.student is None and args.preset == "cpu" and (ROOT / "models/student.pt").exists():
        args.student = str(ROOT / "models/student.pt")
    cases = args.cases or (["matmul"] + all_train_cases() + EVAL_CASES + ["onnx"])
    preset = PRESETS[args.preset]
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(f"benchmark, preset {args.preset} ({preset['student']} student, {preset['teacher']} teacher, "
          f"batch {preset['batch']}, n = {preset['steps']}) on {machine}", flush=True)
    rounds_results = run_rounds(cases, max(args.rounds, 1), lambda case: run_in_subprocess(case, args))
    results = [aggregate(case, [r for this in rounds_results for r in this if r["case"] == case]) for case in cases]
    ratios = ratio_spreads(rounds_results, preset)
    report = {"preset": args.preset, "settings": preset, "machine": machine, "rounds": args.rounds,
              "results": results, "summary": {k: v["median"] for k, v in ratios.items() if "." not in k},
              "summary_spread": ratios, "per_round": rounds_results}
    out = Path(args.out or f"benchmarks/results-{'gpu' if machine['gpu'] else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(results, preset, ratios))
    print()
    print("summary over rounds: median (min-max)")
    for key, value in ratios.items():
        if "." not in key:
            print(f"  {key}: {fmt_spread(value, 3)}")
    failures = failure_lines(results)
    if failures:
        print("\nfailed cases (the others ran):")
        print("\n".join(failures))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
