"""Bad input where it enters, case by case: each case makes the input, runs the entry point and
returns what the user sees. tests/test_input_checks.py asserts every message;

    python -m tests.bad_inputs            # prints the table of docs/troubleshooting.md#bad-input-and-faults
    python -m tests.bad_inputs --faults   # and the fault cases of tests/test_faults.py (a minute)
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .stage_fixtures import make_image_folder, tiny_params, write_params

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ through a stage CLI
def stage_cli(tmp: Path, mutate_params=None, mutate_tree=None, raw_params: str | None = None) -> str:
    """prepare_data on a tiny ImageFolder after ``mutate_*``: its exit code and error output."""
    from stages import prepare_data

    make_image_folder(tmp / "raw", train_per_class=2, test_per_class=1)
    p = tiny_params(str(tmp / "raw"))
    p["data"].update(train_per_class=1, heldout_per_class=1, test_per_class=1)
    p["evaluate"].update(per_class=1)   # at most data.test_per_class (checked at load)
    if mutate_params:
        mutate_params(p)
    write_params(tmp / "params.yaml", p)
    if raw_params is not None:
        (tmp / "params.yaml").write_text(raw_params)
    if mutate_tree:
        mutate_tree(tmp / "raw")
    err = io.StringIO()
    old, old_env = os.getcwd(), os.environ.get("ROBUSTKD_TRACKING")
    os.chdir(tmp)
    os.environ["ROBUSTKD_TRACKING"] = "off"
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            prepare_data.run([])
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        os.chdir(old)
        if old_env is None:
            os.environ.pop("ROBUSTKD_TRACKING")
        else:
            os.environ["ROBUSTKD_TRACKING"] = old_env
    return f"exit {code}: {err.getvalue().strip()}".replace(str(tmp) + "/", "")


def first_image(raw: Path) -> Path:
    return raw / "train/c0/0000.png"


def wrong_size(raw: Path) -> None:
    from PIL import Image

    Image.new("RGB", (64, 64)).save(first_image(raw))


def empty_class(raw: Path) -> None:
    for f in (raw / "train/c3").iterdir():
        f.unlink()


# ------------------------------------------------------------------ through the library's loaders
def library(fn) -> str:
    from robustkd.errors import InputError

    try:
        fn()
    except InputError as exc:
        return f"error: {exc}"
    return "accepted"


def npz_case(tmp: Path, **arrays) -> str:
    from robustkd.data import load_npz

    path = tmp / "gen.npz"
    np.savez(path, **arrays)
    return library(lambda: load_npz(path, num_classes=10)).replace(str(tmp) + "/", "")


def good_arrays(n=4):
    return {"image": np.zeros((n, 32, 32, 3), np.uint8), "label": np.arange(n) % 10}


class Code:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def checkpoint_case(tmp: Path, make) -> str:
    from robustkd.checkpoints import load_checkpoint

    path = tmp / "student.pt"
    make(path)
    return library(lambda: load_checkpoint(path)).replace(str(tmp) + "/", "")


def truncated_model(path: Path) -> None:
    from robustkd.checkpoints import save_checkpoint
    from robustkd.models import create_model

    save_checkpoint(create_model("resnet10_w8", 10), path)
    path.write_bytes(path.read_bytes()[:3000])


def not_a_file(tmp: Path, text: str = "") -> Path:
    (tmp / "notes.txt").write_text(text)
    return tmp / "notes.txt"


def set(p: dict, dotted: str, value) -> None:  # noqa: A001 - a params edit
    *keys, last = dotted.split(".")
    for k in keys:
        p = p[k]
    p[last] = value


# (where, case, expected in the message, function of a fresh temporary folder)
CASES = [
    ("params.yaml", "unknown key (typo)", "train_per_clas",
     lambda t: stage_cli(t, lambda p: p["data"].update(train_per_clas=3))),
    ("params.yaml", "wrong type", "distill.optim.lr",
     lambda t: stage_cli(t, lambda p: set(p, "distill.optim.lr", "fast"))),
    ("params.yaml", "out of range", "teacher.optim: optimiser.epochs: expected a positive number, found 0",
     lambda t: stage_cli(t, lambda p: set(p, "teacher.optim.epochs", 0))),
    ("params.yaml", "unknown method", "darwinn",
     lambda t: stage_cli(t, lambda p: set(p, "distill.method", "darwinn"))),
    ("params.yaml", "not YAML", "not valid YAML at line 2, column 1: expected ',' or ']'", lambda t: stage_cli(t, raw_params="data: [unclosed\n")),
    ("params.yaml", "a word for a count", "data.train_per_class: expected an integer or null, found 'many'",
     lambda t: stage_cli(t, lambda p: set(p, "data.train_per_class", "many"))),
    ("params.yaml", "a fraction dividing by zero", "evaluate.config.eps: expected a number or a fraction such as "
     "8/255, found '1/0' (division by zero)", lambda t: stage_cli(t, lambda p: set(p, "evaluate.config.eps", "1/0"))),
    ("params.yaml", "export.per_class above data.test_per_class", "export.per_class: expected at most "
     "data.test_per_class (1) test images per class, found 10",
     lambda t: stage_cli(t, lambda p: set(p, "export.per_class", 10))),
    ("params.yaml", "evaluate.per_class above data.test_per_class", "evaluate.per_class: expected at most "
     "data.test_per_class (1) test images per class, found 100",
     lambda t: stage_cli(t, lambda p: set(p, "evaluate.per_class", 100))),
    ("params.yaml", "evaluate.autoattack_per_class above data.test_per_class",
     "evaluate.autoattack_per_class: expected at most data.test_per_class (1)",
     lambda t: stage_cli(t, lambda p: p["evaluate"].update(per_class=None, autoattack_per_class=5))),
    ("params.yaml", "attention.images above the classes of CIFAR-10", "attention.images: expected at most the 10 "
     "classes of cifar10", lambda t: stage_cli(t, lambda p: (set(p, "data.source", "cifar10"),
                                                             set(p, "attention.images", 20)))),
    ("params.yaml", "a CUDA device this machine lacks", "run.device: expected a device of this machine",
     lambda t: stage_cli(t, lambda p: set(p, "run.device", "cuda:63"))),
    ("params.yaml", "a registered model name with a quote", "registry.model_name: expected a name of letters",
     lambda t: stage_cli(t, lambda p: set(p, "registry.model_name", "student' or name != '"))),
    ("image folder", "data.root does not exist", "does not exist",
     lambda t: stage_cli(t, lambda p: set(p, "data.root", str(t / "nowhere")))),
    ("image folder", "a file that is not an image", "cannot be decoded",
     lambda t: stage_cli(t, mutate_tree=lambda r: first_image(r).write_bytes(b"not a png"))),
    ("image folder", "an image of another size", "expected a 32 x 32 RGB image, found shape (64, 64, 3)",
     lambda t: stage_cli(t, mutate_tree=wrong_size)),
    ("image folder", "a class folder without images", "expected one folder per class holding images",
     lambda t: stage_cli(t, mutate_tree=empty_class)),
    ("image folder", "test classes differ from train classes", "differ from the test classes",
     lambda t: stage_cli(t, mutate_tree=lambda r: (r / "test/c9").rename(r / "test/c99"))),
    (".npz", "an object array (needs pickle)", "not a readable .npz of plain arrays",
     lambda t: npz_case(t, image=np.array([{"a": 1}], dtype=object), label=np.zeros(1, np.int64))),
    (".npz", "float images", "must be uint8",
     lambda t: npz_case(t, **{**good_arrays(), "image": np.zeros((4, 32, 32, 3), np.float32)})),
    (".npz", "no labels", "missing key 'label'", lambda t: npz_case(t, image=good_arrays()["image"])),
    (".npz", "labels out of range", "labels must lie in [0, 9]",
     lambda t: npz_case(t, **{**good_arrays(), "label": np.full(4, 12)})),
    ("model checkpoint", "a pickle holding code", "refused by torch.load(weights_only=True)",
     lambda t: checkpoint_case(t, lambda p: torch.save({"arch": Code()}, p))),
    ("model checkpoint", "truncated", "truncated or corrupt", lambda t: checkpoint_case(t, truncated_model)),
    ("model checkpoint", "a torch file of something else", "not a robustkd model checkpoint",
     lambda t: checkpoint_case(t, lambda p: torch.save({"weights": torch.zeros(3)}, p))),
    ("model checkpoint", "a text file", "not a torch checkpoint",
     lambda t: checkpoint_case(t, lambda p: p.write_text("hello"))),
]


# ------------------------------------------------------------------ faults (tests/test_faults.py)
def resume_case(tmp: Path, make) -> str:
    from .test_resume import trainer

    torch.save({"w": torch.zeros(4096)}, tmp / "state.pt")
    make(tmp / "state.pt")
    lines = []
    trainer(tmp, lines).try_resume()
    return lines[-1].replace(str(tmp) + "/", "")


def nan_case(tmp: Path) -> str:
    from robustkd.errors import NonFiniteLoss

    from .test_faults import teacher4
    from .test_resume import trainer

    t = teacher4()
    run = trainer(tmp, [], teacher_model=t)
    run.callbacks.append(lambda *_: next(t.parameters()).data.fill_(float("nan")))
    try:
        run.fit()
    except NonFiniteLoss as exc:
        return f"error: {exc}".replace(str(tmp) + "/", "")
    return "no error"


def full_disk_case(tmp: Path) -> str:
    def savez(fh, **arrays):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    stage_cli(tmp)
    real = np.savez
    np.savez = savez
    try:
        return stage_cli(tmp)
    finally:
        np.savez = real


def mlflow_case(tmp: Path) -> str:
    from .test_faults import closed_port

    make_image_folder(tmp / "raw", train_per_class=2, test_per_class=1)
    p = tiny_params(str(tmp / "raw"))
    p["data"].update(train_per_class=1, heldout_per_class=1, test_per_class=1)
    p["evaluate"].update(per_class=1)   # at most data.test_per_class (checked at load)
    write_params(tmp / "params.yaml", p)
    env = {**os.environ, "ROBUSTKD_TRACKING": "on", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed_port()}",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "stages.prepare_data"], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=300)
    said = [line for line in proc.stderr.splitlines() if line.startswith("tracking:")]
    return f"exit {proc.returncode}, outputs written; " + " / ".join(said)


def second_flow_case(tmp: Path) -> str:
    # a workspace whose `--preset cpu` validates: the flow checks params and the data folder first
    (tmp / "params").mkdir(exist_ok=True)
    (tmp / "params/cpu.yaml").write_text((ROOT / "params/cpu.yaml").read_text())
    (tmp / "params.yaml").write_text("profile: mine\n")
    code = ("from pathlib import Path; import time; from pipeline.flow import workspace_lock\n"
            f"with workspace_lock(Path({str(tmp)!r})):\n    print('held', flush=True); time.sleep(300)")
    first = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        first.stdout.readline()
        proc = subprocess.run([sys.executable, "-m", "pipeline.flow", "--project-dir", str(tmp), "--preset", "cpu",
                               "--no-register"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "ROBUSTKD_DATA_ROOT": str(tmp)})
        return f"exit {proc.returncode}: {proc.stderr.strip()}".replace(str(tmp), "<workspace>")
    finally:
        first.kill()
        first.wait()


FAULTS = [
    ("training checkpoint", "truncated state.pt", lambda t: resume_case(t, lambda p: p.write_bytes(p.read_bytes()[:200]))),
    ("training checkpoint", "state.pt holding code",
     lambda t: resume_case(t, lambda p: torch.save({"state": Code()}, p))),
    ("training checkpoint", "state.pt of something else", lambda t: resume_case(t, lambda p: None)),
    ("training", "NaN in the loss (teacher weights set to NaN after epoch 1)", nan_case),
    ("outputs", "full disk (ENOSPC) while a stage writes", full_disk_case),
    ("MLflow", "tracking server unreachable (closed port)", mlflow_case),
    ("flow", "a second flow in the same workspace", second_flow_case),
]


def run_case(fn) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return fn(Path(tmp))


def markdown(rows) -> str:
    lines = ["| where | case | what you see |", "|---|---|---|"]
    for where, case, message in rows:
        text = " ".join(message.split()).replace("|", "\\|")
        lines.append(f"| {where} | {case} | `{text}` |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rows = [(where, case, run_case(fn)) for where, case, _, fn in CASES]
    if "--faults" in argv:
        rows += [(where, case, run_case(fn)) for where, case, fn in FAULTS]
    print(markdown(rows))


if __name__ == "__main__":
    main()
