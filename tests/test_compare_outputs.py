"""Every number and line ``clipeval compare`` prints, in each format, against an independent
computation of the same comparison (numpy, scipy's Wilcoxon and bootstrap, the power formula),
on runs built so that each rule has something to separate: tied prompts, an image that does not
pair, groups of different sizes, a label with characters markdown must escape, a margin."""

from __future__ import annotations

import csv
import io
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from test_compare import make_run

PROMPTS, SAMPLES, RESAMPLES = 14, 2, 500

ODD = "food | drink \\ misc"  # a pipe and a backslash: both must be escaped in markdown


def _scores(shift: np.ndarray | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    rows = []
    for p in range(PROMPTS):
        level = 0.3 + 0.03 * rng.standard_normal()
        for s in range(SAMPLES):
            rows.append({"prompt_id": p, "sample": s, "seed": p * 4096 + s, "prompt": f"prompt {p}",
                         "category": "animals" if p % 2 == 0 else ODD,
                         "challenge": "Basic" if p < 5 else "",  # unlabelled prompts form no group
                         "clip_score": round(level + 0.01 * rng.standard_normal(), 8), "truncated": False,
                         "image": f"images/{p:05d}_{s:02d}.png"})
    return pd.DataFrame(rows)


# Per-prompt shifts of run B: two tied prompts (0 and 1), the rest a noisy drop of about 0.01.
SHIFTS = np.round(np.where(np.arange(PROMPTS) < 2, 0.0, -0.01 + 0.006 * np.sin(np.arange(PROMPTS) * 1.7)), 8)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    a = _scores()
    b = a.assign(clip_score=(a["clip_score"] + SHIFTS[a["prompt_id"]]).round(8))
    b = b[~((b["prompt_id"] == 13) & (b["sample"] == 1))]  # one image of B missing: 27 of 28 pair
    return make_run(root / "a", a), make_run(root / "b", b.reset_index(drop=True)), a, b


def _reference(a: pd.DataFrame, b: pd.DataFrame, margin: float) -> dict:
    """The comparison computed from scratch: per-prompt sums over paired images, scipy's
    statistics on them, and the groups sorted by how far they moved."""
    paired = a.merge(b[["prompt_id", "sample", "clip_score"]], on=["prompt_id", "sample"], suffixes=("_a", "_b"))

    def group(part: pd.DataFrame, kind: str, label: str) -> dict:
        per = part.groupby("prompt_id").agg(a=("clip_score_a", "sum"), b=("clip_score_b", "sum"),
                                            n=("clip_score_a", "size"))
        deltas = ((per["b"] - per["a"]) / per["n"]).to_numpy()

        def ci(sums):
            result = sps.bootstrap((sums, per["n"].to_numpy(float)), lambda s, c, axis=-1: s.sum(axis) / c.sum(axis),
                                   paired=True, vectorized=True, n_resamples=RESAMPLES, batch=1000, method="BCa",
                                   rng=np.random.default_rng(0)).confidence_interval
            return [float(result.low), float(result.high)]

        n = per["n"].sum()
        return {"kind": kind, "label": label, "prompts": len(per), "images": int(n),
                "baseline_mean": per["a"].sum() / n, "mean": per["b"].sum() / n,
                "mean_ci": ci(per["b"].to_numpy()), "delta": (per["b"] - per["a"]).sum() / n,
                "delta_ci": ci((per["b"] - per["a"]).to_numpy()),
                "p": None if len(per) < 2 else float(sps.wilcoxon(deltas).pvalue),
                "win": float(np.mean(deltas > 0)), "tie": float(np.mean(deltas == 0)), "few": len(per) < 10,
                "deltas": deltas}

    overall = group(paired, "overall", "all")
    groups = [group(part, kind, str(label)) for kind in ("category", "challenge")
              for label, part in paired[paired[kind] != ""].groupby(kind)]
    groups.sort(key=lambda g: (-abs(g["delta"]), g["kind"], g["label"]))
    sd = float(np.std(overall["deltas"], ddof=1))
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    overall["power"] = {"sd": sd, "mde": z * sd / math.sqrt(PROMPTS),
                        "needed": {d: max(2, math.ceil((z * sd / d) ** 2)) for d in (0.005, 0.01)}}
    base = a.groupby("prompt_id")["clip_score"].agg(["sum", "size"])
    result = sps.bootstrap((base["sum"].to_numpy(), base["size"].to_numpy(float)),
                           lambda s, c, axis=-1: s.sum(axis) / c.sum(axis), paired=True, vectorized=True,
                           n_resamples=RESAMPLES, batch=1000, method="BCa", rng=np.random.default_rng(0))
    return {"overall": overall, "groups": groups, "baseline_mean": a["clip_score"].mean(),
            "baseline_ci": [result.confidence_interval.low, result.confidence_interval.high],
            "worse": overall["delta_ci"][1] < -margin}


MARGIN = 0.002


@pytest.fixture(scope="module")
def reference(runs):
    return _reference(runs[2], runs[3], MARGIN)


def _compare(cli, runs, fmt: str, *extra):
    result = cli("compare", runs[0], runs[1], "--format", fmt, "--resamples", RESAMPLES, "--fail-if-worse",
                 "--margin", MARGIN, *extra)
    return result


def test_the_reference_data_separate_the_rules(reference):
    """The data must make each rule matter: ties, a worse verdict beyond the margin, groups that
    move by different amounts, a group with few prompts."""
    o = reference["overall"]
    assert 0 < o["tie"] < 1 and o["win"] < 0.5 and reference["worse"]
    assert len({round(abs(g["delta"]), 6) for g in reference["groups"]}) == len(reference["groups"]) == 3
    assert all(g["few"] for g in reference["groups"]) and not o["few"]


def test_json_carries_every_number_of_the_reference(cli, runs, reference):
    result = _compare(cli, runs, "json")
    assert result.exit_code == 1  # the gate: worse by more than the margin
    data = json.loads(result.stdout)
    assert data["baseline"] == str(runs[0]) and data["baseline_images"] == 28 and data["margin"] == MARGIN
    assert data["baseline_mean"] == pytest.approx(reference["baseline_mean"], abs=1e-12)
    assert data["baseline_ci"] == pytest.approx(reference["baseline_ci"], abs=1e-12)
    assert data["failed"] == [str(runs[1])] and data["mismatches"] == []
    run = data["runs"][0]
    assert (run["paired_images"], run["run_images"], run["baseline_images"], run["worse"]) == (27, 27, 28, True)
    for got, want in zip([run["overall"], *run["groups"]], [reference["overall"], *reference["groups"]]):
        assert (got["kind"], got["label"], got["prompts"], got["images"], got["few_prompts"]) == (
            want["kind"], want["label"], want["prompts"], want["images"], want["few"])
        for key in ("baseline_mean", "mean", "delta"):
            assert got[key] == pytest.approx(want[key], abs=1e-12), key
        assert got["mean_ci"] == pytest.approx(want["mean_ci"], abs=1e-12)
        assert got["delta_ci"] == pytest.approx(want["delta_ci"], abs=1e-12)
        assert got["p_value"] == pytest.approx(want["p"], abs=1e-12)
        assert (got["win_rate"], got["tie_rate"]) == (want["win"], want["tie"])
    assert len(run["groups"]) == len(reference["groups"])
    power, want = run["overall"]["power"], reference["overall"]["power"]
    assert power["prompt_delta_sd"] == pytest.approx(want["sd"], rel=1e-9)
    assert power["mde"] == pytest.approx(want["mde"], rel=1e-9)
    assert power["prompts_needed"] == {"0.005": want["needed"][0.005], "0.01": want["needed"][0.01]}
    assert all(g["power"] is None for g in run["groups"])


def _signed(x: float) -> str:
    return f"{x:+.4f}"


def test_text_is_the_reference_table_line_for_line(cli, runs, reference):
    o, a, b = reference["overall"], str(runs[0]), str(runs[1])
    rows = [["run", "images", "mean [95% CI]", "delta [95% CI]", "p (Wilcoxon)", "win rate", "verdict"],
            [f"{a} (baseline)", "28", f"{reference['baseline_mean']:.4f} [{reference['baseline_ci'][0]:.4f}, "
             f"{reference['baseline_ci'][1]:.4f}]", "", "", "", ""],
            [b, "27/27", f"{o['mean']:.4f} [{o['mean_ci'][0]:.4f}, {o['mean_ci'][1]:.4f}]",
             f"{_signed(o['delta'])} [{_signed(o['delta_ci'][0])}, {_signed(o['delta_ci'][1])}]",
             f"{o['p']:.3f}" if o["p"] >= 1e-3 else f"{o['p']:.2e}", f"{o['win']:.1%}", f"worse by > {MARGIN:g}"]]
    widths = [max(len(r[i]) for r in rows) for i in range(7)]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    power = o["power"]
    lines = [*table,
             f"{b}: with {PROMPTS} prompts the smallest detectable difference is ±{power['mde']:.4f} (two-sided α 0.05, "
             f"power 0.8, per-prompt delta sd {power['sd']:.4f}); 0.005 needs {power['needed'][0.005]} prompts, "
             f"0.01 needs {power['needed'][0.01]} prompts",
             f"{b}: 27 images paired of 27 (run) and 28 (baseline)",
             "", f"Groups that moved most, {b} vs {a}:"]
    group_rows = [["group", "name", "prompts", "delta [95% CI]", "p"]]
    for g in reference["groups"]:
        group_rows.append([g["kind"], g["label"] + " (few prompts)", str(g["prompts"]),
                           f"{_signed(g['delta'])} [{_signed(g['delta_ci'][0])}, {_signed(g['delta_ci'][1])}]",
                           f"{g['p']:.3f}" if g["p"] >= 1e-3 else f"{g['p']:.2e}"])
    widths = [max(len(r[i]) for r in group_rows) for i in range(5)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in group_rows]
    result = _compare(cli, runs, "text")
    assert result.exit_code == 1
    assert result.stdout == "\n".join(lines) + "\n"
    # --top limits the groups, most moved first
    top = _compare(cli, runs, "text", "--top", "1").stdout.splitlines()
    assert top[-2].startswith("group") and top[-1].startswith(reference["groups"][0]["kind"])


def test_markdown_is_the_same_table_escaped(cli, runs, reference):
    out = _compare(cli, runs, "markdown").stdout
    lines = out.splitlines()
    assert lines[0] == "| run | images | mean [95% CI] | delta [95% CI] | p (Wilcoxon) | win rate | verdict |"
    assert lines[1] == "|---|---|---|---|---|---|---|"
    assert lines[2].startswith(f"| {runs[0]} (baseline) | 28 | ") and lines[2].endswith(" |  |  |  |  |")
    assert lines[3].startswith(f"| {runs[1]} | 27/27 | ") and lines[3].endswith(f"| worse by > {MARGIN:g} |")
    assert lines[4].startswith(f"> {runs[1]}: with {PROMPTS} prompts the smallest detectable difference")
    assert lines[5] == f"> {runs[1]}: 27 images paired of 27 (run) and 28 (baseline)"
    assert lines[6:9] == ["", f"**Groups that moved most, {runs[1]} vs {runs[0]}:**", ""]
    assert lines[9] == "| group | name | prompts | delta [95% CI] | p |" and lines[10] == "|---|---|---|---|---|"
    odd = [line for line in lines[11:] if "food" in line]
    assert odd == [f"| category | food \\| drink \\\\ misc (few prompts) | 7 | "
                   + next(f"{_signed(g['delta'])} [{_signed(g['delta_ci'][0])}, {_signed(g['delta_ci'][1])}]"
                          for g in reference["groups"] if g["label"] == ODD) + " | "
                   + next(f"{g['p']:.3f}" for g in reference["groups"] if g["label"] == ODD) + " |"]
    assert len(lines) == 11 + len(reference["groups"])


def test_csv_rows_are_the_reference(cli, runs, reference):
    out = _compare(cli, runs, "csv").stdout
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["run", "baseline", "kind", "group", "prompts", "images", "baseline_mean", "mean", "mean_ci_low",
                       "mean_ci_high", "delta", "delta_ci_low", "delta_ci_high", "p_value", "win_rate", "tie_rate",
                       "few_prompts", "worse", "mde", "prompts_for_0.005", "prompts_for_0.01", "sequential_verdict",
                       "sequential_prompts"]
    assert len(rows) == 2 + len(reference["groups"])
    for row, want in zip(rows[1:], [reference["overall"], *reference["groups"]]):
        got = dict(zip(rows[0], row))
        assert (got["run"], got["baseline"], got["kind"], got["group"]) == (str(runs[1]), str(runs[0]), want["kind"],
                                                                          want["label"])
        assert (int(got["prompts"]), int(got["images"]), got["few_prompts"]) == (want["prompts"], want["images"],
                                                                                 str(want["few"]))
        numbers = [float(got[k]) for k in ("baseline_mean", "mean", "mean_ci_low", "mean_ci_high", "delta",
                                           "delta_ci_low", "delta_ci_high", "p_value", "win_rate", "tie_rate")]
        assert numbers == pytest.approx([want["baseline_mean"], want["mean"], *want["mean_ci"], want["delta"],
                                         *want["delta_ci"], want["p"], want["win"], want["tie"]], abs=1e-12)
        if want["kind"] == "overall":
            power = want["power"]
            assert got["worse"] == "True"
            assert float(got["mde"]) == pytest.approx(power["mde"], rel=1e-9)
            assert (got["prompts_for_0.005"], got["prompts_for_0.01"]) == (str(power["needed"][0.005]),
                                                                          str(power["needed"][0.01]))
        else:
            assert got["worse"] == got["mde"] == got["prompts_for_0.005"] == got["prompts_for_0.01"] == ""
        assert got["sequential_verdict"] == got["sequential_prompts"] == ""  # only with --sequential


def test_without_a_margin_the_verdict_and_exit_code_follow_the_interval(cli, runs, reference):
    """Without --fail-if-worse the exit code is 0 whatever the verdict; the verdict says 'worse'
    without a margin; a better run is 'better'."""
    result = cli("compare", runs[0], runs[1], "--resamples", RESAMPLES)
    assert result.exit_code == 0
    assert result.stdout.splitlines()[2].rstrip().endswith("worse")
    flipped = cli("compare", runs[1], runs[0], "--resamples", RESAMPLES)
    assert flipped.exit_code == 0 and flipped.stdout.splitlines()[2].rstrip().endswith("better")


def test_the_edges_of_a_comparison_read_as_such(cli, tmp_path):
    """One prompt: no interval, no p, 'too few prompts'; two prompts: a p-value; ten prompts: not few;
    a run against itself: 'no significant change' (an interval of [0, 0] is not better); a run folder
    with a non-ASCII name stays readable in JSON, indented."""
    from test_compare import base_scores

    one = base_scores(prompts=1)
    a, b = make_run(tmp_path / "a1", one), make_run(tmp_path / "café", one.assign(clip_score=one["clip_score"] + 0.01))
    text = cli("compare", a, b, "--resamples", "200").stdout.splitlines()
    assert text[1].rstrip().endswith("0.3" + text[1].rstrip().split("0.3", 1)[1]) and "[" not in text[1]  # no CI
    row = text[2].split()
    assert row[-3:] == ["too", "few", "prompts"] and "n/a" in row and "[" not in text[2]
    data = json.loads(raw := cli("compare", a, b, "--format", "json", "--resamples", "200").stdout)
    assert raw.startswith('{\n  "baseline": ') and "café" in raw  # indented, UTF-8 kept
    o = data["runs"][0]["overall"]
    assert o["p_value"] is None and o["delta_ci"] is None and o["few_prompts"] is True
    csv_row = list(csv.reader(io.StringIO(cli("compare", a, b, "--format", "csv", "--resamples", "200").stdout)))[1]
    assert csv_row[8:10] == ["", ""] and csv_row[11:14] == ["", "", ""]  # no mean CI, no delta CI, no p
    two = base_scores(prompts=2)
    shifted = two.assign(clip_score=two["clip_score"] + [0.01, 0.02, 0.03, 0.01])
    data = json.loads(cli("compare", make_run(tmp_path / "a2", two), make_run(tmp_path / "b2", shifted),
                          "--format", "json", "--resamples", "200").stdout)
    assert isinstance(data["runs"][0]["overall"]["p_value"], float)
    ten = base_scores(prompts=10)
    data = json.loads(cli("compare", make_run(tmp_path / "a10", ten), make_run(tmp_path / "b10", ten),
                          "--format", "json", "--resamples", "200").stdout)
    assert data["runs"][0]["overall"]["few_prompts"] is False
    same = cli("compare", tmp_path / "a10", tmp_path / "b10", "--resamples", "200").stdout.splitlines()
    assert same[2].rstrip().endswith("no significant change")


def test_allowed_mismatches_are_said_in_every_text_format(cli, tmp_path):
    from test_compare import base_scores

    scores = base_scores(prompts=12)
    a = make_run(tmp_path / "a", scores)
    b = make_run(tmp_path / "b", scores.assign(clip_score=scores["clip_score"] + 0.001), seed=3)
    text = cli("compare", a, b, "--allow-mismatch", "--resamples", "200").stdout
    line = f"mismatch (allowed): {b} has seed 3, {a} has seed 0"
    assert line in text.splitlines()
    assert f"> {line}" in cli("compare", a, b, "--allow-mismatch", "--format", "markdown", "--resamples", "200").stdout.splitlines()


def _same(got: dict, want: dict) -> bool:
    """Equal, the floats to 1e-12 (the deltas come back through scores.csv)."""
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, abs=1e-12), key
        elif isinstance(value, list):
            assert got[key] == pytest.approx(value, abs=1e-12), key
        else:
            assert got[key] == value, key
    return True


