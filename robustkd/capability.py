"""Capabilities probed, not assumed: bf16 autocast, channels_last and torch.compile are each tried
in a child process before a run turns them on, and the run's fast path is resolved from the
answers.

Why a child: a setting can kill the process that uses it. On a virtual machine whose CPU
advertises AMX/bf16 instructions the hypervisor does not grant, oneDNN's bf16 convolution dies
with SIGILL; a broken compiler toolchain can abort inside torch.compile. A probe that dies takes
only the child down; the parent names the setting, the device and the cause (the signal's name
or the exception's last line) in one line, or, where the user asked for ``auto``, falls back and
says so. Results are cached per process (one probe per setting and device), and passing results
also on disk (``$ROBUSTKD_PROBE_CACHE``, default ``~/.cache/robustkd/probes.json``; ``0``
disables it), keyed by the setting, the device's name, the CPU's model and flags, the torch and
CUDA versions and the Python executable: a DVC stage does not pay a probe that an earlier process
on the same machine and software passed. Failures are never cached (a fixed system recovers).

Test hook: ``ROBUSTKD_PROBE_FAULT="bf16=SIGILL,compile=error"`` makes the child of the named
setting kill itself with that signal (or raise, for ``error``) instead of probing, so the
handling of a crashing setting is tested on any machine.

Exclusive-process GPUs: a child cannot open a CUDA context while the parent holds one, so on a GPU
in an exclusive compute mode (``nvidia-smi``), or when a child answers "busy or unavailable", the
probe runs in this process (errors caught, crashes not); ``ROBUSTKD_PROBE_IN_PROCESS=1`` forces it.
A failed probe is printed on stderr and kept in ``FastPath.probe_failures`` (the run's record).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import torch

from .errors import InputError

SETTINGS = ("bf16", "channels_last", "compile")
FAULT_ENV = "ROBUSTKD_PROBE_FAULT"
TIMEOUT_ENV = "ROBUSTKD_PROBE_TIMEOUT_S"
CACHE_ENV = "ROBUSTKD_PROBE_CACHE"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")

_CACHE: dict[tuple[str, str, str], "ProbeResult"] = {}


@dataclass(frozen=True)
class ProbeResult:
    setting: str
    device: str
    ok: bool
    cause: str = ""      # "" when ok; "SIGILL", "timeout after 300 s", "RuntimeError: ..." otherwise
    seconds: float = 0.0


def device_name(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)`` / ``cpu``: what the messages call the device."""
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def _fault(setting: str, in_process: bool) -> None:
    """The test hook (``ROBUSTKD_PROBE_FAULT``); in the process itself a signal becomes an error."""
    fault = dict(item.split("=", 1) for item in os.environ.get(FAULT_ENV, "").split(",") if "=" in item)
    if setting in fault:
        what = fault[setting]
        if what == "error" or in_process:
            raise RuntimeError(f"injected fault for {setting} ({FAULT_ENV}: {what})")
        os.kill(os.getpid(), getattr(signal, what))


def _probe_body(setting: str, device_str: str, mode: str) -> None:
    """The probe itself: a tiny conv net under ``setting``, run as the training step runs it.

    Each iteration is one training step's pattern: an attack step (eval mode, parameters frozen,
    the gradient of the input only, robustkd.attacks) on the compiled model, then the loss's
    forward in train mode and its backward into the weights; under ``reduce-overhead`` a CUDA
    graph generation per step (``cudagraph_mark_step_begin``, as the Trainer does). Three
    iterations: reduce-overhead records its graphs on a later call. (The former probe took an
    input gradient and a weight gradient from one graph, a double backward no step runs.)"""
    from .attacks import frozen_parameters, model_modes

    device = torch.device(device_str)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(16, 10)).to(device)
    x = torch.rand(8, 3, 32, 32, device=device)
    y = torch.arange(8, device=device) % 10
    model = net
    if setting == "channels_last":
        net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if setting == "compile":
        model = torch.compile(net, mode=None if mode == "default" else mode, dynamic=False)
    graphs = setting == "compile" and mode == "reduce-overhead" and device.type == "cuda"

    def amp():
        return (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if setting == "bf16"
                else torch.autocast(device_type=device.type, enabled=False))

    finite = torch.ones((), dtype=torch.bool, device=device)
    for _ in range(3 if setting == "compile" else 1):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with model_modes([model], [False]), frozen_parameters(model):      # the attack step
            xr = x.clone().requires_grad_(True)
            with amp():
                out = model(xr)
            grad_x, = torch.autograd.grad(torch.nn.functional.cross_entropy(out.float(), y), xr)
        x_adv = (x + 2 / 255 * grad_x.sign()).clamp(0, 1)
        model.train()                                                        # the loss and its backward
        with amp():
            out = model(x_adv)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        net.zero_grad(set_to_none=True)
        loss.backward()
        finite = finite & torch.isfinite(loss) & torch.isfinite(grad_x).all()
    if not bool(finite):    # one host read, after the steps
        raise FloatingPointError(f"non-finite loss or gradient under {setting}")
    if device.type == "cuda":
        torch.cuda.synchronize()


