"""The whole training step on the fast path (issue 25, items 1-2), checked on CPU:

- the attacks run the compiled student (the torch.compile wrapper kept, DDP stripped) with its
  parameters frozen: no weight gradient in an input-gradient backward, ``.grad`` untouched;
- the loss and one attack step trace without a graph break (``torch._dynamo.explain``), and the
  pieces of DARWIN's step that a Python ``if`` on a tensor used to break (the path weights, the
  loss from the logits) compile with ``fullgraph=True``;
- a DARWIN step compiles once per shape: a second step recompiles nothing.
"""

import contextlib

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch.distributed as dist
import torch.nn.functional as F

from robustkd import attacks
from robustkd.data import Batch
from robustkd.methods import create_objective
from robustkd.methods.at_prm import AtPrmConfig, prm_ard_attack
from robustkd.methods.darwin import DarwinConfig, darwin_terms, path_weights
from robustkd.models import create_model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model():
    torch.manual_seed(0)
    return create_model("resnet10_w8", 10)


def _watch(model):
    """Record, at each forward of ``model``, (training mode, whether the forward builds weight
    gradients: grad mode on and a parameter requiring grad)."""
    seen = []
    handle = model.register_forward_pre_hook(lambda m, _inp: seen.append(
        (m.training, torch.is_grad_enabled() and any(p.requires_grad for p in m.parameters()))))
    return seen, handle


def _grad_hooks(model):
    """A counter of weight gradients computed (tensor hooks on every parameter)."""
    count = [0]
    for p in model.parameters():
        p.register_hook(lambda g: count.__setitem__(0, count[0] + 1))
    return count


