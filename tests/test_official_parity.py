"""Parity of the project's baseline objectives with their OFFICIAL training steps.

For each baseline the official attack + loss is transcribed in ``tests/official_transcriptions.py``
(repository, file, commit and lines in each docstring; docs/official-baselines.md). Two identical
copies of a small student WITH batch norm are run, one through the transcription and one through
``robustkd.methods.create_objective(name, ...)`` with its DEFAULT settings (only ``steps`` is
lowered), from the same start noise. Then:

- the loss values agree (rtol 1e-5),
- every student parameter gradient agrees (relative to the largest gradient),
- the batch-norm running statistics agree afterwards (this catches a train/eval mode difference
  in the attack and a missing or extra train-mode forward), and the student ends in the same mode.

The images include saturated pixels (exact 0 and 1), so a start that is clamped before the first
gradient (the official training attacks do not clamp it) changes the adversarial images.

The start noise: the project draws it as ``start_noise(x, eps, kind, generator)`` with the
generator it is given (one draw per attack), so the transcription gets the same draw from a
generator with the same seed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from robustkd.attacks import start_noise
from robustkd.data import Batch
from robustkd.methods import create_objective
from tests.official_transcriptions import (_kl_mean, _pgd_ce_train_mode, official_adaad_loss,
                                           official_ard_loss, official_iad1_loss, official_rslad_loss,
                                           official_trades_loss)

SEEDS = (0, 1, 2)
STEPS = 2
BATCH = 8
# The final layers are scaled up so that both networks give confident, different outputs: with
# near-uniform outputs (a fresh network) the KL attacks' input gradients sit at float32 rounding
# level on some pixels, and mathematically equal codes then disagree on a few signs.
LOGIT_SCALE = 10.0
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


class TinyBNNet(torch.nn.Module):
    """[0, 1] image -> logits, normalising inside like the project's models; two conv + batch-norm
    blocks (BN in the stem and in the body, so train/eval differences reach the input gradient).
    Much cheaper than resnet10_w8 (the whole file takes about 20 s on two busy cores)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1))
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(16)
        self.linear = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1((x - self.mean) / self.std)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.linear(h.mean((2, 3)))


def _warm_bn(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Move BN running statistics away from (0, 1), so eval-mode and train-mode forwards differ
    and any stray BN update is visible."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(16, 3, 32, 32, generator=gen) * 0.5 + 0.25)


def _setup(seed: int, dataset: str):
    """(student copy A, student copy B, frozen eval-mode teacher, x, y)."""
    nc = NUM_CLASSES[dataset]
    gen = torch.Generator().manual_seed(10_000 + seed)
    torch.manual_seed(10_000 + seed)
    student = TinyBNNet(nc)
    teacher = TinyBNNet(nc)
    _warm_bn(student, gen)
    _warm_bn(teacher, gen)
    with torch.no_grad():              # see LOGIT_SCALE
        for m in (student, teacher):
            for p in m.linear.parameters():
                p.mul_(LOGIT_SCALE)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)        # as ARD and IAD do; the others never differentiate it
    student.train()
    x = torch.rand(BATCH, 3, 32, 32, generator=gen)
    x[:, :, :3] = 0.0                  # saturated rows: start clamping changes the first gradient
    x[:, :, -3:] = 1.0
    y = torch.randint(0, nc, (BATCH,), generator=gen)
    return student, copy.deepcopy(student), teacher, x, y


def _noise(x, eps, kind, seed):
    return start_noise(x, eps, kind, torch.Generator().manual_seed(seed))


def _run_project(name, student, teacher, x, y, seed, dataset, epoch=0, settings=None):
    obj = create_objective(name, {"steps": STEPS, **(settings or {})}, dataset=dataset)
    loss, _parts = obj(student, teacher, Batch(x, y), epoch=epoch,
                       generator=torch.Generator().manual_seed(seed))
    loss.backward()
    return loss.detach(), obj.config


def _config(name, dataset, settings=None):
    return create_objective(name, {"steps": STEPS, **(settings or {})}, dataset=dataset).config


