"""run.seed means what it says: two runs with one seed (1 thread) give identical weights: the
initialisation, the data order and the attacks' random starts all come from it."""

import shutil

import pytest
import torch

from .stage_fixtures import make_image_folder, tiny_params, write_params


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    import os

    from stages import prepare_data

    wd = tmp_path_factory.mktemp("seeds")
    make_image_folder(wd / "raw", train_per_class=4, test_per_class=1)
    p = tiny_params(str(wd / "raw"))
    p["data"].update(train_per_class=3, heldout_per_class=1, test_per_class=1)
    p["evaluate"].update(per_class=1)   # at most data.test_per_class (checked at load)
    for section in ("teacher", "distill"):
        p[section]["optim"].update(epochs=1, batch_size=10)
    write_params(wd / "params.yaml", p)
    old = os.getcwd()
    os.chdir(wd)
    try:
        prepare_data.run([])
    finally:
        os.chdir(old)
    return wd


def run_in(prepared, name, monkeypatch, stage, *argv):
    wd = prepared.parent / f"{prepared.name}-{name}"
    if not wd.exists():
        shutil.copytree(prepared, wd)
    monkeypatch.chdir(wd)
    monkeypatch.setenv("ROBUSTKD_TRACKING", "off")
    torch.manual_seed(len(name))  # the process's global RNG differs between the runs
    stage.run(list(argv))
    return wd


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_one_seed_gives_identical_teachers_and_students(prepared, monkeypatch):
    from stages import distill, train_teacher

    first = run_in(prepared, "a", monkeypatch, train_teacher)
    second = run_in(prepared, "bb", monkeypatch, train_teacher)
    assert_same(weights(first / "models/teacher.pt"), weights(second / "models/teacher.pt"))
    for wd in (first, second):
        run_in(prepared, wd.name.rsplit("-", 1)[1], monkeypatch, distill, "--method", "rslad")
    assert_same(weights(first / "models/student.pt"), weights(second / "models/student.pt"))
