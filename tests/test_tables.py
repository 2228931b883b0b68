"""One set of images per table (issue 24, item 1): the headline block puts natural, PGD-20, CW,
AutoAttack and the per-image worst case on the same images; the cheaper attacks on the larger set
are a block and a table of their own. On real result files (written as the evaluate stage writes
them) in temporary directories: the block's invariants, the report's two tables, the method
tables and the registry description, and the README generator's drift check."""

import os
import subprocess

import pytest
import torch

from .stage_fixtures import tiny_params, write_params

CLASSES = [f"c{i}" for i in range(10)]


def write_evaluation(path, seed: int, n_per_class: int = 4, aa_per_class: int = 1, method: str = "darwin",
                     attacks=("natural", "pgd20", "cw", "autoattack"), aa_rate: float = 0.95):
    """A model's results as stages/evaluate.py writes them: summarize() of an EvaluationResult, its
    per-image outcomes (save_per_image) and the two blocks; AutoAttack on the first
    ``aa_per_class`` of each class, very accurate there (``aa_rate``) so that, across image sets,
    it would read above PGD-20."""
    from robustkd.data import stratified_first_k
    from robustkd.evaluation import EvaluationResult, summarize
    from services.common import write_json
    from services.results import details_path, info_path, per_image_path, read_per_image, split_headline
    from services.tables import table_blocks
    from stages.evaluate import save_per_image

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat(n_per_class)
    indices = torch.arange(len(labels)) * 3 + 5           # test-set indices, not positions
    natural = torch.rand(len(labels), generator=g) < 0.8
    correct = {"natural": natural}
    for name, rate in (("pgd20", 0.5), ("cw", 0.45)):
        if name in attacks:
            correct[name] = natural & (torch.rand(len(labels), generator=g) < rate)
    positions = {}
    if "autoattack" in attacks:
        pos = stratified_first_k(labels, aa_per_class, 10)
        correct["autoattack"] = natural[pos] & (torch.rand(len(pos), generator=g) < aa_rate)
        positions = {"autoattack": pos, "worst_case": pos}
    common = positions.get("worst_case")
    worst = natural.clone() if common is None else natural[common].clone()
    for name, c in correct.items():
        worst &= c if (common is None or name in positions) else c[common]
    result = EvaluationResult(correct=correct, worst_case=worst, positions=positions, num_classes=10)
    summary = summarize(result, labels, CLASSES)
    subset = {"description": f"first {n_per_class} per class", "num_images": len(labels), "images_sha256": "ab" * 32}
    info = {"arch": "tiny", "method": method, "subset": subset,
            "attack_subsets": ({"autoattack": {"description": f"first {aa_per_class} per class",
                                               "num_images": len(positions["autoattack"]),
                                               "images_sha256": "cd" * 32}} if positions else {}),
            "checks": {"pgd20/linf": {"passed": True, "detail": "ok"}}, "failed_checks": [],
            "threat_model": {"norm": "Linf", "eps_255": 8.0}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_per_image(result, indices, labels, per_image_path(path))
    summary.update({k: b for k, b in table_blocks(summary, read_per_image(path)).items() if b is not None})
    numbers, details = split_headline(summary)   # as the stage writes them: the headline, the details
    write_json(details, details_path(path))
    write_json(numbers, path)
    write_json(info, info_path(path))
    return path


def test_worst_case_never_above_a_column_and_every_column_on_the_same_images(tmp_path):
    from services.results import read_evaluation, read_per_image
    from services.tables import ATTACK_COLUMNS, headline, larger_set

    for seed in range(20):
        path = write_evaluation(tmp_path / f"m{seed}.json", seed)
        per_image, summary = read_per_image(path), read_evaluation(path)
        block = headline(summary, per_image)
        records = block["accuracy"]
        assert set(records) == {"natural", "pgd20", "cw", "autoattack", "worst_case"}
        assert {r["total"] for r in records.values()} == {block["images"]} == {10}
        for key, _ in ATTACK_COLUMNS:
            assert records["worst_case"]["correct"] <= records[key]["correct"], (seed, key, records)
        # the stage's file carries the same block
        assert summary["headline"] == block
        big = larger_set(summary, per_image)
        assert set(big["accuracy"]) == {"natural", "pgd20", "cw", "worst_case"}      # no AutoAttack
        assert {r["total"] for r in big["accuracy"].values()} == {big["images"]} == {40}
        assert big["accuracy"]["worst_case"]["correct"] <= min(big["accuracy"][k]["correct"]
                                                             for k in ("natural", "pgd20", "cw"))
    # the situation of the issue: across image sets AutoAttack reads above PGD-20 and the
    # evaluation's own worst case (on AA's images) above PGD-20 on all images; the headline never does
    seen = 0
    for seed in range(20):
        summary = read_evaluation(tmp_path / f"m{seed}.json")
        if summary["autoattack"] > summary["pgd20"]:
            seen += 1
            h = summary["headline"]["accuracy"]
            assert h["worst_case"]["percent"] <= min(h[k]["percent"] for k in ("pgd20", "cw", "autoattack"))
    assert seen, "no fixture with AutoAttack above PGD-20 across image sets: the test shows nothing"


def test_without_a_subset_there_is_no_larger_set(tmp_path):
    from services.results import read_evaluation, read_per_image
    from services.tables import headline, larger_set

    path = write_evaluation(tmp_path / "ref.json", 0, attacks=("natural", "pgd20"))
    per_image = read_per_image(path)
    block = headline(None, per_image)
    assert block["images"] == 40 and set(block["accuracy"]) == {"natural", "pgd20", "worst_case"}
    assert larger_set(None, per_image) is None and "larger_set" not in read_evaluation(path)


@pytest.fixture
def workdir(tmp_path):
    """teacher, student and reference results as the evaluate stage writes them, and params."""
    write_evaluation(tmp_path / "metrics/evaluate/teacher.json", 1, method="trades")
    write_evaluation(tmp_path / "metrics/evaluate/student.json", 2)
    write_evaluation(tmp_path / "metrics/evaluate/reference.json", 3, method="natural_kd",
                     attacks=("natural", "pgd20"))
    write_params(tmp_path / "params.yaml", tiny_params(str(tmp_path / "raw")))
    (tmp_path / "reports").mkdir()
    old, saved = os.getcwd(), os.environ.get("ROBUSTKD_TRACKING")
    os.environ["ROBUSTKD_TRACKING"] = "off"
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)
        os.environ.pop("ROBUSTKD_TRACKING") if saved is None else os.environ.__setitem__("ROBUSTKD_TRACKING", saved)


