"""Statistics and ``clipeval compare`` on constructed runs with known answers, and the CI gates."""

from __future__ import annotations

import csv
import io
import json
import re
import math

import numpy as np
import pandas as pd
import pytest
from conftest import assert_user_error

from clipeval.stats import Bootstrap, weighted_mean_ci

SETTINGS = {"library_sha256": "abc", "seed": 0, "clip_model": "openai/clip-vit-large-patch14-336", "checkpoint": "x"}


def base_scores(prompts: int = 40, samples: int = 2, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(prompts):
        prompt_level = 0.3 + 0.03 * rng.standard_normal()
        for s in range(samples):
            rows.append({
                "prompt_id": p, "sample": s, "seed": p * 4096 + s, "prompt": f"prompt {p} with \"quotes\", commas",
                "category": "Animals" if p % 2 else "Food", "challenge": "Basic" if p % 4 < 2 else "Complex",
                "clip_score": round(prompt_level + 0.01 * rng.standard_normal(), 8), "truncated": False,
                "image": f"images/{p:05d}_{s:02d}.png",
            })
    return pd.DataFrame(rows)


def make_run(path, scores: pd.DataFrame, **settings):
    """A finished run folder with these scores, written as clipeval writes one (a result set)."""
    from clipeval import stats, store

    path.mkdir(parents=True)
    scores = scores.assign(flag=scores.get("flag", ""))
    store.write_results(path, scores=scores, prompts=stats.prompts_table(scores), summary=None,
                        manifest={"status": "complete", "settings": {**SETTINGS, **settings}})
    return path


def compare_json(cli, *args):
    result = cli("compare", *args, "--format", "json", "--resamples", "2000")
    assert result.exit_code in (0, 1), result.stderr
    return result, json.loads(result.stdout)


def test_bootstrap_ci_matches_the_normal_approximation_and_is_reproducible():
    rng = np.random.default_rng(3)
    x = 0.3 + 0.05 * rng.standard_normal(2000)
    low, high = weighted_mean_ci(x, np.ones_like(x))
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert low < x.mean() < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.05)
    assert weighted_mean_ci(x, np.ones_like(x)) == (low, high)  # seeded
    assert weighted_mean_ci(x, np.ones_like(x), Bootstrap(seed=1)) != (low, high)
    assert weighted_mean_ci(x[:1], np.ones(1)) is None
    assert weighted_mean_ci(np.full(5, 0.2), np.ones(5)) == (0.2, 0.2)


def test_the_interval_is_bca_on_a_skewed_sample():
    """Right-skewed per-prompt means, one image each: our interval of the weighted mean equals
    scipy's BCa interval of the plain mean (another statistic, the same resamples) and differs from
    the percentile interval, shifted towards the long tail."""
    from scipy import stats as sps

    x = 0.25 + np.random.default_rng(3).exponential(0.03, 25)
    ours = weighted_mean_ci(x, np.ones_like(x))

    def scipy_ci(method):
        r = sps.bootstrap((x,), np.mean, n_resamples=10_000, confidence_level=0.95, method=method,
                          rng=np.random.default_rng(0))
        return r.confidence_interval.low, r.confidence_interval.high

    bca, percentile = scipy_ci("BCa"), scipy_ci("percentile")
    assert ours == pytest.approx(bca, abs=1e-12)
    assert ours[0] - percentile[0] > 5e-4 and ours[1] - percentile[1] > 5e-4


def test_bootstrap_resamples_prompts_with_their_image_counts():
    # Two prompts of very different sizes: the mean over images weights them by their counts.
    sums, counts = np.array([0.9, 0.1, 0.5]), np.array([3, 1, 1])
    low, high = weighted_mean_ci(sums, counts, Bootstrap(resamples=2000))
    assert low <= 1.5 / 5 <= high