def test_sequential_says_when_the_seeded_order_would_have_decided(cli, tmp_path):
    """compare --sequential on two complete runs: the per-prompt deltas taken in the seeded order of
    the baseline's seed, the library the population; a stopped run's library counts in full."""
    import hashlib

    from clipeval import sequential, stats, store
    from clipeval.metrics import label
    from test_compare import SETTINGS, base_scores

    scores = base_scores(prompts=80, samples=1, seed=2)
    rng = np.random.default_rng(3)
    worse = scores.assign(clip_score=(scores["clip_score"] - 0.02 + 0.01 * rng.standard_normal(80)).round(8))
    a, b = make_run(tmp_path / "a", scores, seed=7), make_run(tmp_path / "b", worse, seed=7)
    data = json.loads(cli("compare", a, b, "--sequential", "--margin", "0.005", "--format", "json",
                          "--resamples", "200").stdout)
    order = sorted(range(80), key=lambda p: hashlib.sha256(f"clipeval-order:7:{p}".encode()).digest())
    deltas = (worse.set_index("prompt_id")["clip_score"] - scores.set_index("prompt_id")["clip_score"]).loc[order]
    want = sequential.summarize(list(deltas), 80, 0.005, baseline=str(a), scorer=label(SETTINGS["clip_model"]))
    assert _same(data["runs"][0]["sequential"], want) and want["verdict"] == "worse"
    text = cli("compare", a, b, "--sequential", "--margin", "0.005", "--resamples", "200").stdout.splitlines()
    low, high = want["mean_delta_ci"]
    assert f"{b}: sequential (betting, margin 0.005, α 0.05): worse after {want['prompts_used']} of 80 prompts of the " \
           f"seeded order ({want['prompts_used'] / 80:.0%}), sequence [{low:+.4f}, {high:+.4f}]" in text
    faster = json.loads(cli("compare", a, b, "--sequence", "asymptotic", "--margin", "0.005", "--format", "json",
                            "--resamples", "200").stdout)["runs"][0]["sequential"]
    assert faster["method"] == "asymptotic" and _same(faster, sequential.summarize(
        list(deltas), 80, 0.005, rule=sequential.Rule("asymptotic"), baseline=str(a), scorer=label(SETTINGS["clip_model"])))
    tight = json.loads(cli("compare", a, b, "--sequential", "--delta-bound", "0.1", "--margin", "0.005", "--format",
                           "json", "--resamples", "200").stdout)["runs"][0]["sequential"]
    assert tight["rule"]["delta_bound"] == 0.1 and _same(tight, sequential.summarize(
        list(deltas), 80, 0.005, rule=sequential.Rule(bound=0.1), baseline=str(a), scorer=label(SETTINGS["clip_model"])))
    rows = list(csv.DictReader(io.StringIO(cli("compare", a, b, "--sequential", "--margin", "0.005", "--format", "csv",
                                               "--resamples", "200").stdout)))
    assert (rows[0]["sequential_verdict"], rows[0]["sequential_prompts"]) == ("worse", str(want["prompts_used"]))
    # A run stopped early: its prompts are a prefix of the order, and the library it came from is the population.
    kept = set(order[:60])
    part = worse[worse["prompt_id"].isin(kept)].reset_index(drop=True).assign(flag="")
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    store.write_results(stopped, scores=part, prompts=stats.prompts_table(part), summary=None,
                        manifest={"status": "complete", "settings": {**SETTINGS, "seed": 7},
                                  "selection": {"prompts": 60, "library_prompts": 80}})
    q = json.loads(cli("compare", a, stopped, "--sequential", "--margin", "0.005", "--format", "json",
                       "--resamples", "200").stdout)["runs"][0]["sequential"]
    assert _same(q, sequential.summarize(list(deltas)[:60], 80, 0.005, baseline=str(a), scorer=label(SETTINGS["clip_model"])))
    # The default seed, 0, is a seed like any other: its own order, not another's.
    a0, b0 = make_run(tmp_path / "a0", scores, seed=0), make_run(tmp_path / "b0", worse, seed=0)
    order0 = sorted(range(80), key=lambda p: hashlib.sha256(f"clipeval-order:0:{p}".encode()).digest())
    deltas0 = list((worse.set_index("prompt_id")["clip_score"] - scores.set_index("prompt_id")["clip_score"]).loc[order0])
    q0 = json.loads(cli("compare", a0, b0, "--sequential", "--margin", "0.005", "--format", "json",
                        "--resamples", "200").stdout)["runs"][0]["sequential"]
    assert _same(q0, sequential.summarize(deltas0, 80, 0.005, baseline=str(a0), scorer=label(SETTINGS["clip_model"])))
    assert q0["mean_delta_ci"] != want["mean_delta_ci"]  # another order, another sequence
    same = scores.assign(clip_score=(scores["clip_score"] + 0.01 * rng.standard_normal(80)).round(8))
    c = make_run(tmp_path / "c", same, seed=7)
    lines = cli("compare", a, c, "--sequential", "--margin", "0", "--resamples", "200").stdout.splitlines()
    assert f"{c}: sequential (betting, margin 0, α 0.05): undecided after all 80 prompts of the seeded order; " \
           "the fixed-size answer above stands" in lines
    # A prompt with no usable pair: compare leaves it out, and so does the sequence (one target mean).
    flagged = same.assign(flag=np.where(same["prompt_id"] == order[3], "nan", ""))
    f = make_run(tmp_path / "f", flagged, seed=7)
    run = json.loads(cli("compare", a, f, "--sequential", "--margin", "0", "--format", "json",
                         "--resamples", "200").stdout)["runs"][0]
    gapped = list((same.set_index("prompt_id")["clip_score"] - scores.set_index("prompt_id")["clip_score"]).loc[order])
    gapped[3] = None
    q = run["sequential"]
    assert _same(q, sequential.summarize(gapped, 80, 0, baseline=str(a), scorer=label(SETTINGS["clip_model"]))) and q["unpaired_prompts"] == 1
    assert q["prompts_used"] == 80 and q["mean_delta"] == pytest.approx(run["overall"]["delta"], abs=1e-12)