def _child(setting: str, device_str: str, mode: str) -> None:
    _fault(setting, in_process=False)
    _probe_body(setting, device_str, mode)
    print("probe ok")


IN_PROCESS_ENV = "ROBUSTKD_PROBE_IN_PROCESS"   # 1: always probe in this process, 0: never, unset: auto
BUSY = "busy or unavailable"   # cudaErrorDevicesUnavailable: another process holds an exclusive GPU


def exclusive_compute(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA GPU in an exclusive compute mode (``nvidia-smi``, which does not
    touch CUDA in this process). There a child cannot open a context while the parent holds one,
    so every child probe would fail; the probes run in this process instead."""
    if device.type != "cuda":
        return False
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    index = device.index or 0
    which = visible[index] if index < len(visible) else str(index)
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=compute_mode", "--format=csv,noheader", "-i", which],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and "exclusive" in proc.stdout.lower()


def _in_process(setting: str, device: torch.device, mode: str) -> tuple[bool, str]:
    """The probe in this process: no protection from a crash, only from errors."""
    try:
        _fault(setting, in_process=True)
        _probe_body(setting, str(device), mode)
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any failure of the setting is its probe's answer
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        return False, f"in process: {type(exc).__name__}: {lines[-1][:300] if lines else ''}".rstrip(": ")


def _cause(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode < 0:
        try:
            return f"killed by {signal.Signals(-proc.returncode).name}"
        except ValueError:
            return f"killed by signal {-proc.returncode}"
    lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else "no error output"
    return f"exit status {proc.returncode}: {last[:300]}"


def _machine_key(setting: str, device: torch.device, mode: str) -> str:
    import hashlib
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(ln for ln in f if ln.startswith(("model name", "flags")))[:8192]
    except OSError:
        cpu = platform.processor()
    parts = [setting, mode, device_name(device), torch.__version__, str(torch.version.cuda), sys.executable,
             platform.machine(), hashlib.sha256(cpu.encode()).hexdigest()]
    if device.type == "cuda" and torch.cuda.is_available():
        parts.append(str(torch.cuda.get_device_capability(device)))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _disk_cache_path():
    from pathlib import Path

    where = os.environ.get(CACHE_ENV, "")
    if where == "0" or os.environ.get(FAULT_ENV):   # disabled, or a test injects faults
        return None
    return Path(where) if where else Path.home() / ".cache" / "robustkd" / "probes.json"


def _disk_read(key: str) -> bool:
    import json

    path = _disk_cache_path()
    try:
        return bool(path and json.loads(path.read_text()).get(key) is True)
    except (OSError, ValueError, AttributeError):
        return False


def _disk_write(key: str) -> None:
    import json
    import tempfile

    path = _disk_cache_path()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            known = json.loads(path.read_text())
            known = known if isinstance(known, dict) else {}
        except (OSError, ValueError):
            known = {}
        known[key] = True
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".probes.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(known, f)
        os.replace(tmp, path)
    except OSError:
        pass   # a read-only home: probe again next time


def probe(setting: str, device: torch.device, mode: str = "default", timeout_s: float | None = None) -> ProbeResult:
    """Run the probe of ``setting`` on ``device`` in a child process (cached per process)."""
    import time

    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; expected one of {SETTINGS}")
    key = (setting, str(device), mode if setting == "compile" else "")
    if key in _CACHE:
        return _CACHE[key]
    disk_key = _machine_key(setting, device, key[2])
    if _disk_read(disk_key):
        _CACHE[key] = ProbeResult(setting, str(device), True, "", 0.0)
        return _CACHE[key]
    timeout_s = timeout_s or float(os.environ.get(TIMEOUT_ENV, "600"))
    cmd = [sys.executable, "-m", "robustkd.capability", setting, str(device), mode]
    start = time.perf_counter()
    where = os.environ.get(IN_PROCESS_ENV, "")
    if where == "1" or (where != "0" and exclusive_compute(device)):
        ok, cause = _in_process(setting, device, key[2])
    else:
        try:
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # this robustkd, not another
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
            ok = proc.returncode == 0 and "probe ok" in proc.stdout
            cause = "" if ok else _cause(proc)
        except subprocess.TimeoutExpired:
            ok, cause = False, f"no answer within {timeout_s:.0f} s ({TIMEOUT_ENV})"
        if not ok and BUSY in cause and where != "0":   # an exclusive GPU that nvidia-smi did not report
            ok, cause = _in_process(setting, device, key[2])
    result = ProbeResult(setting, str(device), ok, cause, time.perf_counter() - start)
    _CACHE[key] = result
    if ok:
        _disk_write(disk_key)
    return result


def clear_cache() -> None:
    _CACHE.clear()


@dataclass
class FastPath:
    """What a run uses, resolved from the settings and the probes; ``notes`` say why."""

    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    notes: list[str] = field(default_factory=list)
    # every probe that failed: {"key", "setting", "device", "cause"} (also printed and in ``notes``)
    probe_failures: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        parts = ["bf16 autocast (losses in float32)" if self.bf16 else "fp32",
                 "channels_last" if self.channels_last else "contiguous (NCHW)",
                 (f"compiled ({self.compile_mode})" if self.compile else "eager")]
        return ", ".join(parts)

    def record(self) -> dict:
        return {"bf16": self.bf16, "channels_last": self.channels_last, "compile": self.compile,
                "compile_mode": self.compile_mode if self.compile else "none",
                "probe_failures": list(self.probe_failures)}


def _settle(key: str, value: str, setting: str, wanted_on_auto: bool, device: torch.device,
            mode: str, path: "FastPath", fallback: str) -> bool:
    """``value``: 'auto' | 'on' | 'off'. Probe when the setting would be used; on failure raise
    one clear line (explicit) or fall back with a note (auto) that is also printed on stderr at
    once and recorded in ``path.probe_failures``: a fast path lost on a GPU is never silent."""
    if value == "off" or (value == "auto" and not wanted_on_auto):
        return False
    result = probe(setting, device, mode)
    if result.ok:
        return True
    where = device_name(device)
    path.probe_failures.append({"key": key, "setting": setting, "device": where, "cause": result.cause})
    if value == "auto":
        note = f"{key}: auto: {setting} failed its probe on {where} ({result.cause}); using {fallback}"
        path.notes.append(note)
        print(f"robustkd: probe failed: {note}", file=sys.stderr, flush=True)
        return False
    raise InputError(f"{key}: {setting} is not usable on {where}: its probe was {result.cause}; "
                     f"set {key} to {fallback!r} or 'auto'")


def resolve_fast_path(device: torch.device, precision: str = "auto", channels_last: str | bool = "auto",
                      compile: str | bool = "auto", compile_mode: str = "default",
                      fast_default: bool | None = None) -> FastPath:
    """The fast path of a run: ``auto`` turns bf16 autocast, channels_last and torch.compile on
    for CUDA devices whose probes pass and off elsewhere (the CPU default: fp32 eager); explicit
    values are probed too and fail with one line naming setting, device and cause.
    ``fast_default`` overrides what ``auto`` means (default: the fast path on CUDA only)."""
    def tri(v) -> str:
        return "auto" if v == "auto" else ("on" if v in (True, "true", "bf16", "on") else "off")

    if precision not in ("auto", "fp32", "bf16"):
        raise InputError(f"run.precision: expected auto|fp32|bf16, found {precision!r}")
    if compile_mode not in COMPILE_MODES:
        raise InputError(f"run.compile_mode: expected one of {list(COMPILE_MODES)}, found {compile_mode!r}")
    gpu = device.type == "cuda"
    fast = gpu if fast_default is None else fast_default
    notes: list[str] = []
    mode = compile_mode
    if mode == "reduce-overhead" and not gpu:
        notes.append(f"run.compile_mode: reduce-overhead uses CUDA graphs, not available on {device}; "
                     "using the default mode")
        mode = "default"
    path = FastPath(notes=notes, compile_mode=mode)
    path.bf16 = _settle("run.precision", tri(precision), "bf16", fast, device, mode, path, "fp32")
    path.channels_last = _settle("run.channels_last", tri(channels_last), "channels_last", fast, device,
                                 mode, path, "false")
    path.compile = _settle("run.compile", tri(compile), "compile", fast, device, mode, path, "false")
    return path


if __name__ == "__main__":   # the child: python -m robustkd.capability SETTING DEVICE [MODE]
    _child(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "default")