def test_a_run_against_itself(cli, tmp_path):
    a = make_run(tmp_path / "a", base_scores())
    b = make_run(tmp_path / "b", base_scores())
    result, data = compare_json(cli, a, b, "--fail-if-worse")
    assert result.exit_code == 0
    overall = data["runs"][0]["overall"]
    assert overall["delta"] == 0 and overall["delta_ci"] == [0.0, 0.0]
    assert overall["p_value"] == 1.0 and overall["win_rate"] == 0 and overall["tie_rate"] == 1
    assert data["runs"][0]["worse"] is False and data["failed"] == []
    assert data["runs"][0]["paired_images"] == 80


def test_the_text_of_a_comparison_where_every_prompt_ties(cli, tmp_path):
    a = make_run(tmp_path / "a", base_scores())
    b = make_run(tmp_path / "b", base_scores())
    text = cli("compare", a, b).stdout
    assert "n/a (all tied)" in text and "0.0%" not in text
    assert "every one of the 40 prompts moved by the same amount: there is no spread to measure" in text
    assert "needs 2 prompts" not in text
    shifted = make_run(tmp_path / "c", base_scores().assign(clip_score=lambda f: f["clip_score"] + 0.01 * (f["prompt_id"] % 3)))
    text = cli("compare", a, shifted).stdout
    assert "no spread to measure" not in text and "all tied" not in text
    assert re.search(r"; 0\.005 needs \d+ prompts, 0\.01 needs \d+ prompts\n", text)


def test_a_constant_shift_gives_that_delta_exactly_and_a_tiny_p(cli, tmp_path):
    d = 0.0125
    scores = base_scores()
    a = make_run(tmp_path / "a", scores)
    shifted = scores.assign(clip_score=scores["clip_score"] + d)
    b = make_run(tmp_path / "b", shifted)
    _, data = compare_json(cli, a, b)
    overall = data["runs"][0]["overall"]
    assert overall["delta"] == pytest.approx(d, abs=1e-12)
    assert overall["delta_ci"] == pytest.approx([d, d], abs=1e-12)
    # 40 positive, tied deltas: scipy uses the normal approximation, z = (820 - 410) / 74.4 → p ≈ 1e-8
    assert overall["p_value"] < 1e-7
    assert overall["win_rate"] == 1.0
    assert overall["mean"] == pytest.approx(overall["baseline_mean"] + d, abs=1e-12)


def test_category_deltas_and_the_groups_that_moved_most(cli, tmp_path):
    scores = base_scores()
    a = make_run(tmp_path / "a", scores)
    moved = scores.assign(clip_score=np.where(scores["category"] == "Animals", scores["clip_score"] + 0.05, scores["clip_score"]))
    b = make_run(tmp_path / "b", moved)
    _, data = compare_json(cli, a, b)
    run = data["runs"][0]
    groups = {(g["kind"], g["label"]): g for g in run["groups"]}
    assert groups[("category", "Animals")]["delta"] == pytest.approx(0.05, abs=1e-12)
    assert groups[("category", "Food")]["delta"] == pytest.approx(0.0, abs=1e-12)
    assert groups[("challenge", "Basic")]["delta"] == pytest.approx(0.025, abs=1e-12)
    assert run["overall"]["delta"] == pytest.approx(0.025, abs=1e-12)
    assert (run["groups"][0]["kind"], run["groups"][0]["label"]) == ("category", "Animals")
    assert groups[("category", "Animals")]["prompts"] == 20 and not groups[("category", "Animals")]["few_prompts"]
    text = cli("compare", a, b, "--resamples", "500").stdout
    assert "Groups that moved most" in text and text.index("Animals") < text.index("Food")


def test_noise_alone_is_not_called_a_change(cli, tmp_path):
    scores = base_scores(prompts=200)
    a = make_run(tmp_path / "a", scores)
    rng = np.random.default_rng(11)
    noisy = scores.assign(clip_score=scores["clip_score"] + 0.01 * rng.standard_normal(len(scores)))
    b = make_run(tmp_path / "b", noisy)
    result, data = compare_json(cli, a, b, "--fail-if-worse")
    overall = data["runs"][0]["overall"]
    assert overall["delta_ci"][0] < 0 < overall["delta_ci"][1]
    assert overall["p_value"] > 0.05 and result.exit_code == 0
    assert "no significant change" in cli("compare", a, b, "--resamples", "500").stdout


