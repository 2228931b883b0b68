"""The HTML report in a real browser: headless Chromium renders reports/report.html built by the
report stage from fixture metrics (the format of metrics/ in this repository, plus a deliberately
wide comparison table) at a laptop width; no raw Markdown may remain in the visible text, nothing
may overflow horizontally, every figure must decode. The screenshot is kept as a test artifact
(ROBUSTKD_TEST_ARTIFACTS, default test-artifacts/ at the project root)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .stage_fixtures import ROOT, tiny_params, write_params

WIDTH, HEIGHT = 1280, 800  # a laptop screen
ARTIFACTS = Path(os.environ.get("ROBUSTKD_TEST_ARTIFACTS") or ROOT / "test-artifacts")
RAW_MARKDOWN = ["```", "| ---", "|---", "**", "](", "\n## ", "\n# ", "`"]

# Runs inside the page: the measurements the test asserts on, written into the DOM for --dump-dom.
PROBE = """<script>
window.addEventListener('load', () => {
  const doc = document.documentElement;
  const over = [];
  for (const el of document.body.querySelectorAll('*')) {
    if (el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX !== 'visible')
      over.push(el.tagName + '.' + el.className + ' ' + el.scrollWidth + '>' + el.clientWidth);
    const r = el.getBoundingClientRect();
    if (r.right > doc.clientWidth + 1) over.push(el.tagName + ' right edge ' + Math.round(r.right));
  }
  const imgs = [...document.images].map(i => [i.alt, i.naturalWidth, Math.round(i.getBoundingClientRect().width)]);
  const out = document.createElement('pre');
  out.id = 'probe-result';
  out.textContent = JSON.stringify({scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth,
    height: doc.scrollHeight, overflowing: over, images: imgs, tables: document.querySelectorAll('table').length,
    text: document.body.innerText});
  document.body.appendChild(out);
});
</script>"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium; installed with apt-get when absent and the tests run as root."""
    exe = find_chromium()
    if exe:
        return exe
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs apt-get as root): "
                    "`apt-get install chromium` to run the browser check of the report")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
                ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]):
        subprocess.run(cmd, env=env, capture_output=True, timeout=900)
        if find_chromium():
            return find_chromium()
    pytest.skip("chromium could not be installed with apt-get (no Debian mirror reachable?)")


def headless(exe: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", "--disable-extensions", "--disable-background-networking", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """The report stage run on fixture metrics, without tracking."""
    wd = tmp_path_factory.mktemp("report")
    shutil.copytree(ROOT / "metrics", wd / "metrics")
    write_params(wd / "params.yaml", tiny_params(str(wd / "raw")))
    (wd / "reports").mkdir()
    # a wide comparison table, as stages/compare_table.py writes it, with a long unbreakable cell
    rows = "\n".join(f"| method_{i}_with_a_rather_long_name | " + " | ".join(["52.26 [42.4, 61.9]"] * 5) + " | passed |"
                     for i in range(4))
    (wd / "reports/comparison.md").write_text(
        "| method | Natural | PGD-20 | CW | AA | Worst case | checks |\n|---|---|---|---|---|---|---|\n" + rows
        + "\n\nAccuracy (%) [95% Wilson interval] on 100 test images (images sha256 `" + "ab" * 32 + "`).\n\n"
        "How each method's learning rate and schedule were set:\n\n- darwin: SGD lr 0.1, cosine\n")
    old = os.getcwd()
    os.environ["ROBUSTKD_TRACKING"] = "off"
    os.chdir(wd)
    try:
        from stages import report
        report.run([])
    finally:
        os.chdir(old)
        os.environ.pop("ROBUSTKD_TRACKING")
    return wd / "reports"


def test_report_html_structure(report_dir):
    page = (report_dir / "report.html").read_text()
    assert "<pre" not in page and "<table>" in page and "http://" not in page and "https://" not in page
    for section in ("Accuracy under attack", "Evaluation checks", "ONNX export", "Data card", "Method comparison"):
        assert f"<h2>{section}" in page   # a heading may say its image count: "(the same 100 images)"
    assert page.count("data:image/png;base64,") == 2
    # the header: when, from which commit (tracking is off here: no MLflow run to link)
    header = page[page.index('<div class="meta">'):page.index('<div class="lead">')]
    assert "Written 20" in header and " UTC from commit " in header and "Not tracked in MLflow" in header


def test_report_in_headless_chromium(report_dir, chromium):
    probe_page = report_dir / "probe.html"
    probe_page.write_text((report_dir / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    dom = headless(chromium, f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=5000", "--dump-dom",
                   probe_page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    start = dom.stdout.index('<pre id="probe-result">') + len('<pre id="probe-result">')
    import html
    probe = json.loads(html.unescape(dom.stdout[start:dom.stdout.index("</pre>", start)]))

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    headless(chromium, f"--window-size={WIDTH},{min(probe['height'] + 20, 8000)}", f"--screenshot={shot}",
             (report_dir / "report.html").as_uri())
    print(f"\nreport screenshot ({WIDTH}px wide): {shot}")

    text = probe["text"]
    assert "Accuracy under attack" in text and "Data card" in text
    leftovers = [m for m in RAW_MARKDOWN if m in "\n" + text]
    assert not leftovers, f"raw Markdown in the rendered report: {leftovers}"
    assert probe["scrollWidth"] <= probe["clientWidth"], probe
    assert not probe["overflowing"], probe["overflowing"][:10]
    assert probe["tables"] >= 5
    assert len(probe["images"]) == 2 and all(natural > 0 and 0 < shown <= WIDTH for _, natural, shown in probe["images"])
    assert shot.stat().st_size > 10_000
