"""Data is checked where it enters: the splits' class lists agree, names and order; params,
image folders, .npz files and checkpoints give one clear line (tests/bad_inputs.py)."""

import pytest

from robustkd.data import check_same_classes
from robustkd.errors import InputError

from .bad_inputs import CASES, run_case
from .stage_fixtures import make_image_folder, tiny_params, write_params


def test_class_lists_must_agree_in_names_and_order():
    assert check_same_classes({"train": ["a", "b"], "test": ["a", "b"]}, "x") == ["a", "b"]
    with pytest.raises(InputError, match=r"train classes \['a', 'b'\] differ from the test classes \['b', 'a'\]"):
        check_same_classes({"train": ["a", "b"], "test": ["b", "a"]}, "x")


def test_prepare_data_refuses_a_test_tree_with_other_classes(tmp_path, monkeypatch, capsys):
    from stages import prepare_data

    make_image_folder(tmp_path / "raw", train_per_class=3, test_per_class=1)
    (tmp_path / "raw/test/c9").rename(tmp_path / "raw/test/c99")
    p = tiny_params(str(tmp_path / "raw"))
    p["data"].update(train_per_class=2, heldout_per_class=1, test_per_class=1)
    p["evaluate"].update(per_class=1)   # at most data.test_per_class (checked at load)
    write_params(tmp_path / "params.yaml", p)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROBUSTKD_TRACKING", "off")
    with pytest.raises(SystemExit) as err:
        prepare_data.run([])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "'c9'" in msg and "'c99'" in msg and "train classes" in msg and "test classes" in msg
    assert not (tmp_path / "data/prepared").exists()


def test_data_root_resolves_from_dvc_temporary_workspaces_and_the_environment(tmp_path, monkeypatch):
    from pathlib import Path

    from services.common import data_root, project_dir

    assert project_dir(Path("/w/proj/.dvc/tmp/exps/standalone/tmpab12")) == Path("/w/proj")
    assert project_dir(Path("/w/proj")) == Path("/w/proj")
    monkeypatch.setenv("ROBUSTKD_DATA_ROOT", str(tmp_path))
    assert data_root("../shared/datasets/cifar10") == tmp_path


@pytest.mark.parametrize("case", CASES, ids=[f"{w}: {c}" for w, c, _, _ in CASES])
def test_bad_input_gives_one_clear_line(case):
    """Every case of the table of docs/troubleshooting.md#bad-input-and-faults (tests/bad_inputs.py):
    the message names the problem, user errors exit 2 from the CLIs, no traceback."""
    where, _, expected, fn = case
    message = run_case(fn)
    assert expected in message, message
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    if message.startswith("exit"):
        assert message.startswith("exit 2: error: "), message
