"""The README's results and comparison tables, generated from the committed results, never typed.

``python -m services.readme_results`` rewrites two parts of README.md. Between
``<!-- results:start -->`` and ``<!-- results:end -->``, from ``metrics/evaluate/<model>.json``
(with their info files and per-image outcomes) and ``dvc.lock``: the headline table (natural,
PGD-20, CW, AutoAttack and the per-image worst case, every column on the same images, with counts
and 95% Wilson intervals), the cheaper attacks on the larger set as a table of its own, the exact
McNemar tests of student against reference and teacher against student, and the commit and date
of the results. Between ``<!-- comparison:start -->`` and ``<!-- comparison:end -->``, from the
runs of ``compare/dvc.yaml`` that are in ``metrics/compare`` and recorded in ``compare/dvc.lock``
(``<method>_seed<seed>``, read as stages/compare_table.py reads them: services/tables.py
``comparison_rows``): the same two tables as mean ± sample standard deviation over the seeds, which
method leads, the McNemar tests of every pair of methods per seed, and the flagged runs.
``--check`` rewrites nothing and exits 1 when README.md differs from what would be written (CI:
the README shows the committed runs).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import yaml

from .results import info_path, per_image_path, read_per_image
from .tables import (ATTACK_COLUMNS, HEADLINE, LARGER_SET, TABLE_COLUMNS, WORST, block_cell, comparison_rows,
                     headline_of, headline_words, images_of, larger_label, larger_words, paired_test, read_with_blocks,
                     run_name, same_image_rows, seed_cell, seed_summary)

START, END = "<!-- results:start -->", "<!-- results:end -->"
# (file stem, the row's name in the README)
MODELS = [("teacher", "teacher"), ("student", "student"), ("reference", "same student, no adversarial examples")]
EVALUATED = "metrics/evaluate"
# the line that names the run; in a shallow clone (CI) git cannot tell the commit that wrote the
# results, so --check there compares everything but this line
RUN_LINE = "Results of commit "
# the comparison block: the runs `compare/dvc.yaml` wrote that are committed and recorded in its lock
CMP_START, CMP_END = "<!-- comparison:start -->", "<!-- comparison:end -->"
COMPARED, COMPARE_LOCK = "metrics/compare", "compare/dvc.lock"
CMP_RUN_LINE = "Comparison of commit "
RUN_FILE = re.compile(r"metrics/compare/(?P<method>\w+)_seed(?P<seed>\d+)\.json")
# the pairs the results block tests on the same images: the gain of adversarial distillation over
# the same student without adversarial examples, and what the student keeps of the teacher
PAIRS = [("student", "reference"), ("teacher", "student")]
SIGNIFICANCE = 0.05     # the level a paired test's verdict is stated at


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def results_commit(root: Path, results: str = EVALUATED) -> tuple[str, str, bool]:
    """(short commit, its date, uncommitted): the last commit that changed the results folder
    ``results``; ``uncommitted`` when the workspace's results differ from it."""
    line = _git(root, "log", "-1", "--format=%h %cs", "--", results)
    commit, _, date = line.partition(" ")
    dirty = bool(_git(root, "status", "--porcelain", "--", results))
    return commit or "unknown", date or "unknown", dirty


def locked_outs(lock: Path) -> dict[str, str | None]:
    """{output path: md5} of every stage's outputs in the lock file ``lock`` ({} when absent), in
    the lock's order."""
    if not lock.is_file():
        return {}
    return {out.get("path"): out.get("md5")
            for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values()
            for out in stage.get("outs", []) or []}


def locked_md5(root: Path, path: str, lock: str = "dvc.lock") -> str | None:
    """The md5 the lock file records for the output ``path`` (None when absent)."""
    return locked_outs(root / lock).get(path)


def _md5(path: Path) -> str | None:
    return hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else None


