"""The HTML report: ``graphopt run --report r.html`` and ``graphopt report r.json -o r.html``, rendered in headless
Chromium (Debian's package; .ci/run installs it and sets GRAPHOPT_CI, so CI never skips these)."""
import io
import json
import os
import shutil

import pytest

from graphopt.cli import main
from graphopt.cli.report import to_html
from conftest import TESTS

MODEL = f"{TESTS / 'zoo' / 'cnn.py'}:tiny_resnet"
SHAPE = "1x3x32x32"
HEADER = (0x24, 0x42, 0x5E)      # the tables' header background (report.py's style)
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright (the distribution's browser; Playwright downloads nothing)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if CHROMIUM is None or sync_playwright is None:
        why = "no chromium on PATH" if CHROMIUM is None else "playwright is not installed"
        if os.environ.get("GRAPHOPT_CI"):
            pytest.fail(f"the HTML report needs a browser test and {why}")
        pytest.skip(why)
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        yield launched
        launched.close()


def _open(browser, path):
    """The page at ``path`` and the URLs it tried to fetch besides itself (a self-contained page fetches none)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    fetched = []

    def route(r):
        if r.request.url != path.as_uri():
            fetched.append(r.request.url)
            return r.abort()
        return r.continue_()

    page.route("**/*", route)
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, fetched


def _rows(page, table):
    return page.locator(f"#{table} tbody tr").count()


def _shows_a_table(page, table):
    """The table's own screenshot: its header band in the header colour, and text (dark pixels) in its body."""
    from PIL import Image

    box = page.locator(f"#{table}").bounding_box()
    assert box["width"] > 300 and box["height"] > 40
    image = Image.open(io.BytesIO(page.locator(f"#{table}").screenshot())).convert("RGB")
    width, height = image.size
    header = [image.getpixel((x, 3)) for x in range(0, width, 4)]
    assert sum(max(abs(a - b) for a, b in zip(p, HEADER)) < 24 for p in header) > 0.8 * len(header)
    body = image.crop((0, height // 2, width, height)).getdata()
    dark = sum(1 for p in body if max(p) < 110)
    assert dark > 200, f"no text in the body of #{table}"


def test_a_run_report_renders_in_chromium_with_its_tables_pictures_and_explanations(browser, capsys, tmp_path):
    page_path = tmp_path / "r.html"
    code, stdout, _ = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--pipeline", "cleanup,fuse",
                              "--target", "xnnpack", "--emit", "onnx,ptl", "--bench", "--runs", "3",
                              "--out", str(tmp_path / "out"), "--explain", "fuse-act", "--report", str(page_path),
                              "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["files"] == ["partition.dot", "partition.svg", "partition.png", "bench.json", "bench.png"]
    page, fetched = _open(browser, page_path)
    assert page.title() == "graphopt: tiny_resnet" and page.locator(".status").inner_text() == "ok"
    assert _rows(page, "passes") == 1 + len(report["passes"])      # the captured row, then each pass
    assert _rows(page, "artifacts") == len(report["artifacts"]) == 2
    assert _rows(page, "bench") == len(report["bench"])
    names = page.locator("#passes tbody tr td:first-child").all_inner_texts()
    assert names == ["(captured)"] + [p["name"] for p in report["passes"]]
    for table in ("passes", "artifacts", "bench"):
        _shows_a_table(page, table)
    # the placement picture (SVG rather than its PNG twin) and the bench plot, decoded by the browser
    pictures = page.locator("figure img")
    assert [pictures.nth(i).get_attribute("alt") for i in range(pictures.count())] == ["partition.svg", "bench.png"]
    assert all(page.evaluate("img => img.complete && img.naturalWidth > 100", pictures.nth(i).element_handle())
               for i in range(pictures.count()))
    fused = next(p for p in report["passes"] if p["name"] == "fuse-act")["explanations"]
    assert fused and page.get_by_text(fused[0], exact=True).is_visible()
    assert fetched == []        # self-contained: nothing fetched, not even a font
    page.close()


def test_a_failed_run_report_in_html_says_what_failed(browser, capsys, tmp_path):
    plugin = tmp_path / "breaks.py"
    plugin.write_text((TESTS / "fixtures" / "breaks_plugin.py").read_text())
    page_path = tmp_path / "failed.html"
    code, _, err = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--out", str(tmp_path / "o"), "--plugin",
                           str(plugin), "--pipeline", "cleanup,fold-bn,breaks", "--report", str(page_path))
    assert code == 2
    page, fetched = _open(browser, page_path)
    assert page.locator(".status").inner_text() == "failed"
    assert page.locator("#error").inner_text() in err and "changed the outputs" in page.locator("#error").inner_text()
    assert page.locator("#passes tbody tr td:first-child").all_inner_texts() == \
        ["(captured)", "cleanup", "fold-bn", "breaks"]
    assert page.locator("#passes tr.failed-pass").inner_text().split() == ["breaks", "failed"]
    assert page.locator("#artifacts").count() == 0 and fetched == []
    _shows_a_table(page, "passes")
    page.close()


def test_graphopt_report_turns_a_report_json_into_the_same_page(capsys, tmp_path):
    code, _, _ = run_cli(capsys, "run", MODEL, "--input-shape", SHAPE, "--pipeline", "cleanup",
                         "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.json"), "--quiet")
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    code, stdout, _ = run_cli(capsys, "report", str(tmp_path / "r.json"))
    assert code == 0 and stdout.strip() == f"wrote {tmp_path / 'r.html'}"
    assert (tmp_path / "r.html").read_text() == to_html(report)
    code, _, _ = run_cli(capsys, "report", str(tmp_path / "r.json"), "-o", str(tmp_path / "page.htm"))
    assert code == 0 and (tmp_path / "page.htm").read_text() == to_html(report)


def test_html_escapes_what_the_report_holds():
    report = {"model": {"name": "<script>alert(1)</script>", "spec": "m.py:net"}, "passes": [], "artifacts": [],
              "ok": False, "error": "bad <b>input</b> & more"}
    page = to_html(report)
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "bad &lt;b&gt;input&lt;/b&gt; &amp; more" in page


@pytest.mark.parametrize("make, args, message", [
    (None, [], "no report at {d}/missing.json"),
    ("not json", [], "{d}/r.json is not a report JSON: "),
    ('{"a": 1}', [], "{d}/r.json is not a graphopt run report (no model, passes, artifacts, ok)"),
    ('{"model": {}, "passes": [], "artifacts": [], "ok": true}', ["-o", "{d}/r.txt"], "-o takes an .html file"),
    ('{"model": {}, "passes": [], "artifacts": [], "ok": true}', ["-o", "{d}/nowhere/r.html"],
     "cannot write the HTML report to {d}/nowhere/r.html: directory {d}/nowhere does not exist"),
])
def test_bad_report_input_is_one_line_and_exit_2(capsys, tmp_path, make, args, message):
    source = tmp_path / ("missing.json" if make is None else "r.json")
    if make is not None:
        source.write_text(make)
    code, stdout, err = run_cli(capsys, "report", str(source), *[a.format(d=tmp_path) for a in args])
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert err.startswith(f"graphopt: error: {message.format(d=tmp_path)}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if make is None else ["r.json"])