def test_a_clear_gain_prints_signed_numbers_a_tiny_p_and_plain_labels(cli, tmp_path):
    """A run better everywhere: deltas and both interval ends carry a '+', a p below 1e-3 is written
    in scientific notation, a group of 35 prompts is not marked 'few', all images pair (no pairing
    line), and in markdown every note is a quote; numbers are taken from compare's own JSON."""
    from test_compare import base_scores

    scores = base_scores(prompts=40, samples=1, seed=4)
    scores["category"] = np.where(scores["prompt_id"] < 35, "big", "small")
    scores["challenge"] = ""
    rng = np.random.default_rng(6)
    better = scores.assign(clip_score=(scores["clip_score"] + 0.02 + 0.002 * rng.standard_normal(40)).round(8))
    a, b = make_run(tmp_path / "a", scores, seed=7), make_run(tmp_path / "b", better, seed=7)
    data = json.loads(cli("compare", a, b, "--format", "json", "--resamples", "200").stdout)
    run = data["runs"][0]
    o, groups = run["overall"], run["groups"]
    assert o["delta_ci"][0] > 0 and o["p_value"] < 1e-3 and [g["label"] for g in groups] == ["big", "small"]

    def signed(x):
        return f"+{x:.4f}"

    text = cli("compare", a, b, "--resamples", "200").stdout.splitlines()
    def cells_of(line):
        return re.split(r"\s{2,}", line.strip())

    cells = cells_of(text[2])
    assert cells[0] == str(b)
    assert cells[1:] == ["40", f"{o['mean']:.4f} [{o['mean_ci'][0]:.4f}, {o['mean_ci'][1]:.4f}]",
                         f"{signed(o['delta'])} [{signed(o['delta_ci'][0])}, {signed(o['delta_ci'][1])}]",
                         f"{o['p_value']:.2e}", "100.0%", "better"]
    assert not any("images paired" in line for line in text)
    big = cells_of(text[-2])
    g = groups[0]
    assert big == ["category", "big", "35", f"{signed(g['delta'])} [{signed(g['delta_ci'][0])}, {signed(g['delta_ci'][1])}]",
                   f"{g['p_value']:.2e}"]
    assert cells_of(text[-1])[1] == "small (few prompts)"
    markdown = cli("compare", a, b, "--sequential", "--margin", "0.005", "--format", "markdown",
                   "--resamples", "200").stdout.splitlines()
    notes = [line for line in markdown if line and not line.startswith("|") and not line.startswith("**")]
    assert len(notes) == 2 and all(line.startswith(f"> {b}: ") for line in notes)  # power and sequential
    assert any("sequential (betting" in line for line in notes)
    assert f"| category | big | 35 | {signed(g['delta'])} [{signed(g['delta_ci'][0])}, {signed(g['delta_ci'][1])}] | " \
           f"{g['p_value']:.2e} |" in markdown
    csv_bytes = cli("compare", a, b, "--format", "csv", "--resamples", "200").stdout_bytes  # .stdout folds \r\n
    assert b"\r" not in csv_bytes and csv_bytes.endswith(b"\n")


