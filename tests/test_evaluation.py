"""The evaluation protocol's checks (SPEC.md, "Evaluation protocol"): each one passes on a sound
model and attack, and fails when fed a broken attack or a gradient-masked model; a failed check
flags the result and keeps every figure measured."""

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustkd import attacks, evaluation
from robustkd.errors import InputError
from robustkd.evaluation import (EvalConfig, captured_warnings, check_autoattack_warnings, check_eps_sweep,
                                 check_not_above_natural, check_perturbation, check_range, check_recomputed,
                                 check_unbounded, evaluate_model, perturbation_stats, summarize)

CPU = torch.device("cpu")
C = 10
EPS = 8 / 255


class MeanModel(nn.Module):
    """Reads only the mean pixel value m: logits_j = -200 (m - j/9)^2, so class j is "brightness
    j/9" and an attack must move the mean by half a class gap (1/18) to change a prediction.

    ``quantise`` rounds m to the class grid first: the same predictions, but ``round`` has a
    zero gradient, so every gradient attack is blind (gradient masking, by construction)."""

    def __init__(self, quantise: bool = False):
        super().__init__()
        self.quantise = quantise
        self.register_buffer("centres", torch.arange(C, dtype=torch.float32) / (C - 1))

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        if self.quantise:
            m = torch.round(m * (C - 1)) / (C - 1)
        return -200.0 * (m - self.centres) ** 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors of a few hundred numbers: threads only add synchronisation (seconds on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images(offset=0.0, per_class=2, seed=0):
    """Images of mean j/9 + offset (small noise), two per class, labelled j."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat_interleave(per_class)
    noise = (torch.rand(len(y), 3, 8, 8, generator=g) - 0.5) * 0.02
    x = (y.float()[:, None, None, None] / (C - 1) + offset + noise).clamp(0, 1)
    return x, y


def config(**kw):
    base = dict(attacks=["natural", "pgd20"], pgd_steps=10, cw_steps=10, batch_size=8, masking_images=20,
                unbounded_steps=100, sweep_steps=10)
    return EvalConfig(**{**base, **kw})


def run(model, x, y, cfg=None, **kw):
    return evaluate_model(model, x, y, cfg or config(), CPU, log=lambda *_: None, **kw)


def with_broken(monkeypatch, name, broken):
    """Replace the protocol's attack ``name`` by ``broken(model, cfg)`` -> AttackFn."""
    original = evaluation.make_attack

    def make(attack, model, cfg, device):
        return broken(model, cfg) if attack == name else original(attack, model, cfg, device)
    monkeypatch.setattr(evaluation, "make_attack", make)


# ----------------------------------------------------------------------------- a sound evaluation
def test_a_sound_model_and_attack_pass_every_check():
    x, y = images()
    result = run(MeanModel(), x, y, config(attacks=["natural", "pgd20", "cw"]))
    assert not result.flagged, {k: c.detail for k, c in result.checks.items() if not c.passed}
    assert {"pgd20/linf", "pgd20/range", "pgd20/recomputed", "pgd20/not_above_natural", "cw/linf",
            "masking/unbounded", "masking/eps_sweep"} <= set(result.checks)
    assert int(result.correct["natural"].sum()) == len(y)       # every image right
    assert int(result.masking["unbounded"].sum()) == 0          # eps = 1 moves any mean anywhere
    assert int(result.masking["sweep_16"].sum()) < len(y)       # 16/255 > half a class gap for some


def test_worst_case_is_per_image_and_reported_figures_never_exceed_natural():
    x, y = images(offset=0.04)  # 0.04 of 1/18 = 0.056: PGD at 8/255 (0.031) flips every image
    x[::2] = images()[0][::2]   # half the images back in the middle of their class
    result = run(MeanModel(), x, y, config(attacks=["natural", "pgd20", "cw"]))
    nat = result.correct["natural"]
    for name, c in result.correct.items():
        assert not (c & ~nat).any(), name
    assert torch.equal(result.worst_case, nat & result.correct["pgd20"] & result.correct["cw"])
    assert 0 < int(result.worst_case.sum()) < len(y)


def test_an_attack_on_a_subset_reports_its_own_total_and_the_worst_case_over_it():
    """The protocol's AutoAttack runs on a stratified subset: its figure is over those images,
    and the worst case over the images every attack saw; the summary says each total."""
    x, y = images(offset=0.04)
    x[::2] = images()[0][::2]
    subset = torch.arange(10)                                 # classes 0-4, a robust and a flipped image each
    cfg = config(attacks=["natural", "pgd20", "cw"])
    full = run(MeanModel(), x, y, cfg)
    part = run(MeanModel(), x, y, cfg, subsets={"cw": subset})
    assert len(part.correct["cw"]) == len(subset) and len(part.correct["pgd20"]) == len(y)
    assert torch.equal(part.correct["pgd20"], full.correct["pgd20"])     # the others as before
    assert torch.equal(part.positions["worst_case"], subset)
    assert torch.equal(part.worst_case, part.correct["natural"][subset] & part.correct["pgd20"][subset]
                       & part.correct["cw"])
    assert 0 < int(part.worst_case.sum()) < len(subset)
    s = summarize(part, y, [str(i) for i in range(C)])
    assert s["accuracy"]["cw"]["total"] == len(subset) and s["accuracy"]["pgd20"]["total"] == len(y)
    assert s["accuracy"]["worst_case"]["total"] == len(subset) and s["num_images"] == len(y)
    assert set(s["per_class_accuracy"]["cw"]) == {"0", "1", "2", "3", "4"}
    assert not part.flagged
    with pytest.raises(InputError, match="distinct positions"):
        run(MeanModel(), x, y, cfg, subsets={"cw": torch.tensor([0, 0])})
    with pytest.raises(InputError, match="evaluated attacks"):
        run(MeanModel(), x, y, cfg, subsets={"autoattack": subset})


# ----------------------------------------------------------------------------- perturbation checks
def test_perturbation_checks_on_vectors():
    x = torch.full((3, 3, 4, 4), 0.5)
    ok = x + EPS
    linf, in_range = perturbation_stats(ok, x)
    assert check_perturbation(linf, EPS, "a").passed and check_range(in_range, "a").passed
    linf, _ = perturbation_stats(x + 2 * EPS, x)
    assert not check_perturbation(linf, EPS, "a").passed
    out = x.clone()
    out[1, 0, 0, 0] = -1e-3
    _, in_range = perturbation_stats(out, x)
    res = check_range(in_range, "a")
    assert not res.passed and "1 of 3" in res.detail
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    linf, in_range = perturbation_stats(nan, x)
    assert not check_perturbation(linf, EPS, "a").passed and not check_range(in_range, "a").passed
    with pytest.raises(InputError):
        perturbation_stats(x[:, :, :2], x)


def test_an_attack_leaving_the_ball_is_flagged_and_its_figures_kept(monkeypatch):
    def outside(model, cfg):
        def attack(xb, yb, first):
            xa = (xb + 2 * cfg.eps).clamp(0, 1)
            return xa, model(xa).argmax(1)
        return attack
    with_broken(monkeypatch, "pgd20", outside)
    x, y = images()
    result = run(MeanModel(), x, y)
    assert result.flagged and "pgd20/linf" in result.failed and "pgd20/range" not in result.failed
    assert "18 of 20 image(s) outside the ball" in result.checks["pgd20/linf"].detail
    assert len(result.correct["pgd20"]) == len(y)  # measured anyway


def test_an_attack_leaving_0_1_is_flagged(monkeypatch):
    def unclamped(model, cfg):
        def attack(xb, yb, first):
            xa = xb + cfg.eps  # inside the ball, but above 1 where x is near 1
            return xa, model(xa).argmax(1)
        return attack
    with_broken(monkeypatch, "pgd20", unclamped)
    x, y = images()
    result = run(MeanModel(), x, y)
    assert "pgd20/range" in result.failed and "pgd20/linf" not in result.failed


# ----------------------------------------------------------------------------- recomputed accuracy
def test_recomputed_check_on_vectors():
    a = torch.tensor([True, False, True])
    assert check_recomputed(a, a.clone(), "a").passed
    res = check_recomputed(a, torch.tensor([True, False, False]), "a")
    assert not res.passed and "1 image(s) differ" in res.detail


def test_labels_inconsistent_with_x_adv_are_caught(monkeypatch):
    def claims_all_correct(model, cfg):
        def attack(xb, yb, first):
            xa = attacks.pgd_ce(model, xb, yb, eps=1.0, alpha=0.1, steps=10, start=None)  # beats every image
            return attacks.project(xa, xb, cfg.eps), yb.clone()   # ... and reports the labels
        return attack
    with_broken(monkeypatch, "pgd20", claims_all_correct)
    x, y = images(offset=0.04)
    result = run(MeanModel(), x, y)
    assert "pgd20/recomputed" in result.failed
    assert "pgd20/linf" not in result.failed


def test_a_model_changed_by_the_attack_is_caught_by_the_separate_copy(monkeypatch):
    """The attack shifts the model it attacks (as a train-mode forward shifts batch-norm buffers):
    its own figure agrees with the changed model, not with the model as loaded."""
    def shifts_the_model(model, cfg):
        def attack(xb, yb, first):
            model.centres += 1.0 / (C - 1)          # every prediction moves one class down
            with torch.no_grad():
                return xb, model(xb).argmax(1)
        return attack
    with_broken(monkeypatch, "pgd20", shifts_the_model)
    x, y = images()
    model = MeanModel()
    result = run(model, x, y)
    assert "pgd20/recomputed" in result.failed


# ----------------------------------------------------------------------------- not above natural
def test_not_above_natural_on_vectors():
    nat = torch.tensor([True, False, False])
    assert check_not_above_natural(nat, torch.tensor([False, False, False]), "a").passed
    res = check_not_above_natural(nat, torch.tensor([True, True, False]), "a")
    assert not res.passed and "1 image(s)" in res.detail


def descending_pgd(model, x, y, **kw):
    """A broken PGD: it *descends* the loss, pushing images towards their label."""
    return attacks.pgd(model, x, lambda z: -F.cross_entropy(z.float(), y, reduction="none"), **kw)


def half_wrong():
    """Images 0.04 above their class centre: labels of the class above for half of them (wrong
    by 0.016 of the decision boundary; any step towards the label fixes them)."""
    x, y = images(offset=0.04)
    y = y.clone()
    y[y < C - 1] += (torch.arange(int((y < C - 1).sum())) % 2)
    return x, y


def test_an_attack_that_helps_fails_not_above_natural_and_the_masking_checks(monkeypatch):
    monkeypatch.setattr(attacks, "pgd_ce", descending_pgd)
    x, y = half_wrong()
    result = run(MeanModel(), x, y)
    nat, own = result.own["natural"], result.own["pgd20"]
    assert (own & ~nat).any()
    assert {"pgd20/not_above_natural", "masking/eps_sweep", "masking/unbounded"} <= set(result.failed)
    assert not (result.correct["pgd20"] & ~nat).any()   # the reported figure counts them wrong
    assert "rise" in result.checks["masking/eps_sweep"].detail


# ----------------------------------------------------------------------------- gradient masking
def test_eps_sweep_check_on_figures():
    assert check_eps_sweep({0.0: 90, 2 / 255: 70, 4 / 255: 70, 8 / 255: 40, 16 / 255: 10}, 0.0).passed
    res = check_eps_sweep({0.0: 90, 2 / 255: 60, 4 / 255: 75, 8 / 255: 40}, 2.0)
    assert not res.passed and "4/255" in res.detail and "15.00 points" in res.detail
    assert check_eps_sweep({0.0: 90, 2 / 255: 60, 4 / 255: 61}, 2.0).passed   # within tolerance


def test_unbounded_check_on_figures():
    assert check_unbounded(torch.tensor([False] * 9 + [True]), C, 5.0, 1.0).passed      # 10% = chance
    assert not check_unbounded(torch.tensor([False] * 8 + [True] * 2), C, 5.0, 1.0).passed  # 20%


def test_a_gradient_masked_model_fails_the_unbounded_check():
    """Same predictions as MeanModel, zero gradient: PGD stays at x even at eps = 1."""
    x, y = images()
    masked = run(MeanModel(quantise=True), x, y)
    assert "masking/unbounded" in masked.failed
    assert int(masked.masking["unbounded"].sum()) == len(y)
    assert "100.0% on 20 image(s)" in masked.checks["masking/unbounded"].detail
    # the bounded figures alone look like a perfectly robust model, and pass their own checks
    assert int(masked.correct["pgd20"].sum()) == len(y)
    assert not any(k.startswith("pgd20/") for k in masked.failed)


def test_masking_checks_use_the_first_images_only():
    x, y = images()
    result = run(MeanModel(), x, y, config(masking_images=4))
    assert len(result.masking["unbounded"]) == 4 and set(result.masking) == {
        "unbounded", "sweep_0", "sweep_2", "sweep_4", "sweep_8", "sweep_16"}


# ----------------------------------------------------------------------------- AutoAttack's warnings
def test_autoattack_warnings_are_captured_and_flag_the_result(monkeypatch):
    def warns(model, cfg):
        def attack(xb, yb, first):
            logging.getLogger("auto-attack").info("setting parameters for standard version")  # not a warning
            logging.getLogger("auto-attack").warning("Square Attack has decreased the robust accuracy of 5.00%.")
            with torch.no_grad():
                return xb, model(xb).argmax(1)
        return attack
    with_broken(monkeypatch, "autoattack", warns)
    x, y = images()
    result = run(MeanModel(), x, y, config(attacks=["natural", "autoattack"]))
    assert result.autoattack_warnings == ["Square Attack has decreased the robust accuracy of 5.00%."] * 3
    assert result.failed == ["autoattack/warnings"]
    assert "Square Attack" in result.checks["autoattack/warnings"].detail


def test_real_autoattack_warns_on_a_gradient_masked_model_and_the_warning_flags_it():
    """pyautoattack's own check: APGD finds zero gradients (about 9 s on one core)."""
    x, y = images()
    result = run(MeanModel(quantise=True), x[::4], y[::4], config(attacks=["natural", "autoattack"], masking_images=0))
    assert result.failed == ["autoattack/warnings"]
    assert any("zero gradient" in m for m in result.autoattack_warnings)
    assert int(result.correct["autoattack"].sum()) == 5   # the figure is still there: "fully robust"


def test_captured_warnings_leave_the_logger_as_found():
    logger = logging.getLogger("auto-attack")
    before = list(logger.handlers)
    with captured_warnings() as caught:
        logger.warning("x")
    logger.warning("after")
    assert caught == ["x"] and logger.handlers == before
    assert check_autoattack_warnings([]).passed


# ----------------------------------------------------------------------------- results
def _numbers_only(obj, where=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _numbers_only(v, f"{where}/{k}")
    else:
        assert isinstance(obj, (int, float)) and not isinstance(obj, bool), (where, obj)


def test_summary_is_numeric_counts_and_rounded_percentages(monkeypatch):
    def outside(model, cfg):
        def attack(xb, yb, first):
            xa = (xb + 2 * cfg.eps).clamp(0, 1)
            return xa, model(xa).argmax(1)
        return attack
    with_broken(monkeypatch, "pgd20", outside)
    x, y = images(offset=0.04)
    x[:7] = images()[0][:7]
    result = run(MeanModel(), x, y, config(attacks=["natural", "pgd20"]))
    summary = summarize(result, y, [f"c{i}" for i in range(C)])
    json.dumps(summary)
    _numbers_only(summary)
    acc = summary["accuracy"]["natural"]
    assert acc["total"] == 20 and summary["natural"] == round(100 * acc["correct"] / 20, 2)
    assert acc["ci95_low"] <= summary["natural"] <= acc["ci95_high"]
    assert set(summary["accuracy"]) == {"natural", "pgd20", "worst_case"}
    assert summary["flagged"] == 1 and summary["checks"]["pgd20"]["linf"] == 0
    assert summary["checks"]["pgd20"]["range"] == 1 and summary["checks_failed"] == 1
    assert set(summary["per_class_accuracy"]["pgd20"]) == {f"c{i}" for i in range(C)}
    assert summary["gradient_masking"]["eps_sweep_255"]["0"] == summary["natural"]


def test_checks_off_measures_only():
    x, y = images()
    result = run(MeanModel(quantise=True), x, y, config(checks=False))
    assert result.checks == {} and not result.flagged and result.masking == {}


def test_bad_settings_are_input_errors():
    with pytest.raises(InputError):
        EvalConfig(attacks=["natural", "fgsm"])
    with pytest.raises(InputError):
        EvalConfig(sweep_eps=[0.0, 8 / 255, 4 / 255])


# ----------------------------------------------------------------------------- the stage
@pytest.fixture
def stage_dir(tmp_path, monkeypatch):
    """A prepared 20-image test set, an untrained checkpoint and a tiny params.yaml."""
    from robustkd.data import ImageSet
    from robustkd.checkpoints import save_checkpoint
    from robustkd.models import create_model
    from services.common import save_imageset

    from .stage_fixtures import tiny_params, write_params

    g = torch.Generator().manual_seed(0)
    test = ImageSet(torch.randint(0, 256, (20, 3, 32, 32), generator=g, dtype=torch.uint8),
                    torch.arange(20) % C, [f"c{i}" for i in range(C)])
    save_imageset(test, tmp_path / "data/prepared/test.npz")
    torch.manual_seed(0)
    save_checkpoint(create_model("resnet10_w8"), tmp_path / "model.pt", method="test")
    params = tiny_params(str(tmp_path / "raw"))
    params["evaluate"]["config"].update(attacks=["natural", "pgd20"], pgd_steps=2, masking_images=4,
                                        unbounded_steps=5, sweep_steps=2)
    write_params(tmp_path / "params.yaml", params)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBUSTKD_TRACKING", "off")
    return tmp_path, params


def _outside(model, cfg):
    def attack(xb, yb, first):
        xa = (xb + 2 * cfg.eps).clamp(0, 1)
        with torch.no_grad():
            return xa, model(xa).argmax(1)
    return attack


def test_stage_writes_a_flagged_result_and_continues(stage_dir, monkeypatch, capsys):
    from stages import evaluate

    tmp, _ = stage_dir
    with_broken(monkeypatch, "pgd20", _outside)
    evaluate.run(["--model", "model.pt", "--out", "out/model.json"])
    from services.results import read_evaluation

    m = read_evaluation(tmp / "out/model.json")
    info = m["info"]
    assert json.loads((tmp / "out/model.json").read_text())["flagged"] == 1
    assert m["flagged"] == 1 and m["checks"]["pgd20"]["linf"] == 0 and m["accuracy"]["pgd20"]["total"] == 20
    assert "pgd20/linf" in info["failed_checks"] and "outside the ball" in info["checks"]["pgd20/linf"]["detail"]
    assert info["subset"]["per_class"] == 2 and info["method"] == "test"
    assert "flagged" in capsys.readouterr().err


def test_stage_with_fail_on_check_writes_then_exits_1(stage_dir, monkeypatch, capsys):
    from stages import evaluate

    from .stage_fixtures import write_params

    tmp, params = stage_dir
    params["evaluate"]["config"]["fail_on_check"] = True
    write_params(tmp / "params.yaml", params)
    with_broken(monkeypatch, "pgd20", _outside)
    with pytest.raises(SystemExit) as err:
        evaluate.run(["--model", "model.pt", "--out", "out/model.json"])
    assert err.value.code == 1
    assert json.loads((tmp / "out/model.json").read_text())["flagged"] == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "model.pt" in lines[0]
    assert np.load(tmp / "out/model_per_image.npz", allow_pickle=False)["pgd20"].shape == (20,)


def _written(tmp, name, correct: dict, flagged=0):
    """A results trio as the stage writes it, for the readers' tests."""
    from services.common import save_arrays, write_json
    from services.results import info_path, per_image_path

    from robustkd.stats import accuracy_record

    path = tmp / f"{name}.json"
    n = len(next(iter(correct.values())))
    records = {k: accuracy_record(sum(v), n) for k, v in correct.items()}
    write_json({"num_images": n, "flagged": flagged, **{k: r["percent"] for k, r in records.items()},
                "accuracy": records}, path)
    write_json({"arch": "tiny", "method": name,
                "subset": {"description": "first 1 per class", "images_sha256": "ab" * 32},
                "checks": {"pgd20/linf": {"passed": not flagged, "detail": "because"}},
                "failed_checks": ["pgd20/linf"] if flagged else []}, info_path(path))
    save_arrays(per_image_path(path), index=np.arange(n), **{k: np.array(v, np.uint8) for k, v in correct.items()})
    return path


def test_tables_show_intervals_flags_and_mcnemar(tmp_path):
    from stages.compare_table import table_text
    from services.results import read_evaluation
    from services.tables import checks_lines, markdown_to_html_table, paired_lines

    a = _written(tmp_path, "a", {"natural": [1] * 8 + [0] * 2, "pgd20": [1] * 6 + [0] * 4})
    b = _written(tmp_path, "b", {"natural": [1] * 2 + [0] * 8, "pgd20": [0] * 10}, flagged=1)
    rows = [("a", read_evaluation(a)), ("b", read_evaluation(b))]
    paired = paired_lines({"a": a, "b": b}, [("b", "a")])
    assert "| b vs a | Natural | 10 | 0 | 6 | 0.0312 |" in paired      # 2 / 2^6
    text = table_text(rows, paired)
    assert "| a | 80.00 [49.0, 94.3] | 60.00 [31.3, 83.2] | - | - | - | passed |" in text
    assert "| b |" in text and "FLAGGED" in text and "abababababababab" in text
    assert checks_lines(rows)[1:] == ["- b: FLAGGED, 1 check(s) failed", "  - pgd20/linf: because"]
    page = markdown_to_html_table(text)
    assert page.count("<table>") == 2 and page.count("</table>") == 2 and "<p>Exact McNemar" in page


def test_comparison_over_seeds_mean_std_and_every_pair(tmp_path):
    from types import SimpleNamespace

    from services.results import read_evaluation
    from stages.compare_table import pairwise_autoattack, seed_summary, summary_text

    params = SimpleNamespace(compare=SimpleNamespace(methods=["darwin", "rslad", "ard"], seeds=[0, 1]))
    outcomes = {("darwin", 0): [1] * 8 + [0] * 2, ("darwin", 1): [1] * 6 + [0] * 4,
                ("rslad", 0): [0] * 10, ("rslad", 1): [1] * 2 + [0] * 8,
                ("ard", 0): [1] * 8 + [0] * 2, ("ard", 1): [1] * 6 + [0] * 4}
    paths = {}
    for (m, s), aa in outcomes.items():
        paths[f"{m}_seed{s}"] = _written(tmp_path, f"{m}_seed{s}", {"natural": [1] * 10, "autoattack": aa})
    rows = {name: read_evaluation(p) for name, p in paths.items()}
    summary = seed_summary(params, rows)
    assert summary["darwin"]["autoattack"] == {"mean": 70.0, "std": 14.14, "values": [80.0, 60.0]}
    assert summary["rslad"]["autoattack"]["mean"] == 10.0 and summary["darwin"]["seeds"] == [0, 1]
    text = summary_text(params, summary, None)
    assert "| darwin | 100.00 ± 0.00 | - | - | 70.00 ± 14.14 |" in text and "| 0, 1 |" in text
    pairs = pairwise_autoattack(params, paths)
    assert len(pairs) == 2 + 3 * 2                        # 3 pairs of methods, 2 seeds each
    assert "| darwin_seed0 vs rslad_seed0 | AA | 10 | 8 | 0 | 0.00781 |" in pairs   # 2 / 2^8, on 10 images
    assert "| darwin_seed0 vs ard_seed0 | AA | 10 | 0 | 0 | 1 |" in pairs
