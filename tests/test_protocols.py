"""Issue 24, item 6: the evaluation settings of the papers compared with, by name
(``evaluate.protocol``: project | rslad | ard | iad | autoattack), the project's by default.

A protocol sets the attack keys its paper's code uses; a key of evaluate.config left at the
project's value is replaced, a key given the protocol's own value is accepted, any other value
contradicts the protocol and stops loading with one line; an unknown name does too."""

import json
import math
from dataclasses import replace

import pytest
import torch
import yaml

from robustkd.errors import InputError
from robustkd.evaluation import PROTOCOLS, EvalConfig, apply_protocol, attack_settings, make_attack
from services.params import load_params

from .stage_fixtures import ROOT, tiny_params, write_params


def params_file(tmp_path, protocol=None, **config):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    if protocol is not None:
        raw["evaluate"]["protocol"] = protocol
    raw["evaluate"]["config"].update(config)
    return write_params(tmp_path / "params.yaml", raw)


def test_the_default_is_the_project_protocol_with_todays_settings(tmp_path):
    p = load_params(params_file(tmp_path))
    assert p.evaluate.protocol == "project" and p.evaluate.protocol_replaced == []
    cfg = p.evaluate.config
    assert (cfg.pgd_steps, cfg.cw_steps, cfg.cw_kappa, cfg.autoattack_version) == (20, 30, 50.0, "standard")
    assert math.isclose(cfg.pgd_step_size, 2 / 255) and math.isclose(cfg.cw_step_size, 0.003)
    assert cfg.pgd_clamp_start is True and math.isclose(cfg.eps, 8 / 255)


@pytest.mark.parametrize("name, expected", [
    ("rslad", dict(pgd_steps=20, pgd_step_size=0.003, cw_steps=30, cw_step_size=0.003, autoattack_version="standard")),
    ("ard", dict(pgd_steps=10, pgd_step_size=2 / 255, pgd_clamp_start=False)),
    ("iad", dict(pgd_steps=20, pgd_step_size=2 / 255, cw_steps=30, cw_step_size=2 / 255, cw_kappa=50.0)),
    ("autoattack", dict(eps=8 / 255, autoattack_version="standard")),
])
def test_a_protocol_replaces_the_project_values_of_params_yaml(tmp_path, name, expected):
    # params.yaml lists the project's values explicitly: they are replaced, and the stage is told which
    p = load_params(params_file(tmp_path, name))
    cfg = p.evaluate.config
    for key, value in expected.items():
        got = getattr(cfg, key)
        assert (math.isclose(got, value) if isinstance(value, float) else got == value), (key, got, value)
    changed = {k for k, v in PROTOCOLS[name].settings.items() if getattr(EvalConfig(), k) != v}
    assert set(p.evaluate.protocol_replaced) == changed
    # keys the protocol does not set keep evaluate.config's values
    assert cfg.batch_size == 100 and cfg.attacks == ["natural", "pgd20", "cw", "autoattack"]


def test_a_key_set_to_the_protocols_own_value_is_accepted(tmp_path):
    p = load_params(params_file(tmp_path, "rslad", pgd_step_size=0.003))
    assert math.isclose(p.evaluate.config.pgd_step_size, 0.003)


def test_a_contradicting_key_fails_with_one_line_naming_it(tmp_path):
    path = params_file(tmp_path, "rslad", pgd_step_size="4/255")
    with pytest.raises(InputError) as exc:
        load_params(path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg
    assert "evaluate.config.pgd_step_size" in msg and "'rslad'" in msg and "0.003" in msg and "0.0156" in msg


def test_an_unknown_protocol_fails_with_one_line_naming_the_key_the_names_and_the_value(tmp_path):
    path = params_file(tmp_path, "trades")
    with pytest.raises(InputError) as exc:
        load_params(path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and "evaluate.protocol" in msg and "'trades'" in msg
    assert all(name in msg for name in PROTOCOLS)
    with pytest.raises(InputError, match="evaluate.protocol"):
        apply_protocol(EvalConfig(), "trades")


def test_every_setting_of_every_protocol_has_a_source():
    for name, protocol in PROTOCOLS.items():
        for key in protocol.settings:
            assert any(key == s or key.startswith(s) for s in protocol.sources), (name, key)
            assert hasattr(EvalConfig(), key), (name, key)
        for source in protocol.sources.values():
            assert "@" in source or "paper" in source or "[choice]" in source or "Croce" in source \
                or "RobustBench" in source, (name, source)


def test_ards_start_is_not_clamped_before_the_first_gradient():
    """ARD's official test() takes its first gradient at x + U(-eps, eps), unclamped: with no
    step the attack returns that start, outside [0, 1] for black pixels; the project's is clamped."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
    x, y = torch.zeros(4, 3, 4, 4), torch.arange(4)
    ard = replace(apply_protocol(EvalConfig(), "ard"), pgd_steps=0)
    xa, _ = make_attack("pgd20", model, ard, "cpu")(x, y, 0)
    assert xa.min() < 0
    xp, _ = make_attack("pgd20", model, replace(EvalConfig(), pgd_steps=0), "cpu")(x, y, 0)
    assert xp.min() >= 0
    assert attack_settings(ard)["pgd20"]["start_clamped_to_0_1"] is False


def test_the_stage_records_the_protocol_and_its_sources(tmp_path, monkeypatch, capsys):
    from robustkd.data import ImageSet
    from robustkd.checkpoints import save_checkpoint
    from robustkd.models import create_model
    from services.common import save_imageset
    from stages import evaluate

    g = torch.Generator().manual_seed(0)
    test = ImageSet(torch.randint(0, 256, (10, 3, 32, 32), generator=g, dtype=torch.uint8),
                    torch.arange(10), [f"c{i}" for i in range(10)])
    save_imageset(test, tmp_path / "data/prepared/test.npz")
    torch.manual_seed(0)
    save_checkpoint(create_model("resnet10_w8"), tmp_path / "model.pt", method="test")
    params = tiny_params(str(tmp_path / "raw"))
    params["evaluate"].update(protocol="ard", per_class=1, autoattack_per_class=None)
    params["evaluate"]["config"] = {**params["evaluate"]["config"], "attacks": ["natural", "pgd20"], "masking_images": 2,
                                    "unbounded_steps": 2, "sweep_steps": 1, "pgd_steps": 20}
    write_params(tmp_path / "params.yaml", params)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBUSTKD_TRACKING", "off")
    evaluate.run(["--model", "model.pt", "--out", "out/model.json"])
    info = json.loads((tmp_path / "out/model_info.json").read_text())
    assert info["protocol"]["name"] == "ard" and info["protocol"]["replaced"] == ["pgd_steps", "pgd_clamp_start"]
    assert "779ade36" in info["protocol"]["sources"]["pgd_steps"]
    assert info["attacks"]["pgd20"]["steps"] == 10 and info["config"]["pgd_clamp_start"] is False
    assert info["precision"] == "fp32 (TF32 off)" and info["compiled_parts"] == []
    # images/s of every attack, the masking checks' included
    assert {"natural", "pgd20", "unbounded", "sweep_8"} <= set(info["speed"])
    out = capsys.readouterr()
    assert "evaluate.protocol ard:" in out.out
    assert "[evaluate pgd20] batch 1/1, 10/10 images" in out.err and "eta" in out.err
