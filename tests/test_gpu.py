"""The GPU tier (``pytest -m gpu``; the first part of ``make gpu-check``; every test skips without
CUDA): the fast path as training runs it, on small models, in about three minutes on one GPU.

- one training step of every registry method and of the TRADES and AT-PRM teachers on the default
  fast path (bf16 autocast, channels_last, compiled; the probes must pass: no silent fallback);
- compiled against eager (fp32): the same loss and gradients of a DARWIN step;
- no host synchronisation inside a DARWIN step (``torch.cuda.set_sync_debug_mode("error")``);
- DistributedDataParallel with NCCL at one rank, in the Trainer's order DDP(compiled);
- evaluation of a compiled model against its eager copy on 256 images: the same verdict.
"""

import copy

import pytest
import torch

from robustkd.attacks import attack_view
from robustkd.capability import resolve_fast_path
from robustkd.data import Batch
from robustkd.methods import DISTILL_METHODS, DataInfo, create_objective
from robustkd.models import create_model
from robustkd.utils import autocast, make_generator

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
BATCH, STEPS, POOL = 32, 2, 256
TINY_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 3}


def _batch(n=BATCH, channels_last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    b = Batch(torch.rand(n, 3, 32, 32, generator=g).to(CUDA), y.to(CUDA),
              torch.rand(n, 3, 32, 32, generator=g).to(CUDA), ((y + 1) % 10).to(CUDA),
              index=torch.arange(n, device=CUDA))
    if channels_last:
        b.x = b.x.contiguous(memory_format=torch.channels_last)
        b.x_pair = b.x_pair.contiguous(memory_format=torch.channels_last)
    return b


def _objective(method, student, teacher):
    settings = {} if method in ("natural_kd", "natural") else {"steps": STEPS}
    return create_objective(method, settings, data=DataInfo(10, torch.arange(POOL) % 10, student.feature_dim,
                                                            teacher.feature_dim)).to(CUDA)


@pytest.fixture(scope="module")
def fast():
    return resolve_fast_path(CUDA, "auto", "auto", "auto")


@pytest.fixture(scope="module")
def models(fast):
    torch.manual_seed(0)
    student = create_model("resnet10_w8", 10).to(CUDA).to(memory_format=torch.channels_last)
    teacher = create_model("resnet10_w16", 10).to(CUDA).to(memory_format=torch.channels_last).eval()
    compiled = torch.compile(student, dynamic=False) if fast.compile else student
    return student, teacher, compiled, copy.deepcopy(student.state_dict())


def test_the_default_fast_path_is_on(fast):
    assert fast.probe_failures == [], fast.probe_failures
    assert (fast.bf16, fast.channels_last, fast.compile) == (True, True, True), fast.notes


@pytest.mark.parametrize("method", [*DISTILL_METHODS, "trades", "at_prm"])
def test_one_training_step_on_the_fast_path(method, fast, models):
    student, teacher, compiled, s0 = models
    student.load_state_dict(s0)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if method == "at_prm":
        pytest.importorskip("timm", reason="AT-PRM's ViT is a timm model")
        torch.manual_seed(0)
        model = create_model("vit_b_4", 10, **TINY_VIT).to(CUDA)
        run, teacher_arg = (torch.compile(model, dynamic=False) if fast.compile else model), None
    elif method == "trades":
        model = copy.deepcopy(student)
        run, teacher_arg = (torch.compile(model, dynamic=False) if fast.compile else model), None
    else:
        model, run, teacher_arg = student, compiled, teacher
    obj = _objective(method, student, teacher)
    opt = torch.optim.SGD(list(model.parameters()) + list(obj.parameters()), lr=0.01, momentum=0.9)
    loss, parts = obj(run.train(), teacher_arg, _batch(), generator=make_generator(0, CUDA),
                      autocast=lambda: autocast(CUDA, fast.bf16), epoch_float=1.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss), (method, parts)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), method


def _darwin_step(model, teacher, generator_seed=0, bf16=False):
    obj = _objective("darwin", model, teacher)
    loss, _ = obj(model.train(), teacher, _batch(channels_last=False), generator=make_generator(generator_seed, CUDA),
                  autocast=lambda: autocast(CUDA, bf16))
    return loss


def test_compiled_and_eager_agree_on_loss_and_gradients():
    torch.manual_seed(0)
    eager = create_model("resnet10_w8", 10).to(CUDA)
    twin = copy.deepcopy(eager)
    teacher = create_model("resnet10_w16", 10).to(CUDA).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    loss_e = _darwin_step(eager, teacher)
    loss_e.backward()
    loss_c = _darwin_step(torch.compile(twin, dynamic=False), teacher)
    loss_c.backward()
    assert torch.allclose(loss_c.detach(), loss_e.detach(), rtol=1e-2), (float(loss_c), float(loss_e))
    ge = torch.cat([p.grad.flatten() for p in eager.parameters()])
    gc = torch.cat([p.grad.flatten() for p in twin.parameters()])
    cosine = torch.nn.functional.cosine_similarity(ge, gc, dim=0)
    assert cosine > 0.99, float(cosine)


def test_no_host_synchronisation_inside_a_darwin_step(fast, models):
    student, teacher, compiled, s0 = models
    student.load_state_dict(s0)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def step(i):
        loss = _darwin_step(compiled, teacher, i, fast.bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    step(0), step(1)            # compile and warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step(2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_ddp_with_nccl_at_one_rank(tmp_path, fast, models):
    import torch.distributed as dist

    student, teacher, _, s0 = models
    model = copy.deepcopy(student)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1, device_id=CUDA)
    try:
        compiled = torch.compile(model, dynamic=False) if fast.compile else model
        ddp = torch.nn.parallel.DistributedDataParallel(compiled, device_ids=[CUDA.index or 0])
        assert attack_view(ddp) is compiled
        loss = _darwin_step(ddp, teacher, bf16=fast.bf16)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    finally:
        dist.destroy_process_group()


def test_evaluation_compiled_and_eager_give_the_same_verdict(models):
    from robustkd.evaluation import EvalConfig, evaluate_model

    student, _, _, s0 = models
    plain = copy.deepcopy(student).to(memory_format=torch.contiguous_format)
    plain.load_state_dict(s0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(256, 3, 32, 32, generator=g), torch.arange(256) % 10
    cfg = EvalConfig(attacks=["natural", "pgd20"], batch_size=128, masking_images=32, unbounded_steps=10,
                     sweep_steps=5)
    quiet = lambda *_: None  # noqa: E731
    eager = evaluate_model(copy.deepcopy(plain), x, y, cfg, CUDA, log=quiet)
    compiled = evaluate_model(torch.compile(copy.deepcopy(plain), dynamic=False), x, y, cfg, CUDA, log=quiet)
    assert {k: c.passed for k, c in compiled.checks.items()} == {k: c.passed for k, c in eager.checks.items()}
    assert torch.equal(compiled.correct["natural"], eager.correct["natural"])
    assert abs(float(compiled.correct["pgd20"].float().mean()) - float(eager.correct["pgd20"].float().mean())) <= 0.02