def test_fail_if_worse_respects_the_margin(cli, tmp_path):
    scores = base_scores()
    a = make_run(tmp_path / "a", scores)
    b = make_run(tmp_path / "b", scores.assign(clip_score=scores["clip_score"] - 0.02))
    failed = cli("compare", a, b, "--fail-if-worse", "--margin", "0.01", "--resamples", "500")
    assert failed.exit_code == 1
    assert "gate failed" in failed.stderr and "worse than" in failed.stderr
    assert "worse by > 0.01" in failed.stdout
    assert cli("compare", a, b, "--fail-if-worse", "--margin", "0.03", "--resamples", "500").exit_code == 0
    assert cli("compare", a, b, "--resamples", "500").exit_code == 0  # no gate asked for


def test_the_gate_on_noisy_deltas_fails_only_when_the_whole_interval_is_below_the_margin(cli, tmp_path):
    """Per-prompt deltas of -0.013 ± 0.035: the interval is about ±0.005 wide. With margin 0.01 the
    point estimate is below -0.01 but the interval reaches above it: not significant, exit 0.
    With margin 0.004 the whole interval lies below -0.004: exit 1."""
    scores = base_scores(prompts=200)
    rng = np.random.default_rng(0)
    shift = pd.Series(-0.013 + 0.035 * rng.standard_normal(200))
    a = make_run(tmp_path / "a", scores)
    b = make_run(tmp_path / "b", scores.assign(clip_score=scores["clip_score"] + scores["prompt_id"].map(shift)))
    passed, data = compare_json(cli, a, b, "--fail-if-worse", "--margin", "0.01")
    overall = data["runs"][0]["overall"]
    assert overall["delta"] < -0.01 < overall["delta_ci"][1]  # below the margin, but not surely
    assert overall["delta_ci"][0] < -0.01
    assert passed.exit_code == 0
    failed, data = compare_json(cli, a, b, "--fail-if-worse", "--margin", "0.004")
    assert data["runs"][0]["overall"]["delta_ci"][1] < -0.004
    assert failed.exit_code == 1 and "gate failed" in failed.stderr


def test_mismatched_runs_are_refused_then_compared_on_what_they_share(cli, tmp_path):
    scores = base_scores()
    a = make_run(tmp_path / "a", scores)
    b = make_run(tmp_path / "b", scores[scores.prompt_id < 20], seed=1, library_sha256="other")
    assert_user_error(cli("compare", a, b), "seed 1", "library_sha256", "--allow-mismatch")
    result, data = compare_json(cli, a, b, "--allow-mismatch")
    assert data["runs"][0]["paired_images"] == 40 and data["runs"][0]["baseline_images"] == 80
    assert len(data["mismatches"]) == 2
    text = cli("compare", a, b, "--allow-mismatch", "--resamples", "500").stdout
    assert "mismatch (allowed)" in text and "40 images paired of 40 (run) and 80 (baseline)" in text


def test_baseline_option_and_three_runs_and_csv(cli, tmp_path):
    scores = base_scores()
    runs = [make_run(tmp_path / n, scores.assign(clip_score=scores["clip_score"] + d)) for n, d in
            (("a", 0.0), ("b", 0.01), ("c", -0.01))]
    result = cli("compare", runs[0], runs[2], "--baseline", runs[1], "--format", "csv", "--resamples", "500")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    overall = {r["run"]: r for r in rows if r["kind"] == "overall"}
    assert set(overall) == {str(runs[0]), str(runs[2])}
    assert all(r["baseline"] == str(runs[1]) for r in rows)
    assert float(overall[str(runs[0])]["delta"]) == pytest.approx(-0.01, abs=1e-12)
    assert float(overall[str(runs[2])]["delta"]) == pytest.approx(-0.02, abs=1e-12)
    assert {r["group"] for r in rows} == {"all", "Animals", "Food", "Basic", "Complex"}


