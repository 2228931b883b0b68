"""Every preset of params/ runs: its smoke run (services.presets.smoke: the preset's architectures,
teacher source, methods, generated-data recipe and schedules, cut to 2 batches of 4 images, 2-step
attacks and 2 test images) through every stage's CLI on a CPU, in order, as `dvc repro` runs them
(without DVC's process per stage, to keep the suite short); and its estimated cost.

`make test` smoke-runs one preset per distinct code path (SMOKE_PATHS: architecture family x teacher
source x generated-data source x class count); the others carry the `presets` marker and run in
`make test-presets` (every preset), as they repeat a path already covered at larger shapes."""

import re
import time

import numpy as np
import pytest
import torch

from services.presets import load_preset, preset_names, smoke
from services.tables import read_json

from .stage_fixtures import ROOT, make_image_folder, write_params

PRESETS = preset_names(ROOT)
# One preset per distinct path through the stages, each the cheapest of its path:
SMOKE_PATHS = {
    "cpu": "ResNet student, trained TRADES ResNet teacher, no generated data (the default profile)",
    "cpu-ddpm": "generated-data ingestion from the public .npz format (trained ResNet teacher)",
    "cpu-vit": "ViT teacher trained with AT-PRM, attention maps of a ViT",
    "cifar10-mobilenetv2": "released RobustBench teacher (WRN-34-10 zoo file), MobileNetV2 student",
    "cifar100-ddpm-resnet18": "100 classes, generated data, trained teacher at CIFAR-100 shapes",
}


def preset_marks(name: str) -> list:
    """No marker for the presets of SMOKE_PATHS (run in `make test`); `presets` for the rest."""
    return [] if name in SMOKE_PATHS else [pytest.mark.presets]
STAGES = [("prepare_data", []), ("train_teacher", []), ("ingest_ddpm", []), ("distill", []),
          ("distill", ["--method", "{reference}", "--name", "reference"]), ("evaluate", []), ("export_onnx", []),
          ("attention", []), ("report", [])]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Tiny ImageFolder trees with 10 and 100 classes, and the released TRADES teacher's file format
    (WRN-34-10, random weights) in the RobustBench zoo layout."""
    from robustkd.teachers import ZOO

    from .official_wrn import randomise, trades_wideresnet

    root = tmp_path_factory.mktemp("presets")
    for n in (10, 100):
        make_image_folder(root / f"data{n}", train_per_class=1 if n == 100 else 2, test_per_class=1,
                          classes=[f"c{i:02d}" for i in range(n)])
    for name in {"Zhang2019Theoretically"}:
        file = ZOO[name].path(root / "zoo")
        file.parent.mkdir(parents=True)
        torch.save(randomise(trades_wideresnet(), seed=1).state_dict(), file)
    return root


def smoke_params(name: str, shared) -> dict:
    params = load_preset(ROOT, name)
    n = 100 if params["data"].get("source") == "cifar100" else 10
    params = smoke(params, str(shared / f"data{n}"))
    params["teacher"]["zoo"]["dir"] = str(shared / "zoo")
    return params


def write_generated(project, params) -> None:
    """The preset's generated-data files, tiny, in the public .npz format (`image`, `label`)."""
    rng = np.random.default_rng(0)
    for file in params["ddpm"]["files"] if params["ddpm"]["source"] == "npz" else []:
        path = project / file
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, image=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
                 label=np.arange(16) % 10)


def test_the_smoke_paths_are_presets():
    assert set(SMOKE_PATHS) <= set(PRESETS), sorted(set(SMOKE_PATHS) - set(PRESETS))


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=preset_marks(n)) for n in PRESETS])
def test_every_preset_runs_end_to_end_in_its_smoke_mode(name, shared, tmp_path, monkeypatch, capsys):
    import importlib

    params = smoke_params(name, shared)
    write_params(tmp_path / "params.yaml", params)
    write_generated(tmp_path, params)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBUSTKD_TRACKING", "off")
    start, times = time.perf_counter(), []
    for stage, argv in STAGES:
        t0 = time.perf_counter()
        argv = [a.format(reference=params["distill"]["reference_method"]) for a in argv]
        try:
            importlib.import_module(f"stages.{stage}").run(argv)
        except SystemExit as exc:
            pytest.fail(f"{name}: stage {stage} {argv} exited {exc.code}:\n{capsys.readouterr().err[-3000:]}")
        times.append(f"{stage} {time.perf_counter() - t0:.1f}s")
    student = read_json(tmp_path / "metrics/evaluate/student.json")
    assert student["num_images"] == 2 and {"natural", "pgd20", "cw", "autoattack"} <= set(student)
    info = read_json(tmp_path / "metrics/student_info.json")
    assert info["method"] == params["distill"]["method"] and info["model"] == params["distill"]["student"]["arch"]
    teacher = read_json(tmp_path / "metrics/evaluate/teacher_info.json")
    assert teacher["arch"] == params["teacher"]["model"]["arch"]
    if params["ddpm"]["source"] == "npz":
        assert read_json(tmp_path / "metrics/ddpm.json")["num_images"] > 0
    assert (tmp_path / "reports/report.html").is_file() and (tmp_path / "models/student.onnx").is_file()
    with capsys.disabled():
        print(f"\n{name}: {time.perf_counter() - start:.0f}s ({', '.join(times)})")


@pytest.mark.slow
def test_every_preset_has_a_cost_estimate():
    from services.presets import cost_line

    for name in PRESETS:
        line = cost_line(ROOT, name)
        params = load_preset(ROOT, name)
        if params["data"].get("source") in ("cifar10", "cifar100"):
            hours = re.search(r"([0-9.]+) H200-hours", line)
            assert hours and float(hours.group(1)) > 0, line
        else:   # a CPU profile on this machine's ImageFolder: no GPU estimate, and the line says so
            assert params["data"]["source"] == "imagefolder" and "CPU profile" in line, line


@pytest.mark.parametrize("name", PRESETS)
def test_the_smoke_overlay_keeps_the_preset_and_passes_the_checks(name, tmp_path):
    from services.params import load_params

    preset = load_preset(ROOT, name)
    params = load_params(write_params(tmp_path / "params.yaml", smoke(load_preset(ROOT, name), str(tmp_path))))
    assert params.distill.student.arch == preset["distill"]["student"]["arch"]
    assert params.teacher.model.arch == preset["teacher"]["model"]["arch"]
    assert (params.teacher.source, params.distill.method, params.distill.schedule, params.ddpm.fraction) == \
        (preset["teacher"]["source"], preset["distill"]["method"], preset["distill"]["schedule"],
         preset["ddpm"]["fraction"])
    assert params.distill.optim.max_batches == 2 and params.evaluate.max_images == 2
    assert params.evaluate.config.autoattack_attacks == ["apgd-ce"]