def _table(md: str, after: str) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after the line starting with ``after``."""
    lines = md[md.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_report_has_the_headline_table_on_the_same_images_and_the_larger_set_apart(workdir):
    from stages import report

    report.run([])
    md = (workdir / "reports/report.md").read_text()
    assert "## Accuracy under attack (the same 10 images)" in md
    assert "on the same 10 test images" in md and "commit" in md and " UTC" in md
    assert "## Cheaper attacks on the larger set (40 images)" in md
    head = _table(md, "## Accuracy under attack")
    assert [r[0] for r in head] == ["teacher (tiny)", "student (tiny)", "reference (tiny)"]
    assert {r[-2] for r in head} == {"10"}                     # the images column: one count
    for r in head:                                              # the worst case never above a column
        values = [float(c.split()[0]) for c in r[2:7] if c != "-"]
        assert values[-1] <= min(values[:-1])
    larger = _table(md, "## Cheaper attacks on the larger set")
    assert {r[-1] for r in larger} == {"40"} and len(larger) == 3
    assert "PGD-20 on 40" in md and "AA on" not in md
    html = (workdir / "reports/report.html").read_text()
    assert html.count("<table>") >= 2 and "Cheaper attacks on the larger set (40 images)" in html
    rows = (workdir / "metrics/accuracy.csv").read_text()
    assert "student: AA" in rows and "student: Worst case" in rows


def test_method_and_registry_tables_use_the_headline_block(workdir):
    from pipeline.registry import on_headline, version_description
    from services.results import read_evaluation
    from services.tables import read_with_blocks
    from stages.compare_table import table_text

    rows = [(n, read_with_blocks(workdir / f"metrics/evaluate/{n}.json")) for n in ("teacher", "student")]
    text = table_text(rows, [])
    assert "every column on the same 10 test images" in text
    cells = [line.split("|")[2:7] for line in text.splitlines() if line.startswith("| student")]
    assert cells and all(c.strip() != "-" for c in cells[0])
    m = on_headline(rows[1][1])
    description = version_description(m, {"eval_subset": "first 1 per class"})
    assert "every attack on the same 10 test images" in description and "| Worst case |" in description
    assert "Evaluation on 40" not in description and "larger set (40 test images" in description
    assert "| PGD-20 on 40 |" in description
    head = description.split("Cheaper attacks")[0]
    counts = [line.rsplit("|", 2)[-2].strip() for line in head.splitlines() if line.startswith("| ") and "[" in line]
    assert len(counts) == 5 and all(c.endswith("/10") for c in counts), counts
    # results without per-image outcomes: each attack says its own count, no worst case
    raw = read_evaluation(workdir / "metrics/evaluate/student.json")
    raw.pop("headline"), raw.pop("larger_set")
    words = version_description(raw, {})
    assert "each attack on its own count" in words and "Worst case" not in words and "/40 |" in words


def _git(root, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_AUTHOR_DATE": "2026-12-01T10:00:00", "GIT_COMMITTER_DATE":
           "2026-12-01T10:00:00"}
    return subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True, text=True).stdout


README = ("# project\n\nprose\n\n<!-- results:start -->\ntyped by hand\n<!-- results:end -->\n\nmore\n\n"
          "<!-- comparison:start -->\n| darwin | 99.00 ± 0.00 |\n<!-- comparison:end -->\n\nend\n")
RUNS = ["darwin_seed0", "darwin_seed1", "rslad_seed0", "rslad_seed1"]


def write_comparison(root, runs=RUNS, locked=RUNS):
    """The runs of compare/dvc.yaml as its evaluate stage writes them, and a compare/dvc.lock that
    records the files of the runs ``locked``, as DVC does (path and md5 of each output)."""
    import hashlib

    import yaml

    for name in runs:
        method, _, seed = name.partition("_seed")
        write_evaluation(root / f"metrics/compare/{name}.json", 10 * (method == "darwin") + int(seed), method=method,
                         aa_rate=0.9 if method == "darwin" else 0.3)
    stages = {}
    for name in locked:
        files = [f"metrics/compare/{name}{end}" for end in (".json", "_info.json", "_per_image.npz")]
        stages[f"evaluate@{name}"] = {"cmd": "python -m stages.launch evaluate", "outs": [
            {"path": f, "md5": hashlib.md5((root / f).read_bytes()).hexdigest() if (root / f).is_file() else "0" * 32}
            for f in files]}
    (root / "compare").mkdir(exist_ok=True)
    (root / "compare/dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}, sort_keys=False))


def _block(text: str, name: str) -> str:
    return text.split(f"<!-- {name}:start -->")[1].split(f"<!-- {name}:end -->")[0]


def test_readme_results_are_generated_and_check_detects_drift(workdir, capsys):
    from services import readme_results

    readme = workdir / "README.md"
    readme.write_text(README)
    write_comparison(workdir)
    _git(workdir, "init", "-q")
    _git(workdir, "add", "metrics", "compare", "README.md")
    _git(workdir, "commit", "-qm", "results")
    commit = _git(workdir, "rev-parse", "--short", "HEAD").strip()
    assert readme_results.main(["--root", str(workdir), "--check"]) == 1          # typed text: drift
    assert readme_results.main(["--root", str(workdir)]) == 0
    text = readme.read_text()
    assert text.startswith("# project\n\nprose\n\n") and text.endswith("<!-- comparison:end -->\n\nend\n")
    assert "<!-- results:end -->\n\nmore\n\n<!-- comparison:start -->" in text
    results = _block(text, "results")
    assert "typed by hand" not in results and f"`{commit}` (2026-12-01)" in results
    assert "same 10 test images" in results and "larger set (40 images" in results
    assert "- student against same student, no adversarial examples, PGD-20 on the same 40 images: " in results
    assert "- teacher against student, AA on the same 10 images: " in results and "exact McNemar p = " in results
    # the comparison: every column on the headline images, mean ± std over the seeds, the tests
    compared = _block(text, "comparison")
    assert "99.00" not in compared and f"Comparison of commit `{commit}` (2026-12-01): 4 runs" in compared
    assert "darwin, rslad x seeds 0, 1 (compare/dvc.lock records every file of them)" in compared
    assert "every column on the same 10 test images" in compared and "larger set (40 images" in compared
    head = [r for r in (line.split(" | ") for line in compared.splitlines()) if r[0] in ("| darwin (tiny)",
                                                                                      "| rslad (tiny)")]
    assert len(head) == 4, head                                            # 2 tables x 2 methods
    assert all(" ± " in c for r in head[:2] for c in r[1:6]) and all(" ± " in c for r in head[2:] for c in r[1:5])
    assert {r[6] for r in head[:2]} == {"10"} and {r[5] for r in head[2:]} == {"40"}
    assert "- darwin against rslad, AA on the same 10 images: seed 0: right only for darwin on " in compared
    assert "seed 1: " in compared and ("in every seed." in compared or "not significant in seed" in compared)
    assert readme_results.main(["--root", str(workdir), "--check"]) == 0
    _git(workdir, "commit", "-qam", "README from the results")
    assert readme_results.main(["--root", str(workdir), "--check"]) == 0          # README commit: no drift
    # new results committed, README not regenerated: drift
    write_evaluation(workdir / "metrics/evaluate/student.json", 7)
    _git(workdir, "commit", "-qam", "a new run")
    capsys.readouterr()
    assert readme_results.main(["--root", str(workdir), "--check"]) == 1
    assert "differ from metrics/evaluate" in capsys.readouterr().err
    assert readme_results.main(["--root", str(workdir)]) == 0
    assert readme_results.main(["--root", str(workdir), "--check"]) == 0
    # a hand edit inside the markers is drift too; a README without markers is refused in one line
    readme.write_text(readme.read_text().replace("| student (tiny) | darwin |", "| student (tiny) | DARWIN |"))
    assert readme_results.main(["--root", str(workdir), "--check"]) == 1
    readme.write_text("# no markers\n")
    capsys.readouterr()
    assert readme_results.main(["--root", str(workdir), "--check"]) == 2
    assert "expected one <!-- results:start -->" in capsys.readouterr().err


def test_readme_comparison_uses_the_locked_runs_and_check_detects_its_drift(workdir, capsys):
    from services import readme_results

    readme = workdir / "README.md"
    readme.write_text(README)
    # ard_seed0 is in metrics/compare but not in the lock; rslad_seed1 in the lock but absent
    write_comparison(workdir, runs=RUNS[:3] + ["ard_seed0"], locked=RUNS)
    _git(workdir, "init", "-q")
    _git(workdir, "add", "metrics", "compare", "README.md")
    _git(workdir, "commit", "-qm", "results")
    assert readme_results.main(["--root", str(workdir)]) == 0
    compared = _block(readme.read_text(), "comparison")
    assert "3 runs, darwin, rslad x seeds 0, 1" in compared and "| ard" not in compared and "ard_seed" not in compared
    assert "against ard" not in compared
    assert "| rslad (tiny) |" in compared and "| 0 | 1 of 1 runs passed |" in compared   # one seed: its seeds say so
    assert readme_results.main(["--root", str(workdir), "--check"]) == 0
    _git(workdir, "commit", "-qam", "README from the results")
    assert readme_results.main(["--root", str(workdir), "--check"]) == 0
    # a new comparison run committed, README not regenerated: drift in the comparison block only
    write_evaluation(workdir / "metrics/compare/darwin_seed1.json", 99)
    _git(workdir, "commit", "-qam", "a new comparison run")
    capsys.readouterr()
    assert readme_results.main(["--root", str(workdir), "--check"]) == 1
    err = capsys.readouterr().err
    assert "differ" in err and "+Comparison of commit" in err
    assert readme_results.main(["--root", str(workdir)]) == 0
    assert "records other versions of darwin_seed1" in _block(readme.read_text(), "comparison")
    assert readme_results.main(["--root", str(workdir), "--check"]) == 0
    # a hand edit inside the comparison markers is drift; a README without them is refused in one line
    text = readme.read_text()
    readme.write_text(text.replace("| darwin (tiny) |", "| DARWIN (tiny) |", 1))
    assert readme_results.main(["--root", str(workdir), "--check"]) == 1
    readme.write_text(text.split("<!-- comparison:start -->")[0])
    capsys.readouterr()
    assert readme_results.main(["--root", str(workdir), "--check"]) == 2
    assert "expected one <!-- comparison:start --> followed by one <!-- comparison:end -->" in capsys.readouterr().err
    # no comparison run committed: the block says so
    for path in (workdir / "metrics/compare").iterdir():
        path.unlink()
    readme.write_text(README)
    assert readme_results.main(["--root", str(workdir)]) == 0
    assert "No comparison run is committed" in _block(readme.read_text(), "comparison")


def test_the_readme_comparison_drops_a_teacher_the_students_were_not_distilled_from(tmp_path):
    """compare/dvc.lock's distill items record another models/teacher.pt than dvc.lock's: the
    comparison's teacher row would not be like with like, so it is left out and the README says why."""
    import yaml

    from services.readme_results import compared_teacher_differs

    def lock(path, stages):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))

    teacher = lambda md5: [{"path": "models/teacher.pt", "md5": md5}]  # noqa: E731
    lock(tmp_path / "dvc.lock", {"train_teacher": {"outs": teacher("a" * 32)}})
    lock(tmp_path / "compare/dvc.lock", {"distill@darwin-0": {"deps": teacher("a" * 32)},
                                         "distill@darwin": {"deps": teacher("c" * 32)}})   # an old item: ignored
    assert compared_teacher_differs(tmp_path) is None
    lock(tmp_path / "compare/dvc.lock", {"distill@darwin-0": {"deps": teacher("b" * 32)}})
    assert compared_teacher_differs(tmp_path) == f"models/teacher.pt md5 {'b' * 12}, now {'a' * 12}"
