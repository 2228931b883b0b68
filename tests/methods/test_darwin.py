import copy

import pytest
import torch
import torch.nn.functional as F

from robustkd.errors import InputError
from robustkd.methods import create_objective
from robustkd.methods.darwin import DarwinConfig, darwin_loss, partners_of_other_class, path_weights, triplet
from tests.darwin_reference import darwin_loss_reference

from .helpers import kl, linear_pair, softmax


def test_weights_on_three_samples_by_hand():
    p_t = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    p_s = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.7, 0.3]])
    y = torch.tensor([0, 0, 1])
    # gaps |p_t_y - p_s_y| = 0.4, 0.1, 0.5; max 0.5 -> 0.8, 0.2, 1.0
    w = path_weights(i=2, n=4, p_t_clean=p_t, p_s_point=p_s, y=y, gamma=0.5, weighting="adaptive")
    expected = torch.tensor([0.25 + 0.5 * 0.8, 0.25 + 0.5 * 0.2, 0.25 + 0.5 * 1.0])
    assert torch.allclose(w, expected)
    assert torch.allclose(path_weights(2, 4, p_t, p_s, y, 0.0, "adaptive"), torch.full((3,), 0.5))
    assert torch.allclose(path_weights(2, 4, p_t, p_s, y, 1.0, "adaptive"), torch.tensor([0.8, 0.2, 1.0]))
    assert torch.equal(path_weights(2, 4, p_t, p_s, y, 0.5, "uniform"), torch.ones(3))


def test_weights_zero_denominator_gives_zero_second_term():
    p = torch.tensor([[0.3, 0.7], [0.6, 0.4]])
    w = path_weights(1, 2, p, p, torch.tensor([0, 1]), 0.5, "adaptive")
    assert torch.allclose(w, torch.full((2,), 0.25))


def test_triplet_is_zero_past_the_margin_and_linear_before():
    anchor = torch.tensor([[2.0, 0.0, 0.0]])
    pos = torch.tensor([[2.0, 0.0, 0.0]])     # D(a, pos) = 0
    neg = torch.tensor([[-5.0, 5.0, 0.0]])    # D(a, neg) large
    d_neg = kl(softmax([2, 0, 0]), softmax([-5, 5, 0]))
    assert d_neg > 1.0
    assert triplet(anchor, pos, neg, margin=1.0, distance="kl").item() == 0.0
    assert triplet(anchor, pos, neg, margin=d_neg + 0.5, distance="kl").item() == pytest.approx(0.5, abs=1e-5)
    # squared L2 between probability vectors
    pa, pn = softmax([2, 0, 0]), softmax([-5, 5, 0])
    l2 = sum((a - b) ** 2 for a, b in zip(pa, pn))
    assert triplet(anchor, pos, neg, margin=1.0, distance="l2").item() == pytest.approx(max(0, 1 - l2), abs=1e-6)


def test_arkd_value_by_hand():
    student, teacher = linear_pair()
    x = torch.rand(3, 3, 32, 32)
    y = torch.tensor([0, 1, 2])
    cfg = DarwinConfig(eps=0.0, steps=2, beta=0.5, use_iakd=False, use_dbkd=False, random_start=False)
    loss, parts = darwin_loss(student, teacher, x, y, None, None, cfg)
    with torch.no_grad():
        t, s = teacher(x).tolist(), student(x).tolist()
    per = [kl(softmax(a), softmax(b)) for a, b in zip(t, s)]
    expected = (1 + 0.5) * sum(per) / 3  # eps = 0: xh = x
    assert parts["arkd"].item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_iakd_value_by_hand():
    student, teacher = linear_pair(1)
    x = torch.rand(3, 3, 32, 32)
    y = torch.tensor([0, 1, 3])
    n, gamma = 3, 0.5
    cfg = DarwinConfig(eps=0.0, steps=n, gamma=gamma, use_dbkd=False, random_start=False)
    _, parts = darwin_loss(student, teacher, x, y, None, None, cfg)
    with torch.no_grad():
        pt = [softmax(r) for r in teacher(x).tolist()]
        ps = [softmax(r) for r in student(x).tolist()]
    gaps = [abs(pt[b][y[b]] - ps[b][y[b]]) for b in range(3)]
    kls = [kl(pt[b], ps[b]) for b in range(3)]
    expected = sum(
        sum(((1 - gamma) * i / n + gamma * gaps[b] / max(gaps)) * kls[b] for b in range(3)) / 3
        for i in range(1, n))  # i = 1 .. n-1
    assert parts["iakd"].item() == pytest.approx(expected, rel=1e-5)


def test_dbkd_value_by_hand():
    student, teacher = linear_pair(2)
    x, xp = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    y, yp = torch.tensor([0, 1]), torch.tensor([2, 3])
    n, m = 2, 5.0
    cfg = DarwinConfig(eps=0.0, steps=n, margin=m, weighting="uniform", use_iakd=False, random_start=False)
    _, parts = darwin_loss(student, teacher, x, y, xp, yp, cfg)
    with torch.no_grad():
        tx, txp = teacher(x).tolist(), teacher(xp).tolist()
        sx, sxp = student(x).tolist(), student(xp).tolist()

    def tri(a, pos, neg):
        return max(0.0, kl(softmax(a), softmax(pos)) - kl(softmax(a), softmax(neg)) + m)

    per_step = sum(tri(tx[b], sx[b], sxp[b]) + tri(txp[b], sxp[b], sx[b]) for b in range(2)) / 2
    assert parts["dbkd"].item() == pytest.approx(n * per_step, rel=1e-5)