def test_markdown_escapes_table_cells(cli, tmp_path):
    scores = base_scores()
    scores["category"] = np.where(scores["prompt_id"] % 2, "a|b", "two\nlines")
    a = make_run(tmp_path / "a", scores)
    b = make_run(tmp_path / "b", scores.assign(clip_score=scores["clip_score"] + 0.01))
    out = cli("compare", a, b, "--format", "markdown", "--resamples", "500").stdout
    assert "a\\|b" in out and "| a|b |" not in out
    rows = [line for line in out.splitlines() if "two" in line]  # a line break would end the table's row
    assert rows and all(line.startswith("| category | two lines |") for line in rows), rows


@pytest.mark.parametrize("setup, needle", [
    (lambda p: None, "no such run folder"),
    (lambda p: p.mkdir(), "not a finished clipeval run"),
    (lambda p: (p.mkdir(), (p / "manifest.json").write_text('{"status": "complete"}'), (p / "scores.csv").write_text("a,b\n1,2\n")), "missing columns"),
])
def test_bad_run_folders(cli, tmp_path, setup, needle):
    good = make_run(tmp_path / "good", base_scores())
    bad = tmp_path / "bad"
    setup(bad)
    assert_user_error(cli("compare", good, bad), needle)


def test_one_run_is_not_a_comparison(cli, tmp_path):
    from clipeval import compare
    from clipeval.errors import ClipevalError

    a = make_run(tmp_path / "a", base_scores())
    result = cli("compare", a)
    assert result.exit_code == 2 and result.stderr == (
        "clipeval: error: compare needs at least two runs (RUN_A RUN_B ..., or one run and --baseline)\n")
    with pytest.raises(ClipevalError, match=r"^compare needs at least two runs$"):  # the library's own check
        compare.compare([compare.load_run(a)])


def test_what_must_match_is_named_run_by_run_with_the_way_out(cli, tmp_path):
    """Every difference, joined by '; ', then what to do: --metric where the scorers differ, else
    --allow-mismatch, which pairs what the runs share, and says so when that is nothing."""
    scores = base_scores(prompts=12)
    a = make_run(tmp_path / "a", scores)
    b = make_run(tmp_path / "b", scores, seed=1, library_sha256="def")
    c = make_run(tmp_path / "c", scores, clip_model="google/siglip-base-patch16-224")
    result = cli("compare", a, b)
    assert result.exit_code == 2 and result.stderr == (
        f"clipeval: error: runs differ in what must match ({b} has library_sha256 'def', {a} has library_sha256 'abc'; "
        f"{b} has seed 1, {a} has seed 0); --allow-mismatch compares the prompts they share\n")
    result = cli("compare", a, c)
    assert result.exit_code == 2 and result.stderr == (
        f"clipeval: error: runs differ in what must match ({c} has clip_model 'google/siglip-base-patch16-224', {a} has "
        "clip_model 'openai/clip-vit-large-patch14-336'); the scores of two scorers are never compared: --metric NAME "
        "compares a scorer both runs carry\n")
    d = make_run(tmp_path / "d", scores.assign(prompt=scores["prompt"] + " (reworded)"), library_sha256="def")
    result = cli("compare", a, d, "--allow-mismatch")
    assert result.exit_code == 2 and result.stderr == (
        f"clipeval: error: {d} and {a} share no image (same prompt_id, sample and prompt)\n")


@pytest.mark.slow
def test_run_summary_carries_the_interval_and_the_gate(run_tiny, tmp_path):
    out = tmp_path / "run"
    result = run_tiny(out, "--images-per-prompt", "2", "--fail-below", "0.99")
    assert result.exit_code == 1
    assert "gate failed: clip/mean" in result.stderr and "< --fail-below 0.99" in result.stderr
    summary = json.loads((out / "summary.json").read_text())  # every file written before the gate
    low, high = summary["clip/mean_ci"]
    assert low < summary["clip/mean"] < high
    assert "95% CI" in result.stdout and f"{low:.4f}" in result.stdout
    assert summary["ci"]["resamples"] == 10_000 and summary["ci"]["seed"] == 0
    assert summary["few_prompts"] is False  # 16 prompts
    assert all(group["few_prompts"] for group in summary["by_category"].values())  # 1-2 prompts each
    assert (out / "scores.csv").is_file() and json.loads((out / "manifest.json").read_text())["status"] == "complete"
    passed = run_tiny(out, "--images-per-prompt", "2", "--fail-below", "-1")
    assert passed.exit_code == 0