def _checks(m: dict) -> str:
    info = m.get("info") or {}
    total, failed = len(info.get("checks") or {}), len(info.get("failed_checks") or [])
    return f"FLAGGED: {failed} of {total} failed" if failed else f"{total} of {total} passed"


def _method(m: dict) -> str:
    return (m.get("info") or {}).get("method") or "-"


def generate(root: Path) -> str:
    """The Markdown between the markers, from the results under ``root``."""
    root = Path(root)
    paths = {stem: root / EVALUATED / f"{stem}.json" for stem, _ in MODELS}
    rows = [(stem, m) for stem, _ in MODELS if (m := read_with_blocks(paths[stem])) is not None]
    if not rows:
        raise FileNotFoundError(f"{root / EVALUATED}: no evaluation results (teacher/student/reference .json)")
    rows = same_image_rows(rows, paths)
    names = dict(MODELS)
    commit, date, dirty = results_commit(root)
    student = paths["student"].relative_to(root).as_posix()
    md5 = locked_md5(root, student)
    actual = _md5(paths["student"])
    lock_words = ("dvc.lock records it" if md5 and md5 == actual else
                  "dvc.lock records another version of it" if md5 else "not in dvc.lock")
    out = [f"<!-- generated by `python -m services.readme_results` from {EVALUATED}/*.json and dvc.lock: "
           "do not edit by hand -->", "",
           f"{RUN_LINE}`{commit}` ({date})" + (", with uncommitted changes to the results" if dirty else "")
           + f": `{student}` md5 `{(actual or '-')[:12]}` ({lock_words}).", ""]
    counts = sorted({(m.get(HEADLINE) or {}).get("images") for _, m in rows} - {None})
    on = (f"every column on the same {counts[0]:,} test images ({headline_words(rows[0][1])})" if len(counts) == 1
          else "each row on the images it counts")
    out += [f"Accuracy (%) [95% Wilson interval], {on}; the worst case is per image, right under every "
            "attack of its row, so never above a column:", "",
            "| model | method | " + " | ".join(label for _, label in TABLE_COLUMNS) + " | images | checks |",
            "|" + "---|" * (len(TABLE_COLUMNS) + 4)]
    for stem, m in rows:
        block = m.get(HEADLINE)
        out.append(f"| {names[stem]} ({(m.get('info') or {}).get('arch')}) | {_method(m)} | "
                   + " | ".join(block_cell(block, k) for k, _ in TABLE_COLUMNS)
                   + f" | {(block or {}).get('images', '-')} | {_checks(m)} |")
    larger = [(stem, m) for stem, m in rows if m.get(LARGER_SET)]
    if larger:
        n = max(m[LARGER_SET]["images"] for _, m in larger)
        keys = [(k, label) for k, label in ATTACK_COLUMNS
                if any(k in m[LARGER_SET]["accuracy"] for _, m in larger)]
        out += ["", f"Cheaper attacks on the larger set ({n:,} images: {larger_words(larger[0][1])}); not "
                "AutoAttack, not comparable with the table above, the worst case over these attacks only:", "",
                "| model | method | " + " | ".join(larger_label(label, n) for _, label in keys)
                + " | worst of these | images |", "|" + "---|" * (len(keys) + 4)]
        for stem, m in larger:
            block = m[LARGER_SET]
            out.append(f"| {names[stem]} ({(m.get('info') or {}).get('arch')}) | {_method(m)} | "
                       + " | ".join(block_cell(block, k) for k, _ in keys)
                       + f" | {block_cell(block, WORST)} | {block['images']} |")
    tests = [line for a, b in PAIRS if a in paths and b in paths
             and (line := paired_sentence(names[a], names[b], read_per_image(paths[a]), read_per_image(paths[b])))]
    if tests:
        out += ["", "Paired on the same images (the strongest attack both models ran, on every image it ran on):", ""]
        out += tests
    return "\n".join(out)


