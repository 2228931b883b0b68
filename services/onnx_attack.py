"""The deployed file attacked: the ONNX student under attack, not only its clean logits.

The export stage's parity check compares clean logits of PyTorch and onnxruntime; a graph that
agrees on clean images can still differ under attack (an operator exported with another rounding,
a clamp or normalisation lost or changed). Two attacks run on the file itself:

- **Square** (Andriushchenko et al., "Square Attack: a query-efficient black-box adversarial attack
  via random search", ECCV 2020, https://arxiv.org/abs/1912.00049), gradient-free, so it needs only
  the session's outputs: ``pyautoattack``'s ``SquareAttack`` (the implementation AutoAttack runs,
  fra31/auto-attack ``autoattack/square.py``, packaged as pyautoattack 0.2.0), L-inf, the
  evaluation's eps, margin loss, one restart, ``export.attack.square_queries`` queries per image,
  the schedule of its square sizes rescaled to that budget (``resc_schedule``, as the official
  code's ``p_selection`` does for budgets other than 10,000);
- **transfer**: the evaluation's PGD-20 (``robustkd.evaluation.make_attack("pgd20")``: eps, step,
  steps, random start and its seed) crafted on the PyTorch student and classified by the session:
  the same adversarial images must fool both the same way when the file is the student.

Every accuracy counts an image wrong without attack as wrong under attack (the evaluation's rule),
as a count with its 95% Wilson interval (robustkd/stats.py).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from robustkd.evaluation import EvalConfig, make_attack
from robustkd.stats import accuracy_record

from .onnx_input import check_onnx_input


class OnnxModule(nn.Module):
    """An onnxruntime session as a torch module: ``forward`` takes a float tensor N x 3 x H x W in
    [0, 1] (any device; it runs on the CPU) and returns the logits as a CPU tensor. No gradients:
    the output is a constant to autograd, so only gradient-free attacks (Square) can run on it;
    a gradient attack fails loudly instead of silently attacking nothing."""

    def __init__(self, path: str | Path, threads: int = 0):
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads   # 0: onnxruntime's default (the physical cores)
        # its threads sleep between runs instead of spinning: an attack alternates a session run with
        # small torch ops, which spinning threads would starve (measured: 250 -> 15 ms per Square query
        # on 30 images, 2 shared cores, together with torch on one thread below)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = check_onnx_input(self.session, self.path)
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        logits = self.session.run([self.output_name], {self.input_name: array})[0]
        return torch.from_numpy(np.array(logits, dtype=np.float32))

    def predict(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return torch.cat([self(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]) \
            if len(x) else torch.empty(0, dtype=torch.long)


def square_adversarial(module: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n_queries: int,
                       seed: int, batch_size: int) -> torch.Tensor:
    """Square's adversarial images of ``x`` (labels ``y``) against ``module``, batch by batch;
    an image already wrong, or not fooled, is returned unchanged. The global torch RNG Square
    reseeds is restored afterwards. Torch runs on one thread meanwhile: Square's own tensors are a
    few hundred kilobytes per query, where a thread pool costs more than it saves (and competes with
    onnxruntime's threads for the cores)."""
    from pyautoattack.square import SquareAttack

    attack = SquareAttack(module, norm="Linf", n_queries=n_queries, eps=eps, p_init=0.8, n_restarts=1,
                          seed=seed, verbose=False, loss="margin", resc_schedule=True, device=torch.device("cpu"))
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            for i in range(0, len(x), batch_size):
                out.append(attack.perturb(x[i:i + batch_size], y[i:i + batch_size]))
    finally:
        torch.set_num_threads(threads)
    adv = torch.cat(out) if out else x.clone()
    check_threat_model(adv, x, eps, "Square")
    return adv


def check_threat_model(adv: torch.Tensor, x: torch.Tensor, eps: float, name: str) -> None:
    """The protocol's perturbation and range check (robustkd/evaluation.py does the same for its
    attacks): an attack outside the eps-ball or [0, 1] would report a robustness that means nothing."""
    dist = float((adv - x).abs().max()) if len(x) else 0.0
    if dist > eps + 1e-6 or (len(x) and (float(adv.min()) < 0 or float(adv.max()) > 1)):
        raise RuntimeError(f"{name}: adversarial images outside the threat model (max |delta| {dist:.6g}, "
                           f"eps {eps:.6g}, range [{float(adv.min()):.3g}, {float(adv.max()):.3g}])")


def pgd20_adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig) -> torch.Tensor:
    """The evaluation's PGD-20 on the PyTorch ``model`` (its settings and per-batch seeds)."""
    attack = make_attack("pgd20", model, cfg, "cpu")
    out = [attack(x[i:i + cfg.batch_size], y[i:i + cfg.batch_size], i)[0] for i in range(0, len(x), cfg.batch_size)]
    adv = torch.cat(out) if out else x.clone()
    check_threat_model(adv, x, cfg.eps, "PGD-20")
    return adv


def attack_onnx(model: nn.Module, onnx_path: str | Path, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig,
                square_queries: int, threads: int = 0) -> dict:
    """Numbers only (a DVC metric): the ONNX file's natural, Square and PGD-20-transfer accuracy
    and the PyTorch student's natural and PGD-20 accuracy, all on the images ``x`` (labels ``y``),
    each {correct, total, percent, ci95_low, ci95_high}; ``robust_images`` their count,
    ``square_queries`` and the seconds of each part. ``square_queries`` 0: no Square."""
    cfg = replace(cfg, batch_size=max(1, cfg.batch_size))
    module = OnnxModule(onnx_path, threads)
    model = model.eval()
    n = len(x)

    def record(correct: torch.Tensor) -> dict:
        return accuracy_record(int(correct.sum()), n)

    with torch.no_grad():
        torch_natural = torch.cat([model(x[i:i + cfg.batch_size]).argmax(1) for i in range(0, n, cfg.batch_size)]) == y \
            if n else torch.zeros(0, dtype=torch.bool)
    onnx_natural = module.predict(x, cfg.batch_size) == y
    out = {"robust_images": n, "square_queries": square_queries,
           "torch_natural_accuracy": record(torch_natural), "onnx_natural_accuracy": record(onnx_natural)}
    start = time.perf_counter()
    x_pgd = pgd20_adversarial(model, x, y, cfg)
    with torch.no_grad():
        torch_pgd = torch.cat([model(x_pgd[i:i + cfg.batch_size]).argmax(1)
                               for i in range(0, n, cfg.batch_size)]) == y if n else torch_natural
    transfer = module.predict(x_pgd, cfg.batch_size) == y
    out.update(torch_pgd20_accuracy=record(torch_pgd & torch_natural),
               onnx_pgd20_transfer_accuracy=record(transfer & onnx_natural),
               pgd20_seconds=round(time.perf_counter() - start, 3))
    if square_queries > 0:
        start = time.perf_counter()
        x_square = square_adversarial(module, x, y, cfg.eps, square_queries, cfg.seed, cfg.batch_size)
        square = module.predict(x_square, cfg.batch_size) == y
        out.update(onnx_square_accuracy=record(square & onnx_natural),
                   square_seconds=round(time.perf_counter() - start, 3))
    return out