def _assert_same_step(official, project, loss_official, loss_project, what, loss_rtol=1e-5):
    """Loss value, every parameter gradient, every buffer (BN running statistics), final mode.
    All mismatches are collected into one message."""
    problems = []

    def check(actual, expected, label, **tol):
        try:
            torch.testing.assert_close(actual, expected, **tol)
        except AssertionError as e:
            problems.append(f"{label}: {e}")

    check(loss_project.detach(), loss_official.detach(), "loss", rtol=loss_rtol, atol=0)
    grads_o = {n: p.grad for n, p in official.named_parameters()}
    grads_p = {n: p.grad for n, p in project.named_parameters()}
    scale = max(float(g.abs().max()) for g in grads_o.values() if g is not None)
    assert scale > 0, f"{what}: the official loss gives no gradient at all"
    for n, g_o in grads_o.items():
        g_p = grads_p[n]
        if (g_o is None) != (g_p is None):
            problems.append(f"gradient of {n} present in only one run")
        elif g_o is not None:
            check(g_p, g_o, f"gradient of {n}", rtol=1e-4, atol=2e-6 * scale)
    bufs_p = dict(project.named_buffers())
    for n, b_o in official.named_buffers():
        check(bufs_p[n].double(), b_o.double(), f"buffer {n} (BN running statistics: a train/eval mode "
              "or a forward differs)", rtol=1e-5, atol=1e-6)
    if project.training != official.training:
        problems.append(f"the student ends in {'train' if project.training else 'eval'} mode, "
                        f"official: {'train' if official.training else 'eval'}")
    if problems:
        shown = "\n".join(p.replace("\n", " | ") for p in problems[:8])
        raise AssertionError(f"{what}: {len(problems)} difference(s) from the official code:\n{shown}")


# -------------------------------------------------------------------------------------- the tests
# The official loss code of TRADES, ARD and IAD has no dataset branch: CIFAR-100 is run for one seed
# (it checks that no per-dataset default creeps in); RSLAD and AdaAD branch on the dataset.
NO_BRANCH = [(s, "cifar10") for s in SEEDS] + [(0, "cifar100")]
BRANCHED = [(s, ds) for ds in ("cifar10", "cifar100") for s in SEEDS]


def test_default_settings_are_the_official_ones():
    """What the parity tests below cannot see (they pass the defaults on both sides)."""
    trades = _config("trades", "cifar10")
    assert trades.random_start == "normal" and trades.beta == 6.0
    ard = _config("ard", "cifar10")
    assert (ard.temperature, ard.alpha) == (30.0, 1.0)
    iad = _config("iad", "cifar10")
    assert (iad.temperature, iad.beta, iad.introspection_start_epoch) == (1.0, 0.1, 60)
    for name in ("trades", "ard", "iad", "rslad", "adaad"):
        cfg = _config(name, "cifar10")
        assert cfg.steps == STEPS and abs(cfg.eps - 8 / 255) < 1e-12 and abs(cfg.step_size - 2 / 255) < 1e-12
        assert _config(name, "cifar10", {"steps": 10}).steps == 10


@pytest.mark.parametrize("seed,dataset", NO_BRANCH)
def test_trades_matches_official(seed, dataset):
    """Run with a UNIFORM start on both sides. From the official start x + 0.001 N(0, 1) the first
    attack gradient is a difference of two nearly equal distributions, at the level of float32
    rounding on many pixels, so two correct implementations that round differently take a
    different sign on a few pixels (measured: up to 2 of 24,576 with this network, up to 40 with
    resnet10_w8), which then changes everything downstream. The start's distribution is
    checked in test_default_settings_are_the_official_ones; everything else is compared here."""
    model_o, model_p, _teacher, x, y = _setup(seed, dataset)
    cfg = _config("trades", dataset)
    loss_o = official_trades_loss(model_o, x, y, _noise(x, cfg.eps, "uniform", seed), steps=STEPS,
                                  epsilon=cfg.eps, step_size=cfg.step_size, beta=6.0)
    loss_o.backward()
    loss_p, _ = _run_project("trades", model_p, None, x, y, seed, dataset, settings={"random_start": "uniform"})
    _assert_same_step(model_o, model_p, loss_o, loss_p, f"trades/{dataset}/seed {seed}")