def strongest_common(pa: dict, pb: dict) -> str | None:
    """The last attack of ATTACK_COLUMNS (natural < PGD-20 < CW < AutoAttack) both outcomes hold."""
    keys = [k for k, _ in ATTACK_COLUMNS if k != "natural" and k in pa and k in pb]
    return keys[-1] if keys else None


def _verdict(p: float) -> str:
    return (f"p < {SIGNIFICANCE}: not sampling noise at this size" if p < SIGNIFICANCE
            else f"p >= {SIGNIFICANCE}: within sampling noise at this size")


def paired_sentence(a: str, b: str, pa: dict | None, pb: dict | None) -> str | None:
    """One line: models ``a`` and ``b`` on the same images under their strongest common attack,
    both accuracies with 95% Wilson intervals, whether these overlap, and the exact McNemar test."""
    from robustkd.stats import accuracy_record

    key = strongest_common(pa, pb) if pa is not None and pb is not None else None
    test = paired_test(pa, pb, key) if key else None
    if test is None:
        return None
    only_a, only_b, p = test
    n = len(images_of(pa, key))
    ra, rb = (accuracy_record(int(o[key].astype(bool).sum()), n) for o in (pa, pb))
    overlap = ra["ci95_low"] <= rb["ci95_high"] and rb["ci95_low"] <= ra["ci95_high"]
    cell = lambda r: block_cell({"accuracy": {key: r}}, key)  # noqa: E731
    return (f"- {a} against {b}, {dict(ATTACK_COLUMNS)[key]} on the same {n:,} images: {cell(ra)} against "
            f"{cell(rb)}, the intervals {'overlap' if overlap else 'do not overlap'}; right only for the first "
            f"on {only_a}, only for the second on {only_b}: exact McNemar p = {p:.2g} ({_verdict(p)}).")


def compared_runs(root: Path) -> list[tuple[str, int, Path]]:
    """(method, seed, metrics file) of every comparison run whose results are in metrics/compare
    and recorded in compare/dvc.lock, in the lock's order."""
    runs = []
    for path in locked_outs(root / COMPARE_LOCK):
        found = RUN_FILE.fullmatch(path or "")
        if found and (root / path).is_file():
            runs.append((found["method"], int(found["seed"]), root / path))
    return runs


def _label(method: str) -> str:
    """A method's table name: reconstructions say so (as stages/compare_table.py names them)."""
    from robustkd.methods import available_methods, get_method

    return get_method(method).label if method in available_methods() else method


def _lock_words(root: Path, runs: list[tuple[str, int, Path]]) -> str:
    """Whether compare/dvc.lock records the files of every run as they are."""
    locked = locked_outs(root / COMPARE_LOCK)
    stale = [run_name(m, s) for m, s, path in runs
             if any(locked.get(f.relative_to(root).as_posix()) != _md5(f)
                    for f in (path, info_path(path), per_image_path(path)))]
    return (f"{COMPARE_LOCK} records every file of them" if not stale else
            f"{COMPARE_LOCK} records other versions of {', '.join(stale)}")


def _leaders(summary: dict[str, dict], keys: list[str]) -> dict[str, list[str]]:
    """{column: the methods with its highest mean}."""
    out = {}
    for key in keys:
        means = {m: e[key]["mean"] for m, e in summary.items() if key in e}
        if means:
            out[key] = [m for m, v in means.items() if v == max(means.values())]
    return out


def _leads_every_seed(summary: dict[str, dict], method: str, keys: list[str]) -> bool:
    """``method``'s figure is the highest (ties included) of every seed all methods ran, per column."""
    common = set.intersection(*(set(e["seeds"]) for e in summary.values()))
    for key in keys:
        for seed in common:
            values = {m: e[key]["values"][e["seeds"].index(seed)] for m, e in summary.items() if key in e}
            if values and values.get(method, -1.0) < max(values.values()):
                return False
    return True


