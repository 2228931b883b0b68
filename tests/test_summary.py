"""The end of `make run` (services/summary.py), the registry's list and the metrics files DVC
shows (issue 28, "Output a person can read"): every line fits a terminal, the table holds the
report's headline figures, and the DVC metrics files hold the headline numbers only."""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from .test_tables import write_evaluation

WIDTH = 120


@pytest.fixture
def root(tmp_path, monkeypatch):
    """teacher, student and reference results as the evaluate stage writes them."""
    write_evaluation(tmp_path / "metrics/evaluate/teacher.json", 1, method="trades")
    write_evaluation(tmp_path / "metrics/evaluate/student.json", 2)
    write_evaluation(tmp_path / "metrics/evaluate/reference.json", 3, method="natural_kd", attacks=("natural", "pgd20"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _add_flagged_best(root):
    """student_best: the student's results copied, flagged by two failed checks."""
    ev = root / "metrics/evaluate"
    for suffix in (".json", "_details.json", "_info.json", "_per_image.npz"):
        shutil.copyfile(ev / f"student{suffix}", ev / f"student_best{suffix}")
    for name in ("student_best.json", "student_best_details.json"):   # the stage writes both
        numbers = json.loads((ev / name).read_text())
        (ev / name).write_text(json.dumps({**numbers, "flagged": 1, "checks_failed": 2}))


def test_summary_is_one_narrow_table_of_the_headline_figures(root):
    from services.results import read_evaluation
    from services.summary import summary_lines
    from services.tables import read_with_blocks, same_image_rows

    lines = summary_lines(root)
    print("\n".join(lines))
    assert max(map(len, lines)) <= WIDTH, max(lines, key=len)
    head = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[head].split() == ["model", "Natural", "PGD-20", "CW", "AA", "Worst", "case", "images", "checks"]
    rows = {line.split()[0]: line for line in lines[head + 1:head + 4]}
    assert list(rows) == ["teacher", "student", "reference"]
    # the student's cells are the report's headline block, on the same 10 images as the teacher's
    paths = {n: root / f"metrics/evaluate/{n}.json" for n in ("teacher", "student", "reference")}
    block = dict(same_image_rows([(n, read_with_blocks(p)) for n, p in paths.items()], paths))["student"]["headline"]
    for key in ("natural", "pgd20", "cw", "autoattack", "worst_case"):
        rec = block["accuracy"][key]
        cell = f"{rec['percent']:.1f} [{rec['ci95_low']:.1f}-{rec['ci95_high']:.1f}]".replace("100.0", "100")
        assert cell in rows["student"], key
    assert all(line.rstrip().endswith("10  passed") for line in rows.values()), rows
    assert rows["reference"].count(" - ") == 2   # no CW, no AutoAttack for the reference
    text = "\n".join(lines)
    assert "on the same 10 test images" in text and "95% Wilson interval" in text
    assert "all 40 evaluated images" in text     # the larger set: the report's second table
    assert read_evaluation(paths["student"])["flagged"] == 0
    tail = text[text.index("Where to look next:"):]
    for what in ("reports/report.html", "make mlflow-ui", "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning",
                 "make plots"):
        assert what in tail, what


def test_summary_with_a_flagged_best_checkpoint_stays_narrow(root):
    from services.summary import summary_lines

    _add_flagged_best(root)
    lines = summary_lines(root, mlflow_port=5001)
    assert max(map(len, lines)) <= WIDTH, max(lines, key=len)
    best = next(line for line in lines if line.startswith("student_best "))
    assert best.rstrip().endswith("FLAGGED") and "[" in best        # the intervals still fit
    assert any(line.startswith("student_best: FLAGGED, 2 check(s) failed") for line in lines)
    assert any("make mlflow-ui MLFLOW_PORT=5001" in line and "127.0.0.1:5001" in line for line in lines)


def test_summary_names_a_tracking_server_and_refuses_no_results_in_one_line(root, tmp_path, monkeypatch, capsys):
    from services import summary

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5555")
    assert any("http://127.0.0.1:5555" in line for line in summary.summary_lines(root))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert summary.main(["--root", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "metrics/evaluate" in err[0]


def test_dvc_metrics_files_hold_the_headline_numbers_and_readers_see_everything(root):
    from services.results import HEADLINE_NUMBERS, details_path, read_evaluation

    path = root / "metrics/evaluate/student.json"
    numbers = json.loads(path.read_text())
    assert set(numbers) == set(HEADLINE_NUMBERS)
    assert all(isinstance(v, (int, float)) for v in numbers.values())   # flat: one DVC column each
    details = json.loads(details_path(path).read_text())
    assert {"accuracy", "per_class_accuracy", "headline", "larger_set"} <= set(details)
    merged = read_evaluation(path)
    assert merged["pgd20"] == details["pgd20"] and merged["per_class_accuracy"] == details["per_class_accuracy"]
    # the DVC metrics: the headline table, every column on the same images, the worst case under each
    same = details["headline"]["accuracy"]
    assert numbers["num_images"] == details["headline"]["images"]
    assert all(numbers[k] == same[k]["percent"] for k in same)
    assert all(numbers["worst_case"] <= numbers[k] for k in same)
    # a file written before the split (everything in one file) reads the same
    details_path(path).unlink()
    path.write_text(json.dumps(details))
    old = read_evaluation(path)
    assert {k: v for k, v in old.items() if k != "info"} == {k: v for k, v in merged.items() if k != "info"}
    # `dvc metrics show` prints one column per leaf: the four files' columns fit a wide terminal
    columns = ["Path"] + sorted(HEADLINE_NUMBERS)
    width = len("metrics/evaluate/student_best.json") + sum(len(c) + 4 for c in columns[1:])
    assert width < 200, width


def test_registry_list_fits_a_terminal():
    from pipeline.registry import students_lines

    def version(n, alias_tags):
        tags = {"method": "darwin", "student": "resnet10_w8", "teacher": "resnet10_w16", "dataset": "cifar10",
                "comparison_group": "1a2b3c4d", "headline_images": "100", "eval_flagged": "0",
                "autoattack_mcnemar_p_vs_champion": "0.0123", **alias_tags}
        for key, value in (("natural", 43.0), ("pgd20", 30.0), ("cw", 29.0), ("autoattack", 27.0),
                           ("worst_case", 27.0)):
            tags.update({key: f"{value:.2f}", f"{key}_ci95": f"[{value - 9.3:.2f}, {value + 9.8:.2f}]"})
        return SimpleNamespace(version=str(n), tags=tags)

    versions = [version(2, {"method": "rslad", "comparison_group": "9f8e7d6c"}), version(1, {})]
    lines = students_lines(versions, {"2": ["champion", "champion-9f8e7d6c"], "1": ["champion-1a2b3c4d"]})
    print("\n".join(lines))
    assert max(map(len, lines)) <= 200, max(lines, key=len)
    assert lines[0] == "every version: student resnet10_w8, teacher resnet10_w16, dataset cifar10"
    assert lines[1].split()[:4] == ["version", "aliases", "method", "group"]
    assert lines[3].split()[:4] == ["2", "champion,champion-9f8e7d6c", "rslad", "9f8e7d6c"]
    assert "43.0 [33.7-52.8]" in lines[3] and lines[3].split()[-3:] == ["100", "0.0123", "0"]
    assert students_lines([], {}) == ["no registered versions"]


def test_make_run_ends_with_the_summary():
    from .stage_fixtures import ROOT

    recipe = (ROOT / "Makefile").read_text().split("\nrun: setup\n", 1)[1].split("\n\n", 1)[0]
    assert "dvc metrics show" not in recipe
    assert recipe.strip().splitlines()[-1].strip() == "$(PY) -m services.summary --mlflow-port $(MLFLOW_PORT)"
    assert os.path.exists(ROOT / "services/summary.py")


def test_report_header_links_the_mlflow_runs(monkeypatch):
    from stages.report import header_markdown

    params = SimpleNamespace(profile="cpu")
    tracker = SimpleNamespace(run_id="0123456789abcdef", experiment_id="7")
    monkeypatch.setenv("ROBUSTKD_PARENT_RUN_ID", "fedcba9876543210")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ROBUSTKD_MLFLOW_UI", raising=False)
    local = header_markdown(params, tracker)
    assert local.startswith("Written 20") and " UTC from commit `" in local and "cpu profile" in local
    assert "[fedcba98](http://127.0.0.1:5000/#/experiments/7/runs/fedcba9876543210?workflowType=machine_learning)" in local
    assert "[01234567](http://127.0.0.1:5000/#/experiments/7/runs/0123456789abcdef?workflowType=machine_learning)" in local
    assert "make mlflow-ui" in local
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000/")
    server = header_markdown(params, tracker)
    assert "(http://mlflow.example:5000/#/experiments/7/runs/0123456789abcdef?workflowType=machine_learning)" in server
    assert "make mlflow-ui" not in server
    untracked = header_markdown(params, SimpleNamespace(run_id=None, experiment_id=None))
    assert "Not tracked in MLflow" in untracked and "http" not in untracked


def test_dvc_plots_one_loss_per_plot_and_one_colour_per_model():
    import yaml

    from stages.report import MODEL_COLOURS

    from .stage_fixtures import ROOT

    plots = {name: spec for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
             for name, spec in entry.items()}
    losses = {name: spec for name, spec in plots.items() if "loss" in name}
    assert len(losses) == 3 and all(len(spec["y"]) == 1 for spec in losses.values())   # never a shared axis
    for name, spec in losses.items():   # one file: DVC gives no file name, the template takes the title's model
        assert Path(next(iter(spec["y"]))).name == f"{name.split()[0].lower()}_history.csv", name
    for name, spec in plots.items():
        template = json.loads((ROOT / spec["template"]).read_text())
        scale = template["encoding"]["color"]["scale"]
        assert template["encoding"]["color"]["field"] == "model", name
        assert dict(zip(scale["domain"], scale["range"])) == MODEL_COLOURS, name   # the report's colours
        for path in spec["y"]:
            assert (ROOT / path).is_file(), f"{name}: {path} is not produced by the pipeline (an empty panel)"