def test_identical_runs_are_all_tied(cli, tmp_path):
    from test_compare import base_scores

    scores = base_scores(prompts=12, samples=1)
    a, b = make_run(tmp_path / "a", scores), make_run(tmp_path / "b", scores)
    row = re.split(r"\s{2,}", cli("compare", a, b, "--resamples", "200").stdout.splitlines()[2].strip())
    assert row[3] == "+0.0000 [+0.0000, +0.0000]" and row[5] == "n/a (all tied)"


def test_a_run_stopped_by_until_decided_says_what_it_decided(cli, tmp_path):
    """The line compare prints for a run folder --until-decided stopped, decided and undecided, in
    text and as a markdown quote."""
    from clipeval import stats, store
    from test_compare import SETTINGS, base_scores

    scores = base_scores(prompts=20, samples=1).assign(flag="")
    a = make_run(tmp_path / "a", scores, seed=7)
    for name, q in (("decided", {"decided": True, "verdict": "worse", "margin": 0.005, "prompts_used": 12}),
                    ("undecided", {"decided": False, "verdict": "undecided", "margin": 0.005, "prompts_used": 20})):
        folder = tmp_path / name
        folder.mkdir()
        summary = stats.summarize(scores)
        summary["sequential"] = {**q, "library_prompts": 50, "baseline": "runs/base", "prompts_seen": 20}
        store.write_results(folder, scores=scores, prompts=stats.prompts_table(scores), summary=summary,
                            manifest={"status": "complete", "settings": {**SETTINGS, "seed": 7},
                                      "selection": {"prompts": 20, "library_prompts": 50}})
    text = cli("compare", a, tmp_path / "decided", tmp_path / "undecided", "--resamples", "200").stdout.splitlines()
    assert (f"{tmp_path / 'decided'} is a run stopped by --until-decided: worse (margin 0.005) after 12 of 50 prompts "
            "against runs/base; the figures here cover the prompts it shares, of the 20 it generated") in text
    assert (f"{tmp_path / 'undecided'} is a run stopped by --until-decided: undecided after 20 of 50 prompts against "
            "runs/base; the figures here cover the prompts it shares, of the 20 it generated") in text
    markdown = cli("compare", a, tmp_path / "decided", "--format", "markdown", "--resamples", "200").stdout.splitlines()
    assert any(line.startswith(f"> {tmp_path / 'decided'} is a run stopped by --until-decided: worse") for line in markdown)