def leader_line(tables: list[tuple[str, dict[str, dict], list[str]]]) -> str:
    """Which method has the highest mean in each column of the tables ((name, summary, keys) each)."""
    per_table = [(name, summary, keys, _leaders(summary, keys)) for name, summary, keys in tables]
    firsts = {tuple(ms) for *_, lead in per_table for ms in lead.values()}
    if len(firsts) == 1 and len(first := next(iter(firsts))) == 1:
        every = all(_leads_every_seed(summary, first[0], keys) for _, summary, keys, _ in per_table)
        return (f"- Highest mean of the methods in every column of both tables: {_label(first[0])}; "
                + ("the highest figure of every seed too." if every else "not the highest in every seed."))
    labels = dict(TABLE_COLUMNS)
    parts = [f"{name}: " + "; ".join(f"{labels[k]} {', '.join(map(_label, ms))}" for k, ms in lead.items())
             for name, _, _, lead in per_table]
    return "- Highest mean per column: " + " / ".join(parts) + "."


def pair_lines(seeds_of: dict[str, list[int]], paths: dict[str, Path]) -> list[str]:
    """Per pair of methods, the exact McNemar test of the strongest attack (AutoAttack) on the
    same images in every seed both ran, with the verdict over the seeds."""
    methods = list(seeds_of)
    labels = dict(ATTACK_COLUMNS)
    lines = []
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            parts, verdicts, what = [], [], ""
            for seed in [s for s in seeds_of[a] if s in seeds_of[b]]:
                pa, pb = (read_per_image(paths[run_name(m, seed)]) for m in (a, b))
                key = strongest_common(pa, pb) if pa is not None and pb is not None else None
                test = paired_test(pa, pb, key) if key else None
                if test is None:
                    continue
                only_a, only_b, p = test
                what = f"{labels[key]} on the same {len(images_of(pa, key)):,} images"
                parts.append(f"seed {seed}: right only for {a} on {only_a}, only for {b} on {only_b}, p = {p:.2g}")
                verdicts.append((seed, p < SIGNIFICANCE))
            if parts:
                weak = [str(s) for s, significant in verdicts if not significant]
                verdict = (f"significant (p < {SIGNIFICANCE}) in every seed" if not weak
                           else f"not significant in seed {', '.join(weak)}")
                lines.append(f"- {_label(a)} against {_label(b)}, {what}: " + "; ".join(parts) + f": {verdict}.")
    return lines


def flagged_lines(rows: list[tuple[str, dict]]) -> list[str]:
    """One line per flagged run: which checks failed and what they found."""
    lines = []
    for name, m in rows:
        info = m.get("info") or {}
        for check in info.get("failed_checks") or []:
            detail = ((info.get("checks") or {}).get(check) or {}).get("detail", "-")
            lines.append(f"- {name} FLAGGED by `{check}`: {detail}.")
    return lines


def _checks_over(runs: list[dict]) -> str:
    flagged = sum(1 for r in runs if r.get("flagged") or (r.get("info") or {}).get("failed_checks"))
    return f"FLAGGED: {flagged} of {len(runs)} runs" if flagged else f"{len(runs)} of {len(runs)} runs passed"


def _images(ms: list[dict], block_of) -> str:
    counts = sorted({b["images"] for m in ms if (b := block_of(m))})
    return ", ".join(map(str, counts)) or "-"


def _teacher_md5s(lock: Path, key: str, stages_named: str = "") -> set[str]:
    """The md5s a lock file records for models/teacher.pt, in ``key`` (deps or outs) of its stages
    whose name matches the regular expression ``stages_named``."""
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    return {e.get("md5") for name, st in stages.items() if re.search(stages_named, name)
            for e in st.get(key, []) or [] if e.get("path") == "models/teacher.pt" and e.get("md5")}


