"""params.yaml is checked as a whole, first: ranges and units, empty files, unknown keys, a given
teacher checkpoint; every stage stops on a mistake anywhere in the file, in seconds."""

import copy

import pytest

from robustkd.errors import InputError
from robustkd.models import create_model, save_checkpoint
from services.params import load_params

from .stage_fixtures import tiny_params, write_params


def params_with(tmp_path, edit):
    p = copy.deepcopy(tiny_params("raw"))
    edit(p)
    return write_params(tmp_path / "params.yaml", p)


def error_of(path) -> str:
    with pytest.raises(InputError) as err:
        load_params(path)
    return str(err.value)


def test_the_tiny_profile_and_the_presets_load(tmp_path):
    from .stage_fixtures import ROOT

    load_params(params_with(tmp_path, lambda p: None))
    from services.presets import preset_names, preset_text

    for preset in preset_names(ROOT):
        preset_text(ROOT, preset)      # merged over its base and loaded as a whole params.yaml


def test_eps_above_one_names_the_key_and_suggests_a_fraction(tmp_path):
    msg = error_of(params_with(tmp_path, lambda p: p["teacher"]["settings"].update(eps=8)))
    assert "params.yaml" in msg and "teacher.settings.eps" in msg and "found 8" in msg and "8/255" in msg


@pytest.mark.parametrize("edit, key", [
    (lambda p: p["distill"]["settings"]["darwin"].update(step_size=2), "distill.settings.darwin.step_size"),
    (lambda p: p["evaluate"]["config"].update(eps=8), "evaluate.config.eps"),
    (lambda p: p["evaluate"]["config"].update(pgd_step_size=0), "evaluate.config.pgd_step_size"),
    (lambda p: p["teacher"]["optim"].update(epochs=0), "epochs"),
    (lambda p: p["distill"]["optim"].update(batch_size=-4), "batch_size"),
    (lambda p: p["ddpm"].update(fraction=1.5), "ddpm.fraction"),
    (lambda p: p["evaluate"]["config"].update(batch_size=0), "evaluate.config.batch_size"),
    (lambda p: p["data"].update(test_per_class=0), "data.test_per_class"),
    (lambda p: p["teacher"]["optim"].update(momentum=1.2), "teacher.optim.momentum"),
    (lambda p: p["run"].update(seeed=1), "seeed"),
    (lambda p: p["teacher"].update(source="checkpoint", checkpoint="missing.pt"), "teacher.checkpoint"),
])
def test_out_of_range_values_name_the_key(tmp_path, edit, key):
    msg = error_of(params_with(tmp_path, edit))
    assert "params.yaml" in msg and key in msg


def test_an_empty_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("# nothing here\n")
    msg = error_of(path)
    assert str(path) in msg and "empty" in msg


def test_every_stage_stops_on_a_mistake_anywhere_in_the_file(tmp_path, monkeypatch, capsys):
    """A typo in the export section stops prepare_data, the first stage, before any work."""
    from stages import prepare_data

    params_with(tmp_path, lambda p: p["export"].update(latency_repeats=0))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        prepare_data.run([])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "export.latency_repeats" in lines[0]
    assert not (tmp_path / "data").exists()


def given(tmp_path, arch="resnet10_w8", num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
    path = tmp_path / "given.pt"
    save_checkpoint(create_model(arch, num_classes, mean, std), path)
    return path


@pytest.mark.parametrize("kwargs, words", [
    ({}, None),
    ({"arch": "resnet10_w16"}, "architecture"),
    ({"num_classes": 7}, "7 outputs"),
    ({"mean": (125.3, 123.0, 113.9), "std": (63.0, 62.1, 66.7)}, "[0, 1] pixel input"),
])
def test_a_given_teacher_is_checked_against_the_params(tmp_path, kwargs, words):
    from stages.train_teacher import given_teacher

    params = load_params(params_with(tmp_path, lambda p: p["teacher"].update(
        source="checkpoint", checkpoint=str(given(tmp_path, **kwargs)))))
    classes = [f"c{i}" for i in range(10)]
    if words is None:
        assert given_teacher("params.yaml", params.teacher, classes).arch == "resnet10_w8"
        return
    with pytest.raises(InputError, match=__import__("re").escape(words)):
        given_teacher("params.yaml", params.teacher, classes)


def test_every_preset_merges_over_its_base_and_validates(tmp_path):
    from services.presets import load_preset, preset_names, preset_text

    from .stage_fixtures import ROOT

    assert (ROOT / "params.yaml").read_text() == (ROOT / "params/cpu.yaml").read_text()
    for name in preset_names(ROOT):
        if name != "cpu":
            preset_text(ROOT, name)          # validated as a whole params.yaml
    full = load_preset(ROOT, "cifar100-resnet18")
    assert full["data"]["source"] == "cifar100" and full["distill"]["student"]["arch"] == "resnet18"
    assert full["teacher"]["model"]["arch"] == "wrn34_10" and full["distill"]["schedule"] == "official"
    assert full["distill"]["settings"]["darwin"]["eps"] == "8/255"          # from the base
    assert full["distill"]["settings"]["darwin"]["steps"] == 10             # from params/paper.yaml
    (tmp_path / "params").mkdir()
    (tmp_path / "params/cpu.yaml").write_text((ROOT / "params/cpu.yaml").read_text())
    (tmp_path / "params/bad.yaml").write_text("extends: cpu\ndistill: {optim: {epochs: 0}}\n")
    with pytest.raises(InputError, match="epochs"):
        preset_text(tmp_path, "bad")


def test_autoattack_custom_and_the_evaluation_cap_are_checked(tmp_path):
    from services.params import load_params

    from .stage_fixtures import tiny_params, write_params

    for edit, words in (({"config": {"autoattack_version": "custom"}}, "autoattack_attacks"),
                        ({"config": {"autoattack_attacks": ["apgd-ce"]}}, "autoattack_attacks"),
                        ({"config": {"autoattack_version": "fast"}}, "autoattack_version"),
                        ({"max_images": 0}, "evaluate.max_images")):
        params = tiny_params("raw")
        params["evaluate"] = {**params["evaluate"], **{k: v for k, v in edit.items() if k != "config"}}
        params["evaluate"]["config"].update(edit.get("config", {}))
        with pytest.raises(InputError, match=words):
            load_params(write_params(tmp_path / "params.yaml", params))