@pytest.mark.parametrize("seed,dataset", NO_BRANCH)
def test_ard_matches_official(seed, dataset):
    student_o, student_p, teacher, x, y = _setup(seed, dataset)
    cfg = _config("ard", dataset)
    loss_o = official_ard_loss(student_o, teacher, x, y, _noise(x, cfg.eps, "uniform", seed), steps=STEPS,
                               epsilon=cfg.eps, step_size=cfg.step_size, temp=30.0, alpha=1.0)
    loss_o.backward()
    loss_p, _ = _run_project("ard", student_p, teacher, x, y, seed, dataset)
    _assert_same_step(student_o, student_p, loss_o, loss_p, f"ard/{dataset}/seed {seed}")


@pytest.mark.parametrize("epoch", [59, 60], ids=["before-introspection", "introspection"])
@pytest.mark.parametrize("seed,dataset", NO_BRANCH)
def test_iad_matches_official(seed, dataset, epoch):
    """Official --begin 60, compared with 0-based epochs as the official loop counts them."""
    student_o, student_p, teacher, x, y = _setup(seed, dataset)
    cfg = _config("iad", dataset)
    loss_o = official_iad1_loss(student_o, teacher, x, y, _noise(x, cfg.eps, "uniform", seed), epoch=epoch,
                                steps=STEPS, epsilon=cfg.eps, step_size=cfg.step_size, temp=1.0, alpha=1.0,
                                beta=0.1, begin=60)
    loss_o.backward()
    loss_p, _ = _run_project("iad", student_p, teacher, x, y, seed, dataset, epoch=epoch)
    _assert_same_step(student_o, student_p, loss_o, loss_p, f"iad/{dataset}/epoch {epoch}/seed {seed}")


@pytest.mark.parametrize("seed,dataset", BRANCHED)
def test_rslad_matches_official(seed, dataset):
    student_o, student_p, teacher, x, y = _setup(seed, dataset)
    cfg = _config("rslad", dataset)
    loss_o = official_rslad_loss(student_o, teacher, x, y, _noise(x, cfg.eps, "normal", seed), steps=STEPS,
                                 epsilon=cfg.eps, step_size=cfg.step_size, dataset=dataset)
    loss_o.backward()
    loss_p, _ = _run_project("rslad", student_p, teacher, x, y, seed, dataset)
    _assert_same_step(student_o, student_p, loss_o, loss_p, f"rslad/{dataset}/seed {seed}")


@pytest.mark.parametrize("seed,dataset", BRANCHED)
def test_adaad_matches_official(seed, dataset):
    student_o, student_p, teacher, x, y = _setup(seed, dataset)
    cfg = _config("adaad", dataset)
    loss_o = official_adaad_loss(student_o, teacher, x, _noise(x, cfg.eps, "normal", seed), steps=STEPS,
                                 epsilon=cfg.eps, step_size=cfg.step_size, dataset=dataset)
    loss_o.backward()
    loss_p, _ = _run_project("adaad", student_p, teacher, x, y, seed, dataset)
    _assert_same_step(student_o, student_p, loss_o, loss_p, f"adaad/{dataset}/seed {seed}")


def _ard_step_variant(student, teacher, x, y, noise, change):
    """The official ARD step with ONE thing changed; the comparison with the official step must fail."""
    if change == "clamp_start":
        noise = (x + noise).clamp(0, 1) - x            # start projected before the first gradient
    student.train(change != "eval_attack")
    out, x_adv = _pgd_ce_train_mode(student, x, y, noise, 8 / 255, 2 / 255, STEPS)
    student.train()
    if change == "eval_attack":
        out = student(x_adv)                            # the official final forward is in train mode
    t_out = teacher(x)
    if change != "no_clean_forward":
        student(x)                                      # weighted 0 when alpha = 1, but BN moves
    return 900 * _kl_mean(F.log_softmax(out / 30, dim=1), F.softmax(t_out / 30, dim=1))


@pytest.mark.parametrize("change", ["clamp_start", "eval_attack", "no_clean_forward"])
def test_the_comparison_can_fail(change):
    """Each of these departures from the official ARD step is caught by _assert_same_step."""
    student_o, student_v, teacher, x, y = _setup(0, "cifar10")
    noise = _noise(x, 8 / 255, "uniform", 0)
    loss_o = official_ard_loss(student_o, teacher, x, y, noise, steps=STEPS)
    loss_o.backward()
    loss_v = _ard_step_variant(student_v, teacher, x, y, noise, change)
    loss_v.backward()
    with pytest.raises(AssertionError):
        _assert_same_step(student_o, student_v, loss_o, loss_v.detach(), change)