def test_a_one_prompt_group_shows_its_delta_alone_and_the_library_lists_five_groups(tmp_path):
    """Six categories and one of a single prompt (it moved most): its row has no interval to show, and
    render() called from Python lists the five groups that moved most, as compare's --top default does."""
    from clipeval import compare as comparing
    from clipeval.stats import Bootstrap
    from test_compare import base_scores

    a = base_scores(prompts=13).assign(challenge="")
    a["category"] = [f"c{p % 6}" if p < 12 else "single" for p in a["prompt_id"]]
    shift = np.where(a["prompt_id"] == 12, 0.05, 0.001 * (a["prompt_id"] % 6 + 1))
    b = a.assign(clip_score=(a["clip_score"] + shift).round(8))
    runs = [comparing.load_run(make_run(tmp_path / name, s)) for name, s in (("a", a), ("b", b))]
    text = comparing.render(comparing.compare(runs, boot=Bootstrap(resamples=200)), "text")
    groups = text.split("Groups that moved most")[1].splitlines()[2:]
    assert [row.split()[1] for row in groups] == ["single", "c5", "c4", "c3", "c2"]
    assert groups[0].split() == ["category", "single", "(few", "prompts)", "1", "+0.0500", "n/a"]  # no interval
    assert "[" in groups[1]  # two prompts or more: an interval


def test_compare_metric_compares_the_named_scorer(cli, tmp_path):
    """Two runs scored by CLIP and a VQA scorer, B 0.02 above A by CLIP and 0.03 below by VQA:
    --metric vqa compares VQA's columns, and without it the primary scorer's."""
    from test_compare import base_scores
    from test_sweep_plan import _two_scorer_run

    scores = base_scores(prompts=12)
    for name, clip, vqa in (("a", 0.0, 0.0), ("b", 0.02, -0.03)):
        _two_scorer_run(tmp_path / name, scores, clip, vqa, f"/models/{name}")
    for extra, delta in (((), 0.02), (("--metric", "vqa"), -0.03)):
        data = json.loads(cli("compare", tmp_path / "a", tmp_path / "b", "--format", "json", "--resamples", "200",
                              *extra).stdout)
        assert data["runs"][0]["overall"]["delta"] == pytest.approx(delta, abs=1e-9)