def test_an_attack_freezes_the_parameters_and_leaves_their_grad_untouched():
    model = _model().train()
    x = torch.rand(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = [p.grad.clone() for p in model.parameters()]
    seen, handle = _watch(model)
    hooks = _grad_hooks(model)
    attacks.pgd_ce(model, x, y, steps=2, bn_mode="eval")
    handle.remove()
    assert seen == [(False, False)] * 2          # two attack forwards, eval mode, no parameter requires grad
    assert hooks[0] == 0                          # no weight gradient computed
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    assert all(p.requires_grad for p in model.parameters())   # restored after the attack
    assert model.training                                     # and the mode


def test_the_training_attacks_of_the_methods_freeze_the_student():
    """AdaAD's own attack loop, TRADES / RSLAD / DARWIN through pgd, AT-PRM's delta loop."""
    x = torch.rand(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    batch = Batch(x, y, torch.rand(4, 3, 32, 32), torch.tensor([1, 2, 3, 4]))
    for name in ("adaad", "trades", "rslad", "darwin"):
        student, teacher = _model().train(), _model().eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        seen, handle = _watch(student)
        obj = create_objective(name, {"steps": 1})
        trained = teacher if name == "trades" else student
        if name == "trades":
            handle.remove()
            for p in teacher.parameters():
                p.requires_grad_(True)
            seen, handle = _watch(teacher)
        loss, _ = obj(trained.train(), teacher, batch, generator=torch.Generator().manual_seed(0))
        handle.remove()
        attack_calls = [grad for training, grad in seen if not training]
        loss_calls = [grad for training, grad in seen if training]
        assert attack_calls and not any(attack_calls), name      # every attack forward frozen
        assert loss_calls and all(loss_calls), name              # the loss's forwards train the weights
        assert torch.isfinite(loss)
    model = _model().train()
    seen, handle = _watch(model)
    prm_ard_attack(model, x, F.one_hot(y, 10).float(), AtPrmConfig(steps=2, ard=False), 0.5,
                   torch.Generator().manual_seed(0))
    handle.remove()
    assert seen == [(False, False)] * 2


def test_the_attack_runs_the_compiled_model():
    """pgd keeps the torch.compile wrapper (the former ``unwrap`` ran the attacks eager)."""
    model = _model().eval()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    assert attacks.attack_view(compiled) is compiled
    attacks.pgd_ce(compiled, torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), steps=2)
    assert counter.frame_count >= 1


def test_attack_view_strips_ddp_and_keeps_compile(tmp_path):
    """The Trainer's order, DDP(compiled): the attack gets the compiled model, not DDP."""
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = _model()
        compiled = torch.compile(model, backend="eager")
        ddp = torch.nn.parallel.DistributedDataParallel(compiled)
        assert attacks.attack_view(ddp) is compiled
        around = torch.compile(torch.nn.parallel.DistributedDataParallel(model), backend="eager")
        assert attacks.attack_view(around) is model
        assert attacks.attack_view(model) is model
    finally:
        if own_group:
            dist.destroy_process_group()


def test_loss_and_one_attack_step_trace_without_graph_breaks():
    model = _model()
    y = torch.tensor([0, 1, 2, 3])
    point = torch.rand(4, 3, 32, 32).requires_grad_(True)

    def attack_forward(p):       # what every attack step differentiates
        return F.cross_entropy(model(p).float(), y, reduction="none").sum()

    with attacks.model_modes([model], [False]), attacks.frozen_parameters(model):
        explained = torch._dynamo.explain(attack_forward)(point)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons

    cfg = DarwinConfig(steps=3)
    n, b = cfg.steps, 4
    g = torch.Generator().manual_seed(0)
    logits = lambda: torch.randn(b, 10, generator=g)   # noqa: E731
    args = (cfg, logits(), logits(), [logits() for _ in range(n)], logits(), [logits() for _ in range(n)],
            [logits() for _ in range(n)], y, torch.tensor([1, 2, 3, 4]))
    explained = torch._dynamo.explain(darwin_terms)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_path_weights_and_darwin_terms_compile_fullgraph():
    """No host synchronisation: the zero-denominator test is on the device (a Python ``if`` on a
    tensor is a graph break, which fullgraph refuses)."""
    g = torch.Generator().manual_seed(0)
    p_t = F.softmax(torch.randn(6, 10, generator=g), 1)
    p_s = F.softmax(torch.randn(6, 10, generator=g), 1)
    y = torch.arange(6)
    eager = path_weights(2, 5, p_t, p_s, y, 0.5, "adaptive")
    compiled = torch.compile(path_weights, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(2, 5, p_t, p_s, y, 0.5, "adaptive"), eager)
    # a zero denominator (student = teacher on the label) gives a zero second term, not NaN
    assert torch.allclose(compiled(2, 5, p_t, p_t, y, 0.5, "adaptive"), torch.full((6,), 0.5 * 2 / 5))

    cfg = DarwinConfig(steps=3)
    logits = lambda: torch.randn(6, 10, generator=g)   # noqa: E731
    args = (cfg, logits(), logits(), [logits() for _ in range(3)], logits(), [logits() for _ in range(3)],
            [logits() for _ in range(3)], y, (y + 1) % 10)
    loss, parts = darwin_terms(*args)
    loss_c, parts_c = torch.compile(darwin_terms, fullgraph=True, backend="eager")(*args)
    assert torch.allclose(loss, loss_c) and all(torch.allclose(parts[k], parts_c[k]) for k in parts)


def test_a_compiled_darwin_step_compiles_once_per_shape():
    """A second step with the same shapes recompiles nothing (static shapes: the training loader
    drops the last partial batch)."""
    student, teacher = _model(), _model().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(student, backend=counter, dynamic=False)
    obj = create_objective("darwin", {"steps": 2, "batching": "joint"})
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.rand(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3]),
                  torch.rand(4, 3, 32, 32, generator=g), torch.tensor([1, 2, 3, 4]))
    frames = []
    for i in range(2):
        loss, _ = obj(compiled.train(), teacher, batch, generator=torch.Generator().manual_seed(i),
                      autocast=contextlib.nullcontext)
        loss.backward()
        frames.append(counter.frame_count)
    assert frames[0] >= 2                       # the attack's graph and the loss's graph
    assert frames[1] == frames[0]               # no recompilation
