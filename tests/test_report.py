"""``clipeval report``: structure and escaping read with an HTML parser, and the page driven in a
real headless Chromium (console errors, network, filtering, sorting, a screenshot)."""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, assert_user_error

pytestmark = pytest.mark.xdist_group("report")  # its module fixtures are whole runs: built once

HOSTILE = [
    '<script>alert("prompt")</script> a cat',
    '"><img src=x onerror=alert(1)> a dog',
    "fish & chips </script><!-- -->",
    "a café in 東京 with a 🐱 — 'quotes'",
    "a\ttab and a plain prompt",
]
HOSTILE_CATEGORY = "--><script>alert('category')</script><!--"


class Page(html.parser.HTMLParser):
    """Every tag with its attributes, the text of each script, and the visible text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._in_script = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)


@pytest.fixture(scope="module")
def hostile_runs(models, tmp_path_factory):
    from click.testing import CliRunner

    from clipeval.cli import main

    root = tmp_path_factory.mktemp("report") / "<odd & path>"
    root.mkdir()
    library = root / "hostile.jsonl"
    library.write_text("".join(json.dumps({"prompt": p, "category": HOSTILE_CATEGORY if i % 2 else "plain"}) + "\n"
                               for i, p in enumerate(HOSTILE)), encoding="utf-8")
    runs = []
    for name, steps in (("a", "2"), ("b", "3")):
        out = root / name
        args = ["run", "--checkpoint", str(models.sd), "--clip-model", str(models.clip), "--prompt-library", str(library),
                "--out", str(out), "--steps", steps, "--images-per-prompt", "2", "--quiet"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.stderr
        runs.append(out)
    return runs


def _check_page(path: Path, hostile: bool = True) -> Page:
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    tags = [t for t, _ in page.tags]
    assert tags.count("script") == 2  # the data block and our code, nothing injected
    assert not {"link", "iframe", "object", "embed", "base", "form"} & set(tags)
    for tag, attrs in page.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        for name in ("src", "href"):
            if name in attrs:
                assert attrs[name].startswith("data:"), (tag, attrs)  # nothing fetched, ever
    import re

    without_namespaces = re.sub(r'xmlns(:\w+)?="[^"]*"', "", text)  # XML names, never fetched
    assert "http://" not in without_namespaces and "https://" not in without_namespaces
    csp = [a for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]
    if not hostile:
        return page
    # The visible text carries the hostile strings as text; the raw HTML never as markup.
    visible = "".join(page.text)
    assert '<script>alert("prompt")</script> a cat' in visible
    assert "<script>alert(" not in text.replace("&lt;script&gt;", "")
    assert "onerror=alert(1)>" not in text.replace("onerror=alert(1)&gt;", "")
    return page


def test_single_run_report_structure_and_escaping(cli, hostile_runs, tmp_path):
    out = tmp_path / "one.html"
    result = cli("report", hostile_runs[0], "--out", out)
    assert result.exit_code == 0, result.stderr
    page = _check_page(out)
    data = json.loads(page.scripts[0])
    assert [r["prompt"] for r in data["rows"]] == HOSTILE
    assert {r["category"] for r in data["rows"]} == {"plain", HOSTILE_CATEGORY}
    assert all(r["thumb"].startswith("data:image/jpeg;base64,") for r in data["rows"])
    assert all(r["n"] == 2 for r in data["rows"])
    visible = "".join(page.text)
    assert "clip/mean" in visible and "Best" in visible and "Worst" in visible
    assert visible.count("seed ") >= 4  # best/worst cards show each image's seed
    svgs = [a for t, a in page.tags if t == "svg"]
    assert len(svgs) == 2  # histogram and category bars; this library has no challenge column
    facts = {t.strip() for t in page.text if t.strip()}
    manifest = json.loads((hostile_runs[0] / "manifest.json").read_text())
    hardware = manifest["device"]["hardware"]
    assert {"device", "cpu", "hardware", hardware} <= facts  # the type and the hardware, apart
    assert hardware not in ("x86_64", "aarch64", "")  # a processor's name, where the OS says it


def test_comparison_report(cli, hostile_runs, tmp_path):
    out = tmp_path / "two.html"
    result = cli("report", *hostile_runs, "--out", out)
    assert result.exit_code == 0, result.stderr
    page = _check_page(out)
    data = json.loads(page.scripts[0])
    assert data["runs"] == ["a", "b"] and all(len(r["means"]) == 2 for r in data["rows"])
    visible = "".join(page.text)
    assert "Comparison" in visible and "p (Wilcoxon)" in visible and "Biggest changes" in visible
    assert "same prompt, same seeds" in visible
    assert "smallest detectable difference" in visible and "0.005 needs" in visible


def test_a_comparison_shows_each_runs_own_seeds_under_its_images(cli, hostile_runs, tmp_path, models):
    import re

    import pandas as pd

    other = tmp_path / "seed1"
    library = hostile_runs[0].parent / "hostile.jsonl"
    assert cli("run", "--checkpoint", models.sd, "--clip-model", models.clip, "--prompt-library", library, "--out", other,
               "--steps", "2", "--images-per-prompt", "2", "--seed", "1", "--quiet").exit_code == 0
    out = tmp_path / "seeds.html"
    assert cli("report", hostile_runs[0], other, "--allow-mismatch", "--out", out).exit_code == 0
    html = out.read_text(encoding="utf-8")
    side = html[html.index("Biggest changes"):]
    rows = re.findall(r"<tr><th>sample (\d+)</th>(.*?)</tr>", side)
    assert rows
    seeds = [pd.read_csv(run / "scores.csv") for run in (hostile_runs[0], other)]
    for _, cells in rows:
        shown = [int(x) for x in re.findall(r"seed (\d+)", cells)]
        assert len(shown) == 2
        assert shown[0] in set(seeds[0]["seed"]) and shown[1] in set(seeds[1]["seed"])
        assert shown[0] != shown[1]
    assert "same prompt, different seeds" in "".join(Page(html).text)


def test_run_with_report_flag_and_reports_of_scores_and_imageless_runs(cli, run_tiny, models, tmp_path):
    run = tmp_path / "run"
    result = run_tiny(run, "--limit", "3", "--report")
    assert result.exit_code == 0, result.stderr
    assert "report → " in result.stdout and (run / "report.html").is_file()
    _check_page(run / "report.html", hostile=False)
    rescored = tmp_path / "rescored"
    assert cli("score", run, "--out", rescored, "--clip-model", models.clip2, "--quiet").exit_code == 0
    assert cli("report", rescored, "--out", tmp_path / "s.html").exit_code == 0
    rows = json.loads(Page((tmp_path / "s.html").read_text()).scripts[0])["rows"]
    assert all(r["thumb"] for r in rows)  # the images of the run it re-scored
    bare = tmp_path / "bare"
    assert run_tiny(bare, "--limit", "2", "--no-save-images").exit_code == 0
    assert cli("report", bare, "--out", tmp_path / "bare.html").exit_code == 0
    assert "no image" in (tmp_path / "bare.html").read_text()


def test_report_errors(cli, hostile_runs, tmp_path):
    assert_user_error(cli("report", tmp_path / "nothing", "--out", tmp_path / "r.html"), "no such run folder")
    assert_user_error(cli("report", hostile_runs[0], "--out", tmp_path / "r.txt"), "give a .html file name")


# -- in a real browser ---------------------------------------------------------------------------------

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium for the browser tests (.ci/run installs Debian's package)")
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium package)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _open(browser, path: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    # Every hostile payload calls alert(): a dialog is the proof that injected code ran.
    page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.on("request", lambda r: problems.append(f"request: {r.url[:80]}") if not r.url.startswith(("file:", "data:")) else None)
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, problems


def _artifact(page, name: str) -> None:
    folder = Path(os.environ.get("CLIPEVAL_TEST_ARTIFACTS", REPO / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)


@pytest.mark.slow
def test_the_browser_check_catches_a_page_that_runs_injected_code(browser, tmp_path):
    """The control for the check above: the same payloads, unescaped and without our CSP, run,
    and the check sees them. A check that could not fail would prove nothing."""
    unsafe = tmp_path / "unsafe.html"
    unsafe.write_text(f"<!doctype html><html><body><p>{HOSTILE[0]}</p><p>{HOSTILE[1]}</p></body></html>", encoding="utf-8")
    page, problems = _open(browser, unsafe)
    page.wait_for_timeout(300)
    assert "dialog: prompt" in problems and "dialog: 1" in problems


@pytest.mark.slow
def test_the_report_in_chromium_renders_filters_and_sorts(cli, hostile_runs, tmp_path, browser):
    out = tmp_path / "two.html"
    assert cli("report", *hostile_runs, "--out", out).exit_code == 0
    page, problems = _open(browser, out)
    assert problems == []
    assert page.inner_text("#count") == "5 of 5 prompts"
    assert page.locator("#prompts tbody tr").count() == 5
    assert page.locator("img").count() >= 5 and page.evaluate("document.querySelectorAll('img').length > 0")
    # The report's images are loading="lazy": the load event does not wait for them, so wait for
    # each to decode (a broken one has naturalWidth 0 and times this out) rather than race them.
    page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)",
                           timeout=20_000)
    page.wait_for_timeout(300)  # handlers such as onerror fire after load
    assert problems == []  # no dialog: nothing injected ran
    page.fill("#search", "café")
    page.wait_for_timeout(300)
    assert page.inner_text("#count") == "1 of 5 prompts"
    visible = page.locator("#prompts tbody tr:visible td.text").all_inner_texts()
    assert visible == [HOSTILE[3]]
    page.fill("#search", "")
    page.select_option("#category", HOSTILE_CATEGORY)
    page.wait_for_timeout(300)
    assert page.inner_text("#count") == "2 of 5 prompts"
    assert page.locator("#prompts tbody tr:visible td.text").all_inner_texts() == [HOSTILE[1], HOSTILE[3]]
    page.select_option("#category", "")
    page.locator("#prompts thead th", has_text="mean: a").click()  # numbers sort high to low first
    means = page.evaluate("Array.from(document.querySelectorAll('#prompts tbody tr')).map(r => parseFloat(r.cells[6].textContent))")
    assert means == sorted(means, reverse=True)
    _artifact(page, "report-comparison.png")
    assert problems == []


@pytest.mark.slow
def test_a_parti_sized_report_stays_fast(browser, mirror, tmp_path, cli):
    """1632 prompts × 4 images, as a full Parti run would have: the table filters in well under
    a second. The run is constructed (tiny PNGs, random scores), the report is the real one."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from clipeval.prompts import load_library

    lib = load_library("parti")
    run = tmp_path / "parti"
    (run / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    tile = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    rows = []
    for p in lib.prompts:
        for s in range(4):
            name = f"images/{p.prompt_id:05d}_{s:02d}.png"
            if s == 0:
                tile.save(run / name)
            else:
                os.link(run / f"images/{p.prompt_id:05d}_00.png", run / name)
            rows.append({"prompt_id": p.prompt_id, "sample": s, "seed": p.prompt_id * 4096 + s, "prompt": p.prompt,
                         "category": p.category, "challenge": p.challenge,
                         "clip_score": round(0.3 + 0.03 * rng.standard_normal(), 8), "truncated": False, "image": name, "flag": ""})
    scores = pd.DataFrame(rows)
    from clipeval import stats, store

    store.write_results(run, scores=scores, prompts=stats.prompts_table(scores), summary=stats.summarize(scores),
                        manifest={"status": "complete", "settings": {"library_sha256": lib.sha256, "seed": 0, "clip_model": "m"}})
    out = tmp_path / "parti.html"
    assert cli("report", run, "--out", out).exit_code == 0
    page, problems = _open(browser, out)
    assert problems == []
    assert page.inner_text("#count") == "1632 of 1632 prompts"
    elapsed = page.evaluate("""() => {
        const search = document.getElementById('search');
        const t0 = performance.now();
        search.value = 'dog';
        search.dispatchEvent(new Event('input'));
        return new Promise(resolve => setTimeout(() => resolve(performance.now() - t0), 200));
    }""")
    shown = int(page.inner_text("#count").split()[0])
    assert 0 < shown < 1632
    assert elapsed < 200 + 500  # the 120 ms debounce, then the filter itself
    sort_ms = page.evaluate("""() => {
        const t0 = performance.now();
        document.querySelectorAll('#prompts thead th')[6].click();
        return performance.now() - t0;
    }""")
    assert sort_ms < 1000
    _artifact(page, "report-parti.png")


@pytest.fixture
def sweep_results(cli, tmp_path):
    """A sweep's RESULTS_DIR with three checkpoints, the newest clearly worse (an alert), and a
    hostile category name."""
    from test_health import _training

    training, results = _training(tmp_path, {100: 0.0, 200: 0.02, 300: -0.03})
    for run in results.iterdir():  # a category name that is markup
        scores = pd.read_csv(run / "scores.csv", keep_default_na=False)
        scores.loc[scores["category"] == "Food", "category"] = HOSTILE_CATEGORY
        from clipeval import stats, store

        manifest = json.loads((run / "manifest.json").read_text())
        scores["clip_score"] = pd.to_numeric(scores["clip_score"])
        store.write_results(run, scores=scores, prompts=stats.prompts_table(scores), summary=stats.summarize(scores),
                            manifest=manifest)
    assert cli("sweep", training, "--out", results, "--prompt-library", "smoke", "--quiet").exit_code == 0
    return results


def test_a_sweep_folder_gets_a_training_report(cli, sweep_results, tmp_path):
    out = tmp_path / "training.html"
    result = cli("report", sweep_results, "--out", out)
    assert result.exit_code == 0, result.stderr
    page = _check_page(out, hostile=False)
    visible = "".join(page.text)
    assert "Training curve" in visible and "Per-category curves" in visible and "History" in visible
    assert "best: checkpoint-200" in visible and "newest: checkpoint-300" in visible
    assert "alert on the newest checkpoint" in visible
    assert "Biggest changes, checkpoint-300 vs checkpoint-200" in visible  # best and newest side by side
    data = json.loads(page.scripts[0])
    assert HOSTILE_CATEGORY in {r["category"] for r in data["rows"]}  # carried as data, never as markup
    assert len([a for t, a in page.tags if t == "svg"]) >= 2  # the curve and the small multiples
    # The history table holds history.csv's rows, in its order, with their numbers.
    import html
    import re

    history = pd.read_csv(sweep_results / "history.csv", keep_default_na=False)
    table = out.read_text(encoding="utf-8").split("id='history'>", 1)[1].split("</table>", 1)[0]
    rows = [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", r)] for r in re.findall(r"<tr>(.*?)</tr>", table)[1:]]
    assert [(r[0], r[1], r[2], r[8]) for r in rows] == [
        (str(h["step"]), h["run"], f"{float(h['clip_mean']):.4f}", h["alert"]) for _, h in history.iterrows()]
    assert rows[-1][5] == f"{float(history['delta_best'].iloc[-1]):+.4f}" and rows[0][5] == ""


@pytest.mark.slow
def test_the_training_report_in_chromium(cli, sweep_results, tmp_path, browser):
    out = tmp_path / "training.html"
    assert cli("report", sweep_results, "--out", out).exit_code == 0
    page, problems = _open(browser, out)
    page.wait_for_timeout(300)
    assert problems == []
    assert page.locator("#history tr").count() == 4  # header and three checkpoints
    assert page.inner_text("#count") == "60 of 60 prompts"
    _artifact(page, "training-report.png")


# -- charts that do not mislead ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_run(models, tmp_path_factory):
    from click.testing import CliRunner

    from clipeval.cli import main

    out = tmp_path_factory.mktemp("smoke-run") / "run"
    result = CliRunner().invoke(main, ["run", "--checkpoint", str(models.sd), "--clip-model", str(models.clip),
                                       "--prompt-library", "smoke", "--steps", "2", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.slow
def test_category_bars_start_at_zero_so_a_bars_length_is_its_value(cli, smoke_run, tmp_path, browser):
    out = tmp_path / "report.html"
    assert cli("report", smoke_run, "--out", out).exit_code == 0
    page, problems = _open(browser, out)
    assert problems == []
    groups = json.loads((smoke_run / "summary.json").read_text())["by_category"]
    boxes = [page.locator(f"#by_category-bar-{i}").bounding_box() for i in range(len(groups))]
    means = [g["mean"] for g in groups.values()]
    assert all(b is not None and b["width"] > 0 for b in boxes)
    assert max(b["x"] for b in boxes) - min(b["x"] for b in boxes) < 1.0  # every bar starts at the same 0
    for box, mean in zip(boxes, means):
        assert box["width"] / boxes[0]["width"] == pytest.approx(mean / means[0], rel=0.02)
    _artifact(page, "report-category-bars.png")


def test_the_histogram_counts_whole_images(smoke_run, monkeypatch):
    from matplotlib.figure import Figure

    from clipeval import report

    figures = []
    real = report.figure_svg

    def keep(draw, **size):
        fig = Figure()
        draw(fig)
        figures.append(fig)
        return real(draw, **size)

    monkeypatch.setattr(report, "figure_svg", keep)
    report._histogram([report.load(smoke_run)])
    ticks = figures[0].axes[0].get_yticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)


def test_a_comparison_report_says_first_which_settings_differ(cli, run_tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_tiny(a, "--limit", "3", "--guidance-scale", "7.5").exit_code == 0
    assert run_tiny(b, "--limit", "3", "--guidance-scale", "3").exit_code == 0
    out = tmp_path / "r.html"
    assert cli("report", a, b, "--out", out).exit_code == 0
    text = out.read_text()
    assert text.index("What differs") < text.index("<table class='compare'><tr><th>run")
    row = text[text.index("<th>guidance_scale</th>"):].split("</tr>")[0]
    assert "<td>7.5</td>" in row and "<td>3.0</td>" in row
    assert "<th>steps</th>" not in text.split("What differs")[1].split("</section>")[0]  # the same: not listed


def test_the_demo_report_keeps_the_demo_warning(cli, tmp_path):
    out = tmp_path / "demo"
    result = cli("run", "--checkpoint", "demo", "--clip-model", "demo", "--prompt-library", "smoke", "--limit", "2",
                 "--steps", "1", "--out", out, "--report")
    assert result.exit_code == 0, result.stderr
    assert re.search(r"loading CLIP model demo \(\d+\.\d kB\)", result.stderr)  # built here, not "from the hub"
    assert "DEMO MODELS: tiny random weights; these scores mean nothing." in (out / "report.html").read_text()


@pytest.mark.slow
def test_a_very_long_prompt_is_folded(cli, run_tiny, tmp_path, browser):
    library = tmp_path / "long.txt"
    long_prompt = ("a very detailed scene of a harbour at dawn with boats, gulls and fishermen " * 45)[:3364]
    library.write_text(long_prompt + "\na cat\n")
    run = tmp_path / "run"
    assert run_tiny(run, library=library).exit_code == 0
    out = tmp_path / "r.html"
    assert cli("report", run, "--out", out).exit_code == 0
    page, problems = _open(browser, out)
    assert problems == []
    heights = page.evaluate("() => Array.from(document.querySelectorAll('.card')).map(c => c.getBoundingClientRect().height)")
    assert heights and max(heights) < 400
    rows = page.evaluate("() => Array.from(document.querySelectorAll('#prompts tbody tr')).map(r => r.getBoundingClientRect().height)")
    assert max(rows) < 200
    page.click(".card details.prompt summary")  # unfolded on request, whole
    assert long_prompt in page.inner_text(".card details.prompt")


@pytest.mark.slow
def test_the_training_report_fits_1400_px_and_its_legend_leaves_the_band_free(cli, sweep_results, tmp_path, browser):
    out = tmp_path / "training.html"
    assert cli("report", sweep_results, "--out", out).exit_code == 0
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(out.as_uri())
    page.wait_for_load_state("load")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 1400
    alert = page.locator("#history th", has_text="alert").bounding_box()
    assert alert is not None and alert["x"] + alert["width"] <= 1400
    band, legend = page.locator("#ci-band").bounding_box(), page.locator("#curve-legend").bounding_box()
    assert band["x"] + band["width"] <= legend["x"] or legend["y"] >= band["y"] + band["height"]  # no overlap
    _artifact(page, "training-report-1400.png")