def test_how_many_prompts_a_difference_needs(cli, tmp_path):
    """Per-prompt paired deltas of ±0.02 around -0.001 (sd known in closed form): the minimum detectable
    difference is (z₀.₉₇₅ + z₀.₈) · sd / √n and the prompts needed for d are ⌈((z₀.₉₇₅ + z₀.₈) · sd / d)²⌉,
    in every format; a simulated paired t-test at that difference detects it about 80% of the time."""
    from scipy import stats as sps

    prompts = 100
    scores = base_scores(prompts=prompts, samples=1)
    deltas = np.where(np.arange(prompts) % 2 == 0, 0.02, -0.02) - 0.001
    a = make_run(tmp_path / "a", scores)
    b = make_run(tmp_path / "b", scores.assign(clip_score=(scores["clip_score"] + deltas).round(8)))
    data = json.loads(cli("compare", a, b, "--format", "json", "--resamples", "200").stdout)
    power = data["runs"][0]["overall"]["power"]
    realised = (pd.read_csv(b / "scores.csv")["clip_score"] - pd.read_csv(a / "scores.csv")["clip_score"]).to_numpy()
    sd = realised.std(ddof=1)
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    assert z == pytest.approx(2.8016, abs=1e-4)
    assert power["prompt_delta_sd"] == pytest.approx(sd, rel=1e-6)
    assert power["mde"] == pytest.approx(z * sd / math.sqrt(prompts), rel=1e-6)
    assert power["prompts_needed"] == {"0.005": math.ceil((z * sd / 0.005) ** 2), "0.01": math.ceil((z * sd / 0.01) ** 2)}
    assert power["prompts_needed"]["0.005"] == 127 and power["prompts_needed"]["0.01"] == 32  # 2.8016² · 16 · 100/99, then ÷ 4
    rng = np.random.default_rng(0)
    detected = np.mean([sps.ttest_1samp(rng.normal(power["mde"], sd, prompts), 0).pvalue < 0.05 for _ in range(2000)])
    assert 0.76 < detected < 0.84
    text = cli("compare", a, b, "--resamples", "200").stdout
    assert f"smallest detectable difference is ±{power['mde']:.4f}" in text and "0.005 needs 127 prompts" in text
    assert "> b: with 100 prompts" in cli("compare", a, b, "--format", "markdown", "--resamples", "200").stdout.replace(str(tmp_path) + "/", "")
    rows = list(csv.DictReader(io.StringIO(cli("compare", a, b, "--format", "csv", "--resamples", "200").stdout)))
    assert rows[0]["prompts_for_0.005"] == "127" and rows[0]["prompts_for_0.01"] == "32"


def test_prompts_needed_is_rounded_up_just_above_an_integer():
    """((z·sd/d)² = 50.1 needs 51 prompts: ceil, not round."""
    import math

    from scipy.stats import norm

    from clipeval.stats import power_analysis

    z = norm.ppf(0.975) + norm.ppf(0.8)
    n = 40
    sd = math.sqrt(50.1) * 0.005 / z
    a = sd * math.sqrt((n - 1) / n)  # ±a, n values: sample std (ddof 1) = sd
    power = power_analysis([a, -a] * (n // 2))
    assert power["prompts_needed"]["0.005"] == 51


def test_a_foreign_prompts_csv_alone_is_refused(tmp_path):
    from test_health import make_run

    from clipeval import store
    from clipeval.errors import ClipevalError

    run = make_run(tmp_path / "run", base_scores(prompts=6))
    other = make_run(tmp_path / "other", base_scores(prompts=6, seed=3))
    (run / "prompts.csv").write_bytes((other / "prompts.csv").read_bytes())
    with pytest.raises(ClipevalError, match="prompts.csv does not belong with manifest.json"):
        store.load_run(run)
