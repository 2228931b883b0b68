"""params.yaml is checked as a whole, first: ranges and units, empty files, unknown keys, a given
teacher checkpoint; every stage stops on a mistake anywhere in the file, in seconds."""

import copy

import pytest

from robustkd.errors import InputError
from robustkd.checkpoints import save_checkpoint
from robustkd.models import create_model
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
        params["evaluate"]["config"].update(autoattack_version="standard", autoattack_attacks=[])  # tiny's: custom
        params["evaluate"]["config"].update(edit.get("config", {}))
        with pytest.raises(InputError, match=words):
            load_params(write_params(tmp_path / "params.yaml", params))


@pytest.mark.parametrize("edit, words", [
    (lambda p: p["data"].update(train_per_class="many"), "data.train_per_class: expected an integer or null, found 'many'"),
    (lambda p: p["data"].update(test_per_class=[3]), "data.test_per_class: expected an integer or null"),
    (lambda p: p["evaluate"]["config"].update(eps="1/0"), "evaluate.config.eps: expected a number or a fraction"),
    (lambda p: p["teacher"]["settings"].update(eps="8/0"), "teacher.settings.eps: expected a number or a fraction"),
    (lambda p: p["export"].update(per_class=10), "export.per_class: expected at most data.test_per_class (3)"),
    (lambda p: p["evaluate"].update(per_class=4), "evaluate.per_class: expected at most data.test_per_class (3)"),
    (lambda p: p["evaluate"].update(per_class=None, autoattack_per_class=4),
     "evaluate.autoattack_per_class: expected at most data.test_per_class (3)"),
    (lambda p: p["data"].update(source="cifar10", test_per_class=None) or p["evaluate"].update(per_class=1001),
     "evaluate.per_class: expected at most the 1000 test images per class of cifar10"),
    (lambda p: p["data"].update(source="cifar100", test_per_class=101), "data.test_per_class: expected at most the 100"),
    (lambda p: p["data"].update(source="cifar100", train_per_class=500, heldout_per_class=1),
     "data.train_per_class + data.heldout_per_class: expected at most the 500 training images"),
    (lambda p: p["data"].update(source="cifar10") or p["attention"].update(images=11),
     "attention.images: expected at most the 10 classes of cifar10"),
    (lambda p: p["run"].update(device="cuda:63"), "run.device: expected a device of this machine"),
    (lambda p: p["run"].update(device="gpu"), "run.device: expected auto, cpu, cuda, cuda:N or mps"),
    (lambda p: p["registry"].update(model_name="x' or name != '"), "registry.model_name: expected a name"),
    (lambda p: p["registry"].update(model_name="a/b"), "registry.model_name: expected a name"),
])
def test_counts_devices_fractions_and_names_are_checked_at_load(tmp_path, edit, words):
    """Each cross-key count, device string, fraction and registry name stops load_params with one
    line naming the key (before any stage ran), never a TypeError or ZeroDivisionError later."""
    msg = error_of(params_with(tmp_path, edit))
    assert words in msg and len(msg.splitlines()) == 1, msg


def test_counts_within_the_prepared_test_set_and_known_devices_load(tmp_path):
    def edit(p):
        p["evaluate"].update(per_class=3, autoattack_per_class=3)
        p["export"].update(per_class=3)
        p["run"].update(device="cpu")
    load_params(params_with(tmp_path, edit))
    load_params(params_with(tmp_path, lambda p: p["data"].update(source="cifar10", test_per_class=None)
                            or p["attention"].update(images=10)))


def test_a_model_name_with_a_quote_is_quoted_in_mlflow_search_filters(tmp_path, monkeypatch):
    """services.tracking.filter_literal: pipeline/registry.py finds a version of a model whose name
    holds a quote (pasted into the filter unquoted, the search failed and found nothing)."""
    import mlflow

    from pipeline.registry import find_registered
    from services.tracking import filter_literal

    assert filter_literal("robustkd-student") == "'robustkd-student'" and filter_literal("it's") == '"it\'s"'
    for bad in ("a'\"b", "a\\b", "a\nb"):
        with pytest.raises(ValueError, match="cannot be written"):
            filter_literal(bad)
    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                 registry_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("it's", "its"):
        client.create_registered_model(name)
        client.create_model_version(name, source=str(tmp_path), tags={"onnx_sha256": f"sha-{name}"})
    found = find_registered(client, "it's", "sha-it's")
    assert found is not None and found.name == "it's" and int(found.version) == 1
    assert find_registered(client, "it's", "sha-its") is None


def test_an_evaluation_seed_is_refused_as_run_seed_is_the_one_read(tmp_path):
    from services.params import load_params

    from .stage_fixtures import tiny_params, write_params

    params = tiny_params("raw")
    params["evaluate"]["config"]["seed"] = 3
    with pytest.raises(InputError, match=r"evaluate.config.seed is not read: the evaluation is seeded by run.seed"):
        load_params(write_params(tmp_path / "params.yaml", params))
