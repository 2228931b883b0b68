"""The README is a front door and the docs hold together (issue 28 item 1).

- every relative link of README.md and docs/*.md names a file of the project, and every
  ``#anchor`` a heading of the linked page (GitHub's slug rules) or an HTML anchor in it;
- every docs page cited in the code, params, Makefile, Dockerfile and tests exists, with the
  anchor (``docs/page.md#anchor``) or section title (``docs/page.md, "Title"``) it cites;
- the README has at most 300 lines, and ``make run`` and ``make test`` within its first 40.

Each check is also run on a copy of the docs with a broken link planted, which it must report.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
FIRST_SCREEN = 40

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"""<a\s+[^>]*?(?:id|name)\s*=\s*["']([^"']+)["']""", re.I)
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# a docs page cited in code: docs/page.md, optionally #anchor, optionally , "Title" / ("Title"
CITATION = re.compile(r'docs/([A-Za-z0-9_.-]+\.md)(#[A-Za-z0-9_-]+)?(?:,?\s*\(?"([^"]+)")?')
CITING_SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".j2", ".sh", ".cfg"}
CITING_NAMES = {"Makefile", "Dockerfile", "run"}


def github_slug(heading: str) -> str:
    """GitHub's heading id: the rendered text lower-cased, punctuation dropped (letters, digits,
    '_', '-' and spaces kept), each space a hyphen (github-slugger; no collapsing of hyphens)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)    # links and images -> their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")          # HTML tags, code marks
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)           # emphasis marks, not snake_case
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def prose_lines(markdown: str):
    """(line number, line) of the lines outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(markdown.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def anchors(markdown: str) -> set[str]:
    """The ids a page offers: its headings' slugs (repeated ones numbered -1, -2, ... as GitHub
    does) and its explicit HTML anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(markdown):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def headings(markdown: str) -> list[str]:
    return [m.group(2) for _, line in prose_lines(markdown) if (m := HEADING.match(line))]


def broken_links(root: Path, pages: list[Path]) -> list[str]:
    """Every relative link (and its #anchor) of the pages that leads nowhere, as 'page:line: why'."""
    problems = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for number, line in prose_lines(text):
            for target in LINK.findall(INLINE_CODE.sub("", line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):          # http:, https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                where = f"{page.relative_to(root)}:{number}: {target}"
                linked = (page.parent / path).resolve() if path else page
                if not linked.exists():
                    problems.append(f"{where}: {path} does not exist")
                elif anchor and linked.suffix == ".md":
                    if anchor not in anchors(linked.read_text(encoding="utf-8")):
                        problems.append(f"{where}: no heading or anchor '{anchor}' in {linked.relative_to(root)}")
    return problems


def citing_files(root: Path) -> list[Path]:
    """The project's tracked files that may cite docs pages in comments (code, params, make, docker)."""
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
        files = [root / name for name in listed.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in root.rglob("*") if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return [f for f in files if f.is_file() and (f.suffix in CITING_SUFFIXES or f.name in CITING_NAMES)
            and f.resolve() != Path(__file__).resolve()]


def broken_citations(root: Path, files: list[Path]) -> list[str]:
    """Every docs page, anchor or section title cited in the files that does not exist."""
    problems = []
    for source in files:
        for number, line in enumerate(source.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for page, anchor, title in CITATION.findall(line):
                where = f"{source.relative_to(root)}:{number}: docs/{page}{anchor}"
                doc = root / "docs" / page
                if not doc.is_file():
                    problems.append(f"{where}: docs/{page} does not exist")
                    continue
                text = doc.read_text(encoding="utf-8")
                if anchor and anchor[1:] not in anchors(text):
                    problems.append(f"{where}: no heading or anchor '{anchor[1:]}' in docs/{page}")
                elif title and not anchor and not any(h.lower().startswith(title.lower()) for h in headings(text)):
                    problems.append(f'{where}: no section "{title}" in docs/{page}')
    return problems


def docs_pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def test_github_slugs():
    assert github_slug("Results of the default run") == "results-of-the-default-run"
    assert github_slug("DARWIN's ablations") == "darwins-ablations"
    assert github_slug("What `make run` does") == "what-make-run-does"
    assert github_slug("Attention maps (Grad-CAM)") == "attention-maps-grad-cam"
    assert github_slug("CRDND (Wang et al., ICASSP 2023) — reconstruction") == "crdnd-wang-et-al-icassp-2023--reconstruction"
    assert github_slug("The fast path: bf16, channels_last") == "the-fast-path-bf16-channels_last"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n<a id=\"x\"></a>\n") == {"a", "a-1", "x"}


def test_every_docs_link_and_anchor_resolves():
    assert broken_links(ROOT, docs_pages(ROOT)) == []


def test_every_docs_page_cited_in_code_and_params_exists():
    files = citing_files(ROOT)
    assert any(f.name == "params.yaml" for f in files) and any(f.suffix == ".py" for f in files)
    assert broken_citations(ROOT, files) == []


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"
    first_screen = "\n".join(lines[:FIRST_SCREEN])
    for command in ("make run", "make test"):
        assert re.search(rf"^{command}\b", first_screen, re.M), f"`{command}` is not within README's first {FIRST_SCREEN} lines"


@pytest.fixture
def copy_of_docs(tmp_path):
    """README.md, docs/ and a params file copied into a temporary project."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    assert broken_links(tmp_path, docs_pages(tmp_path)) == []
    return tmp_path


@pytest.mark.parametrize("planted, expected", [
    ("[gone](docs/" + "no-such-page.md)", "docs/no-such-page.md does not exist"),
    ("[gone](docs/pipeline.md#" + "no-such-section)", "no heading or anchor 'no-such-section' in docs/pipeline.md"),
    ("[gone](#" + "no-such-section)", "no heading or anchor 'no-such-section' in README.md"),
])
def test_a_planted_broken_link_is_reported(copy_of_docs, planted, expected):
    readme = copy_of_docs / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8") + f"\nSee {planted}.\n", encoding="utf-8")
    problems = broken_links(copy_of_docs, docs_pages(copy_of_docs))
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize("planted, expected", [
    ("docs/" + "no-such-page.md", "docs/no-such-page.md does not exist"),
    ("docs/presets.md#" + "no-such-section", "no heading or anchor 'no-such-section' in docs/presets.md"),
    ('docs/methods.md, "' + 'No such section"', 'no section "No such section" in docs/methods.md'),
])
def test_a_planted_broken_citation_is_reported(copy_of_docs, planted, expected):
    params = copy_of_docs / "params.yaml"
    params.write_text(f"# see {planted}\n" + params.read_text(encoding="utf-8"), encoding="utf-8")
    problems = broken_citations(copy_of_docs, [params])
    assert len(problems) == 1 and expected in problems[0], problems