def test_darwin_matches_straightforward_reference_with_batchnorm(small_models, tiny_batch):
    student, teacher = small_models
    x, y, xp, yp = tiny_batch
    cfg = DarwinConfig(steps=3, random_start=False)
    student.train()
    twin = copy.deepcopy(student)  # each call updates BN running statistics, which the next attack uses
    fast, fast_parts = darwin_loss(student, teacher, x, y, xp, yp, cfg)
    ref, ref_parts = darwin_loss_reference(twin, teacher, x, y, xp, yp, cfg)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5)
    for k in fast_parts:
        assert fast_parts[k].item() == pytest.approx(ref_parts[k].item(), rel=1e-4, abs=1e-6)


def test_darwin_with_random_start_matches_reference_on_same_generator(small_models, tiny_batch):
    student, teacher = small_models
    x, y, xp, yp = tiny_batch
    cfg = DarwinConfig(steps=2, random_start=True)
    twin = copy.deepcopy(student)
    fast, _ = darwin_loss(student, teacher, x, y, xp, yp, cfg, generator=torch.Generator().manual_seed(5))
    ref, _ = darwin_loss_reference(twin, teacher, x, y, xp, yp, cfg, generator=torch.Generator().manual_seed(5))
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5)


def test_darwin_deterministic_modes_restored_teacher_without_gradient(small_models, tiny_batch):
    student, teacher = small_models
    x, y, xp, yp = tiny_batch
    cfg = DarwinConfig(steps=2, random_start=False)
    for s_mode, t_mode in [(True, False), (False, True)]:
        student.train(s_mode)
        teacher.train(t_mode)
        twin = copy.deepcopy(student)
        a, _ = darwin_loss(student, teacher, x, y, xp, yp, cfg)
        b, _ = darwin_loss(twin, teacher, x, y, xp, yp, cfg)
        assert a.item() == b.item()
        assert student.training == s_mode and teacher.training == t_mode
    teacher.eval()
    student.train()
    loss, _ = darwin_loss(student, teacher, x, y, xp, yp, cfg)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_darwin_lf_ignores_the_labels(small_models, tiny_batch):
    student, teacher = small_models
    x, y, xp, yp = tiny_batch
    cfg = DarwinConfig(steps=2, random_start=False, label_free=True)
    with torch.no_grad():
        ty, typ = teacher(x).argmax(1), teacher(xp).argmax(1)
    twin = copy.deepcopy(student)
    a, _ = darwin_loss(student, teacher, x, (y + 3) % 10, xp, (yp + 5) % 10, cfg)
    b, _ = darwin_loss(twin, teacher, x, ty, xp, typ, DarwinConfig(steps=2, random_start=False))
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_module_switches(small_models, tiny_batch):
    student, teacher = small_models
    x, y, xp, yp = tiny_batch
    base = dict(steps=2, random_start=False)
    twin = copy.deepcopy(student)
    _, only = darwin_loss(student, teacher, x, y, xp, yp, DarwinConfig(use_iakd=False, use_dbkd=False, **base))
    assert only["iakd"] == 0 and only["dbkd"] == 0
    _, all_parts = darwin_loss(twin, teacher, x, y, xp, yp, DarwinConfig(**base))
    assert all_parts["iakd"] > 0 and all_parts["dbkd"] > 0
    assert all_parts["arkd"].item() == pytest.approx(only["arkd"].item(), rel=1e-5)


@pytest.mark.parametrize("impl", ["joint", "split"])
def test_darwin_batching_options_match_reference(small_models, tiny_batch, impl):
    student, teacher = small_models
    x, y, xp, yp = tiny_batch
    cfg = DarwinConfig(steps=3, random_start=False, batching=impl)
    student.train()
    twin = copy.deepcopy(student)
    fast, _ = darwin_loss(student, teacher, x, y, xp, yp, cfg)
    ref, _ = darwin_loss_reference(twin, teacher, x, y, xp, yp, cfg)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5)