def compared_teacher_differs(root: Path) -> str | None:
    """When the comparison runs (compare/dvc.lock) distilled from another models/teacher.pt than the
    one the main pipeline's lock records: the two md5s, else None."""
    # the comparison's runs are the foreach items <method>-<seed> (older items may linger in the lock)
    compared = _teacher_md5s(root / COMPARE_LOCK, "deps", r"@[a-z0-9_]+-\d+$")
    current = _teacher_md5s(root / "dvc.lock", "outs")
    if not compared or not current or compared == current:
        return None
    return f"models/teacher.pt md5 {', '.join(sorted(m[:12] for m in compared))}, now {', '.join(sorted(m[:12] for m in current))}"


def comparison(root: Path) -> str:
    """The Markdown between the comparison markers, from the comparison runs under ``root``."""
    root = Path(root)
    out = [f"<!-- generated by `python -m services.readme_results` from {COMPARED}/*.json, {EVALUATED}/teacher.json "
           f"and {COMPARE_LOCK}: do not edit by hand -->", ""]
    runs = compared_runs(root)
    if not runs:
        return "\n".join(out + [f"No comparison run is committed: {COMPARED} holds no `<method>_seed<seed>.json` "
                                f"that {COMPARE_LOCK} records (`make compare`)."])
    seeds_of: dict[str, list[int]] = {}
    for method, seed, _ in runs:
        seeds_of.setdefault(method, []).append(seed)
    rows, paths = comparison_rows(root / EVALUATED / "teacher.json", [(run_name(m, s), p) for m, s, p in runs])
    names = {run_name(m, s) for m, s, _ in runs}
    teacher = next(((n, m) for n, m in rows if n not in names), None)
    stale_teacher = compared_teacher_differs(root)
    if stale_teacher:
        teacher = None   # another teacher than the one these students were distilled from: not like with like
    by_name = dict(rows)
    commit, date, dirty = results_commit(root, COMPARED)
    seeds = sorted({s for _, s, _ in runs})
    out += [f"{CMP_RUN_LINE}`{commit}` ({date})" + (", with uncommitted changes to the results" if dirty else "")
            + f": {len(runs)} runs, {', '.join(map(_label, seeds_of))} x seeds {', '.join(map(str, seeds))} "
            f"({_lock_words(root, runs)}); every run with its intervals: `reports/comparison.md`.", ""]
    if stale_teacher:
        out += [f"The students of these runs were distilled from another teacher ({stale_teacher}) than the one "
                f"evaluated above: the teacher's row is left out (`make compare` re-runs them from it).", ""]
    heads = [m for _, m in rows]
    counts = sorted({b["images"] for m in heads if (b := headline_of(m))})
    on = (f"every column on the same {counts[0]:,} test images ({headline_words(heads[0])})" if len(counts) == 1
          else "each row on the images it counts")
    summary = seed_summary(seeds_of, by_name)
    header = "| model | " + " | ".join(label for _, label in TABLE_COLUMNS) + " | images | seeds | checks |"
    out += [f"Accuracy (%), mean ± sample standard deviation over each method's seeds (the teacher: its one run, "
            f"with its 95% Wilson interval), {on}; the worst case is per image, right under every attack of its "
            "row, so never above a column:", "", header, "|" + "---|" * (len(TABLE_COLUMNS) + 4)]
    if teacher is not None:
        t = teacher[1]
        out.append(f"| teacher ({t['info'].get('arch')}, {_method(t)}) | "
                   + " | ".join(block_cell(headline_of(t), k) for k, _ in TABLE_COLUMNS)
                   + f" | {_images([t], headline_of)} | - | {_checks(t)} |")
    for method, entry in summary.items():
        out.append(f"| {_label(method)} ({entry['_runs'][0]['info'].get('arch')}) | "
                   + " | ".join(seed_cell(entry, k) for k, _ in TABLE_COLUMNS)
                   + f" | {_images(entry['_runs'], headline_of)} | {', '.join(map(str, entry['seeds']))} | "
                   f"{_checks_over(entry['_runs'])} |")
    tables = [("headline", summary, [k for k, _ in TABLE_COLUMNS])]
    larger_of = lambda m: m.get(LARGER_SET)  # noqa: E731
    if all(larger_of(m) for _, m in rows):
        larger = seed_summary(seeds_of, by_name, larger_of)
        n = max(larger_of(m)["images"] for _, m in rows)
        keys = [k for k, _ in ATTACK_COLUMNS if any(k in larger_of(m)["accuracy"] for _, m in rows)]
        out += ["", f"Cheaper attacks on the larger set ({n:,} images: {larger_words(heads[0])}), the same "
                "mean ± standard deviation; not AutoAttack, not comparable with the table above, the worst case "
                "over these attacks only:", "",
                "| model | " + " | ".join(larger_label(label, n) for k, label in ATTACK_COLUMNS if k in keys)
                + " | worst of these | images | seeds |", "|" + "---|" * (len(keys) + 4)]
        if teacher is not None:
            t = larger_of(teacher[1])
            out.append(f"| teacher ({teacher[1]['info'].get('arch')}, {_method(teacher[1])}) | "
                       + " | ".join(block_cell(t, k) for k in keys + [WORST]) + f" | {t['images']} | - |")
        for method, entry in larger.items():
            out.append(f"| {_label(method)} ({entry['_runs'][0]['info'].get('arch')}) | "
                       + " | ".join(seed_cell(entry, k) for k in keys + [WORST])
                       + f" | {_images(entry['_runs'], larger_of)} | {', '.join(map(str, entry['seeds']))} |")
        tables.append(("larger set", larger, keys + [WORST]))
    out += ["", leader_line(tables)] + pair_lines(seeds_of, paths) + flagged_lines(rows)
    return "\n".join(out)


