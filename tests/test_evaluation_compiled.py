"""Issue 24, item 2: a compiled model gets the same checks and the same verdict as its eager copy.

pyautoattack's dynamic-defense check (pyautoattack/checks.py, ``check_dynamic``) counts, in
process-global counters, the calls to functions named ``grad``/``backward``/``_make_grads`` made
during one gradient-enabled forward. A compiled model traces its first such forward through
AOTAutograd, which calls them: the model was flagged "dynamic defense", and, the counters never
being reset, so was every model evaluated after it in the same process. Here a compiled model
(``aot_eager`` and the default inductor backend, on CPU) and then an eager one are evaluated in
the same process with AutoAttack's cheapest custom run: neither is flagged; a model whose forward
really calls ``torch.autograd.grad`` still is.
"""

import pytest
import torch
import torch.nn as nn

from robustkd import evaluation
from robustkd.evaluation import EvalConfig, evaluate_model, fp32_matmuls, reset_autoattack_counters

CPU = torch.device("cpu")
C = 10


class TinyNet(nn.Module):
    """A conv and a linear layer on 3 x 8 x 8 images: something torch.compile traces for real."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, C)
        self.num_classes = C

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class GradInForward(TinyNet):
    """A dynamic defense by construction: its forward differentiates (one step along the input
    gradient of its own logits), which is what pyautoattack's check is there to catch."""

    def forward(self, x):
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            g, = torch.autograd.grad(super().forward(z).logsumexp(1).sum(), z)
        return super().forward((x + 1e-3 * g.sign()).clamp(0, 1))


def data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.arange(n) % C


def cfg(**kw):
    base = dict(attacks=["natural", "autoattack"], autoattack_version="custom", autoattack_attacks=["apgd-ce"],
                autoattack_iterations=2, batch_size=8, masking_images=0)
    base.update(kw)
    return EvalConfig(**base)


def aa_warnings(result):
    return [m for m in result.autoattack_warnings if "dynamic" in m]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_model_then_an_eager_one_are_not_flagged(backend):
    x, y = data()
    compiled = torch.compile(TinyNet(0), backend=backend)
    first = evaluate_model(compiled, x, y, cfg(), CPU, log=lambda *_: None, progress=None)
    assert not aa_warnings(first), first.autoattack_warnings
    assert not first.flagged, first.failed
    second = evaluate_model(TinyNet(1), x, y, cfg(), CPU, log=lambda *_: None, progress=None)
    assert not aa_warnings(second), second.autoattack_warnings
    assert not second.flagged, second.failed
    # the same verdict and figures as the eager copy of the compiled model
    eager = evaluate_model(TinyNet(0), x, y, cfg(), CPU, log=lambda *_: None, progress=None)
    assert torch.equal(eager.correct["autoattack"], first.correct["autoattack"])
    assert eager.failed == first.failed


def test_a_model_whose_forward_calls_autograd_grad_is_still_flagged_and_the_next_is_not():
    x, y = data()
    dynamic = evaluate_model(GradInForward(0), x, y, cfg(), CPU, log=lambda *_: None, progress=None)
    assert aa_warnings(dynamic), dynamic.autoattack_warnings
    assert "autoattack/warnings" in dynamic.failed
    after = evaluate_model(TinyNet(1), x, y, cfg(), CPU, log=lambda *_: None, progress=None)
    assert not aa_warnings(after), after.autoattack_warnings


def test_reset_autoattack_counters_zeroes_pyautoattack_globals():
    from pyautoattack import checks

    for k in checks.funcs:
        checks.funcs[k] = 3
    reset_autoattack_counters()
    assert set(checks.funcs.values()) == {0}


def test_fp32_matmuls_turns_tf32_off_and_restores_it():
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    before = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = True
        with fp32_matmuls():
            assert [f.allow_tf32 for f in flags] == [False, False]
        assert [f.allow_tf32 for f in flags] == [True, True]
    finally:
        for f, b in zip(flags, before):
            f.allow_tf32 = b


def test_compiled_parts_and_class_count_without_a_batch_1_graph():
    x, y = data()
    compiled = torch.compile(TinyNet(0), backend="aot_eager")
    result = evaluate_model(compiled, x, y, cfg(), CPU, log=lambda *_: None, progress=None)
    # only the natural forward goes through the compiled module; every attack runs on the eager one
    assert result.compiled_parts == ["natural"]
    assert result.precision == evaluation.PRECISION
    assert result.num_classes == C
    eager = evaluate_model(TinyNet(0), x, y, cfg(), CPU, log=lambda *_: None, progress=None)
    assert eager.compiled_parts == []
