import pytest
import torch
import torch.nn.functional as F

from robustkd import attacks

EPS = 8 / 255


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("start", ["uniform", "normal", None])
def test_pgd_stays_in_ball_and_image_range(small_models, tiny_batch, start):
    model, _ = small_models
    x, y, *_ = tiny_batch
    x_adv = attacks.pgd_ce(model, x, y, eps=EPS, steps=5, start=start, generator=gen())
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_eps_zero_leaves_image_unchanged(small_models, tiny_batch):
    model, _ = small_models
    x, y, *_ = tiny_batch
    assert torch.equal(attacks.pgd_ce(model, x, y, eps=0.0, steps=3, generator=gen()), x)
    assert torch.equal(attacks.cw_inf(model, x, y, eps=0.0, steps=3, generator=gen()), x)


def test_path_has_n_points_and_ends_at_the_returned_sample(small_models, tiny_batch):
    model, _ = small_models
    x, y, *_ = tiny_batch
    path = attacks.pgd_ce(model, x, y, steps=7, return_path=True, generator=gen(3))
    final = attacks.pgd_ce(model, x, y, steps=7, generator=gen(3))
    assert len(path) == 7 and torch.equal(path[-1], final)
    for a, b in zip(path[:-1], path[1:]):  # each step moves by at most alpha
        assert (b - a).abs().max() <= 2 / 255 + 1e-6


def test_targeted_path_lowers_ce_towards_target(small_models, tiny_batch):
    model, _ = small_models
    model.eval()
    x, _, *_ = tiny_batch
    target = torch.full((len(x),), 3)
    path = attacks.pgd_targeted(model, x, target, steps=10, start=None, return_path=True)
    with torch.no_grad():
        before = F.cross_entropy(model(x), target)
        after = F.cross_entropy(model(path[-1]), target)
    assert after < before


def test_untargeted_pgd_raises_ce(small_models, tiny_batch):
    model, _ = small_models
    model.eval()
    x, y, *_ = tiny_batch
    x_adv = attacks.pgd_ce(model, x, y, steps=10, start=None)
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_dual_branch_equals_two_separate_attacks_in_eval_mode(small_models, tiny_batch):
    model, _ = small_models
    x, y, xp, _ = tiny_batch
    up, tp = attacks.dual_branch_paths(model, x, y, xp, target=y, steps=4, start=None)
    up_ref = attacks.pgd_ce(model, x, y, steps=4, start=None, return_path=True)
    tp_ref = attacks.pgd_targeted(model, xp, y, steps=4, start=None, return_path=True)
    for a, b in zip(up + tp, up_ref + tp_ref):
        assert torch.allclose(a, b, atol=1e-6)
    assert model.training  # mode restored


def test_cw_margin_by_hand():
    # L = -max(z_y - max_{j != y} z_j + kappa, 0)
    logits = torch.tensor([[1.0, 3.0, 2.0], [10.0, -60.0, 0.0], [100.0, 0.0, 0.0]])
    y = torch.tensor([0, 0, 0])
    # sample 0: -(1 - 3 + 50) = -48; sample 1: -(10 - 0 + 50) = -60; sample 2: -(100 + 50) = -150
    assert torch.allclose(attacks.cw_margin(logits, y, kappa=50), torch.tensor([-48.0, -60.0, -150.0]))
    # kappa 5: sample 0 is misclassified by 2 < 5 -> -3; a margin beyond kappa gives 0
    logits2 = torch.tensor([[1.0, 3.0, 2.0], [0.0, 9.0, 0.0]])
    assert torch.allclose(attacks.cw_margin(logits2, torch.tensor([0, 0]), kappa=5), torch.tensor([-3.0, 0.0]))


def test_cw_gives_gradient_to_confidently_correct_images():
    """Regression: the clamp on the wrong side left images correct by > kappa untouched."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    with torch.no_grad():
        lin[1].weight.mul_(1000.0)   # huge logits: every image correct or wrong by >> kappa
    x = torch.rand(8, 3, 4, 4)
    y = lin(x).argmax(1)
    x_adv = attacks.cw_inf(lin, x, y, eps=8 / 255, alpha=0.003, steps=3, kappa=50.0, start=None)
    assert (x_adv - x).abs().amax() > 0.002   # every image moved


def test_attacks_restore_model_modes(small_models, tiny_batch):
    model, _ = small_models
    x, y, *_ = tiny_batch
    model.train()
    attacks.pgd_ce(model, x, y, steps=1, bn_mode="eval")
    assert model.training
    model.eval()
    attacks.pgd_ce(model, x, y, steps=1, bn_mode="train")
    assert not model.training


class InputRecorder(torch.nn.Module):
    """Logits from a fixed linear map; records every input it is given."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3 * 4 * 4, 3)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.lin(x.flatten(1))


@pytest.mark.parametrize("start", ["uniform", "normal"])
def test_training_attacks_take_the_first_gradient_at_the_unclamped_start(start):
    """The baselines' official attacks evaluate the first gradient at x + noise, unclamped."""
    model = InputRecorder()
    x = torch.zeros(4, 3, 4, 4)                       # black images: half the noise is below 0
    y = torch.tensor([0, 1, 2, 0])
    attacks.pgd_ce(model, x, y, steps=2, start=start, clamp_start=False, generator=torch.Generator().manual_seed(0))
    assert model.inputs[0].min() < 0                  # the unclamped start
    assert model.inputs[1].min() >= 0                 # projected after the first step
    noise = attacks.start_noise(x, 8 / 255, start, torch.Generator().manual_seed(0))
    assert torch.equal(model.inputs[0], x + noise)
    model.inputs.clear()
    attacks.pgd_ce(model, x, y, steps=1, start=start, clamp_start=True, generator=torch.Generator().manual_seed(0))
    assert model.inputs[0].min() >= 0


def test_path_samples_are_detached():
    """Regression: the path kept requires_grad, so a loss's backward built input gradients."""
    model = InputRecorder()
    x, y = torch.rand(4, 3, 4, 4), torch.tensor([0, 1, 2, 0])
    path = attacks.pgd_ce(model, x, y, steps=3, return_path=True)
    assert all(not p.requires_grad for p in path)
    up, tp = attacks.dual_branch_paths(model, x, y, x.flip(0), target=y, steps=2)
    assert all(not p.requires_grad for p in up + tp)


def test_joint_branches_draw_the_same_starts_as_split_ones():
    model = InputRecorder()
    x, y = torch.rand(4, 3, 4, 4), torch.tensor([0, 1, 2, 0])
    a = attacks.dual_branch_paths(model, x, y, x.flip(0), target=y, steps=2, joint=True,
                                  generator=torch.Generator().manual_seed(3))
    b = attacks.dual_branch_paths(model, x, y, x.flip(0), target=y, steps=2, joint=False,
                                  generator=torch.Generator().manual_seed(3))
    for p, q in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.allclose(p, q, atol=1e-6)
