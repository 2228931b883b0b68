"""The slides' DARWIN ablations: the named variants, and `dvc repro ablation/dvc.yaml` on tiny data
writing both tables."""

import json

import pytest

from robustkd.errors import InputError
from robustkd.methods import build_config
from robustkd.methods.darwin import ABLATIONS

from .stage_fixtures import ROOT, project_copy, sh, tiny_params, write_params


def test_each_variant_sets_the_modules_and_weighting_of_its_row():
    expect = {"arkd": (False, False, "adaptive", 0.5), "arkd_iakd": (True, False, "adaptive", 0.5),
              "arkd_dbkd": (False, True, "adaptive", 0.5), "full": (True, True, "adaptive", 0.5),
              "uniform": (True, True, "uniform", 0.5), "gamma0": (True, True, "adaptive", 0.0),
              "gamma1": (True, True, "adaptive", 1.0)}
    assert set(ABLATIONS) == set(expect)
    for name, (iakd, dbkd, weighting, gamma) in expect.items():
        # the user's other settings stay; the four fields the tables vary are the variant's
        cfg = build_config("darwin", {"steps": 3, "gamma": 0.2, "use_iakd": True, **ABLATIONS[name].settings})
        assert (cfg.use_iakd, cfg.use_dbkd, cfg.weighting, cfg.gamma, cfg.steps) == (iakd, dbkd, weighting, gamma, 3)
    assert [v for v in ABLATIONS if "modules" in ABLATIONS[v].tables] == ["arkd", "arkd_iakd", "arkd_dbkd", "full"]
    assert [v for v in ABLATIONS if "weighting" in ABLATIONS[v].tables] == ["full", "uniform", "gamma0", "gamma1"]


def test_the_variant_is_what_the_stage_runs_and_records(tmp_path):
    from services.params import load_params, with_ablation

    params = with_ablation(load_params(ROOT / "params.yaml"), "arkd_dbkd")
    assert params.distill.method == "darwin"
    block = params.distill.settings["darwin"]
    assert (block["use_iakd"], block["use_dbkd"], block["steps"]) == (False, True, 5)


@pytest.mark.parametrize("edit, words", [({"variants": ["arkd", "gamma2"]}, "ablation.variants names 'gamma2'"),
                                         ({"variants": ["arkd", "arkd"]}, "expected distinct names"),
                                         ({"seeds": [0, 0]}, "ablation.seeds")])
def test_bad_ablation_params_are_refused_when_the_file_is_read(tmp_path, edit, words):
    from services.params import load_params

    params = tiny_params("raw")
    params["ablation"].update(edit)
    with pytest.raises(InputError, match=words):
        load_params(write_params(tmp_path / "params.yaml", params))


@pytest.mark.slow
def test_the_ablation_pipeline_writes_both_tables_of_the_slides(tmp_path):
    """Three variants (both tables' rows are chosen from ablation.variants) to keep the test short."""
    params = tiny_params("raw")
    variants = ["arkd", "full", "gamma1"]
    params["ablation"].update(variants=variants, schedule="shared", seeds=[0])  # official batch 128 > tiny set
    params["evaluate"]["config"]["attacks"] = ["natural", "pgd20", "autoattack"]
    repo = project_copy(tmp_path, params)
    out = sh("dvc repro ablation/dvc.yaml", repo).stdout   # the main pipeline's data and teacher first
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    assert [s for s in ran if s.startswith("ablation/")] == \
        [f"ablation/dvc.yaml:distill@{v}-0" for v in variants] + \
        [f"ablation/dvc.yaml:evaluate@{v}-0" for v in variants] + ["ablation/dvc.yaml:table"]
    assert "train_teacher" in ran and "distill" not in ran      # the ablation trains no main student
    text = (repo / "reports/ablation.md").read_text()
    modules, weighting = text.split("## Diverse weighting strategies")
    rows = [line.split("|")[1:-1] for line in modules.splitlines() if line.startswith("| ") and "[" in line]
    assert [[c.strip() for c in r[:3]] for r in rows] == [["✓", "", ""], ["✓", "✓", "✓"]]
    rows = [line.split("|")[1:-1] for line in weighting.splitlines() if line.startswith("| ") and "[" in line]
    assert [r[0].strip() for r in rows] == ["gamma = 0.5", "gamma = 1"]
    assert all("[" in c for r in rows for c in r[1:4])          # Natural, PGD-20, AA with intervals
    assert rows[0][4].strip() == "-" and "(" in rows[1][4]       # AutoAttack McNemar against full
    numbers = json.loads((repo / "reports/ablation.json").read_text())
    assert set(numbers["variants"]) == set(variants)
    assert numbers["variants"]["arkd"]["settings"] == {"use_iakd": False, "use_dbkd": False,
                                                       "weighting": "adaptive", "gamma": 0.5}
    # each variant trained what it says: ARKD alone has no IAKD or DBKD term
    history = (repo / "models/ablation/arkd/seed0/darwin_history.csv").read_text().splitlines()
    head, last = history[0].split(","), history[-1].split(",")
    assert float(last[head.index("iakd")]) == 0.0 and float(last[head.index("dbkd")]) == 0.0
    assert float(last[head.index("loss")]) > 0.0