def test_joint_and_split_batching_give_the_same_gradients_and_running_stats(small_models, tiny_batch):
    student, teacher = small_models
    x, y, xp, yp = tiny_batch
    student.train()
    twin = copy.deepcopy(student)
    grads = []
    for model, impl in [(student, "joint"), (twin, "split")]:
        loss, _ = darwin_loss(model, teacher, x, y, xp, yp, DarwinConfig(steps=2, random_start=False,
                                                                         batching=impl))
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    for (name, a), (_, b) in zip(student.state_dict().items(), twin.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name


def test_darwin_lf_partners_differ_in_class_under_the_loss_labels():
    """Regression: partners were chosen with other labels than the loss's, ~5% shared a class."""
    g = torch.Generator().manual_seed(0)
    x, xp = torch.rand(8, 3, 4, 4, generator=g), torch.rand(8, 3, 4, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    yp = torch.tensor([0, 2, 2, 0, 1, 1, 3, 2])          # pairs 0, 2, 5 clash
    t_x, t_xp = F.one_hot(y, 4).float(), F.one_hot(yp, 4).float()
    xp2, yp2, txp2 = partners_of_other_class(x, y, t_x, xp, yp, t_xp, g)
    assert (yp2 != y).all()
    assert torch.equal(txp2.argmax(1), yp2)              # teacher logits travel with the image
    pool = torch.cat([x, xp])
    for i in range(8):                                    # every partner is an image of the batch
        assert any(torch.equal(xp2[i], p) for p in pool)
    assert torch.equal(xp2[1], xp[1]) and torch.equal(xp2[3], xp[3])   # no clash: untouched


def test_sync_bn_with_joint_per_point_batch_norm_is_refused():
    """Regression: SyncBatchNorm is no BatchNorm2d, so grouping silently fell back to joint BN."""
    obj = create_objective("darwin", {"batching": "joint"})
    with pytest.raises(InputError, match="run.sync_bn"):
        obj.check_run(torch.device("cpu"), sync_bn=True)
    create_objective("darwin", {"batching": "split"}).check_run(torch.device("cpu"), sync_bn=True)
    obj.check_run(torch.device("cpu"), sync_bn=False)


# ---------------------------------------------------------------- the [choice] settings
def test_every_choice_is_checked_with_one_line_naming_it():
    from robustkd.methods.darwin import CHOICES

    for name, allowed in CHOICES.items():
        assert getattr(DarwinConfig(), name) == allowed[0], name          # the default is the first
        with pytest.raises(InputError, match=rf"DarwinConfig\.{name} must be one of"):
            DarwinConfig(**{name: "nonsense"})


def test_kl_reduction_elementwise_mean_divides_the_kl_terms_by_the_classes():
    student, teacher = linear_pair()                      # 4 classes
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    base = dict(eps=0.0, steps=3, use_dbkd=False, random_start=False)
    _, a = darwin_loss(student, teacher, x, y, None, None, DarwinConfig(**base))
    _, b = darwin_loss(student, teacher, x, y, None, None, DarwinConfig(kl_reduction="elementwise_mean", **base))
    assert b["arkd"].item() == pytest.approx(a["arkd"].item() / 4, rel=1e-5)
    assert b["iakd"].item() == pytest.approx(a["iakd"].item() / 4, rel=1e-5)


@pytest.mark.parametrize("settings", [{"clamp_start": False}, {"start_kind": "normal"}, {"targeted_loss": "kl"},
                                      {"target_class": "teacher"}])
def test_joint_and_split_batching_agree_under_each_path_choice(settings, small_models, tiny_batch):
    student, teacher = small_models
    x, y, xp, yp = tiny_batch
    out = []
    for batching in ("joint", "split"):
        twin = copy.deepcopy(student)
        cfg = DarwinConfig(steps=2, batching=batching, **settings)
        loss, _ = darwin_loss(twin, teacher, x, y, xp, yp, cfg, generator=torch.Generator().manual_seed(3))
        out.append(loss.item())
    assert out[0] == pytest.approx(out[1], rel=1e-5)


def test_target_class_teacher_is_the_anchor_class_where_the_labels_are_the_teachers(small_models, tiny_batch):
    student, teacher = small_models
    x, _, xp, yp = tiny_batch
    with torch.no_grad():
        ty = teacher(x).argmax(1)
    a, _ = darwin_loss(copy.deepcopy(student), teacher, x, ty, xp, yp, DarwinConfig(steps=2, random_start=False))
    b, _ = darwin_loss(copy.deepcopy(student), teacher, x, ty, xp, yp,
                       DarwinConfig(steps=2, random_start=False, target_class="teacher"))
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_partner_repair_none_keeps_the_pipeline_partners(small_models, tiny_batch):
    """DARWIN-LF without the repair: the loss on the given partners, whatever their teacher labels."""
    student, teacher = small_models
    x, y, _, _ = tiny_batch
    xp = x.flip(0)                                       # partners that may share the teacher's class
    with torch.no_grad():
        ty, typ = teacher(x).argmax(1), teacher(xp).argmax(1)
    cfg = DarwinConfig(steps=2, random_start=False, label_free=True, partner_repair="none")
    a, _ = darwin_loss(copy.deepcopy(student), teacher, x, y, xp, y, cfg)
    b, _ = darwin_loss(copy.deepcopy(student), teacher, x, ty, xp, typ, DarwinConfig(steps=2, random_start=False))
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_darwin_hands_its_partner_settings_to_the_data_pipeline():
    obj = create_objective("darwin", {"partner_sampling": "uniform_other_image", "partner_pool": "real",
                                      "partner_augment": False})
    assert obj.partner_options == {"partner_sampling": "uniform_other_image", "partner_pool": "real",
                                   "partner_augment": False}
    assert create_objective("darwin", {"use_dbkd": False}).partner_options == {}   # no partners drawn
    assert create_objective("rslad").partner_options == {}