def replaced(readme: str, body: str, where: str = "README.md", start: str = START, end: str = END) -> str:
    """``readme`` with the text between the markers ``start`` and ``end`` replaced by ``body``."""
    if readme.count(start) != 1 or readme.count(end) != 1 or readme.index(start) > readme.index(end):
        raise ValueError(f"{where}: expected one {start} followed by one {end}, found "
                         f"{readme.count(start)} start and {readme.count(end)} end markers")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def rewritten(readme: str, root: Path, where: str = "README.md") -> str:
    """``readme`` with both generated blocks (the results, the comparison) from the results under ``root``."""
    text = replaced(readme, generate(root), where)
    return replaced(text, comparison(root), where, CMP_START, CMP_END)


def _shallow(root: Path) -> bool:
    return _git(root, "rev-parse", "--is-shallow-repository") == "true"


def _without_run_line(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith((RUN_LINE, CMP_RUN_LINE)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if README.md differs; write nothing")
    p.add_argument("--root", default=".", help="project directory (default: .)")
    p.add_argument("--readme", help="the README to write or check (default: <root>/README.md)")
    args = p.parse_args(argv)
    root = Path(args.root).resolve()
    readme = Path(args.readme) if args.readme else root / "README.md"
    try:
        current = readme.read_text()
        wanted = rewritten(current, root, str(readme))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.check:
        if wanted != current:
            readme.write_text(wanted)
        print(f"{readme}: results and comparison {'rewritten' if wanted != current else 'already up to date'}")
        return 0
    same = wanted == current or (_shallow(root) and _without_run_line(wanted) == _without_run_line(current))
    if same:
        print(f"{readme}: results and comparison match {EVALUATED} and {COMPARED}")
        return 0
    diff = difflib.unified_diff(current.splitlines(), wanted.splitlines(), "README.md", "generated", lineterm="", n=0)
    print(f"error: {readme}: the results or comparison differ from {EVALUATED} and {COMPARED}; run "
          "`python -m services.readme_results`",
          file=sys.stderr)
    print("\n".join(list(diff)[:40]), file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
