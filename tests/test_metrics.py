"""Scores by scorer on hand-made tables (no model): which column is whose, each scorer's
statistics, and ``--metric``'s view of a run, checked against values computed here from scratch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clipeval import metrics, stats
from clipeval.errors import ClipevalError
from clipeval.store import RunRecord


def frame(n_prompts: int = 12, samples: int = 2, seed: int = 0) -> pd.DataFrame:
    """CLIP cosines around 0.3 and VQA probabilities around 0.6, unrelated; one NaN image."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_prompts):
        for s in range(samples):
            rows.append({"prompt_id": p, "sample": s, "seed": p * 10 + s, "prompt": f"prompt {p}",
                         "category": "odd" if p % 2 else "even", "challenge": "", "clip_score": 0.3 + rng.normal(0, 0.02),
                         "truncated": p == 3, "image": "", "flag": "",
                         "score:vqa": float(rng.uniform(0.2, 0.95)), "truncated:vqa": p in (5, 7)})
    rows[3].update(flag="nan", clip_score=None, **{"score:vqa": None})
    return pd.DataFrame(rows)


COLUMNS = [metrics.ScoreColumn("clip-b32", "openai/clip-vit-base-patch32", "clip", True),
           metrics.ScoreColumn("vqa", "/models/vqa", "vqa", False)]
DEFINITIONS = [("cosine def", "cosine"), ("vqa def", "probability")]


def test_columns_are_named_by_label_and_the_primary_keeps_the_old_names():
    clip, vqa = COLUMNS
    assert (clip.column, clip.truncated, clip.prompt_mean) == ("clip_score", "truncated", "clip_mean")
    assert (vqa.column, vqa.truncated, vqa.prompt_mean) == ("score:vqa", "truncated:vqa", "mean:vqa")
    assert metrics.extra_columns(COLUMNS) == ["score:vqa", "truncated:vqa"]


def test_labels_are_short_names_ids_or_a_folders_name(tmp_path):
    folder = tmp_path / "my-vlm"
    folder.mkdir()
    assert metrics.label("clip-l336") == "clip-l336"
    assert metrics.label("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert metrics.label(str(folder) + "/") == "my-vlm" and metrics.label("demo") == "demo"
    cols = metrics.columns(["clip-b32", str(folder)], ["openai/clip-vit-base-patch32", str(folder)], ["clip", "vqa"])
    assert [(c.label, c.kind, c.primary) for c in cols] == [("clip-b32", "clip", True), ("my-vlm", "vqa", False)]
    other = tmp_path / "elsewhere" / "my-vlm"
    other.mkdir(parents=True)
    with pytest.raises(ClipevalError, match="two scorers are both called 'my-vlm'"):
        metrics.columns(["clip-b32", str(folder), str(other)], ["a", "b", "c"])


def test_each_scorer_has_its_own_statistics():
    scores = frame()
    summary = metrics.summarize(scores, COLUMNS, DEFINITIONS)
    good = scores[scores["flag"] == ""]
    assert summary["clip/mean"] == stats.rounded(good["clip_score"].mean())
    assert (summary["score"], summary["scale"]) == ("cosine def", "cosine")
    vqa = summary["scorers"]["vqa"]
    assert vqa["mean"] == stats.rounded(good["score:vqa"].mean()) and vqa["mean"] != summary["clip/mean"]
    assert vqa["median"] == stats.rounded(good["score:vqa"].median())
    assert vqa["std"] == stats.rounded(good["score:vqa"].std(ddof=1))
    assert (vqa["min"], vqa["max"]) == (stats.rounded(good["score:vqa"].min()), stats.rounded(good["score:vqa"].max()))
    assert (vqa["score"], vqa["scale"], vqa["kind"], vqa["model"]) == ("vqa def", "probability", "vqa", "/models/vqa")
    assert vqa["truncated_prompts"] == 2 and summary["truncated_prompts"] == 1  # prompts 5 and 7 for VQA, 3 for CLIP
    assert vqa["by_category"]["odd"]["mean"] == stats.rounded(good[good["category"] == "odd"]["score:vqa"].mean())
    # Its interval is that of a one-scorer summary of its column, computed apart.
    alone = stats.summarize(scores.assign(clip_score=scores["score:vqa"], truncated=scores["truncated:vqa"]))
    assert vqa["mean_ci"] == alone["clip/mean_ci"] and vqa["mean_ci"][0] < vqa["mean"] < vqa["mean_ci"][1]
    assert summary["scorers"]["clip-b32"]["mean"] == summary["clip/mean"]
    assert summary["scorers"]["clip-b32"]["mean_ci"] == summary["clip/mean_ci"]


def test_prompts_table_has_one_mean_per_other_scorer():
    scores = frame()
    table = metrics.prompts_table(scores, COLUMNS)
    good = scores[scores["flag"] == ""]
    expected = good.groupby("prompt_id")["score:vqa"].mean()
    assert list(table.columns)[-1] == "mean:vqa"
    assert table["mean:vqa"].tolist() == [stats.rounded(v) for v in expected]
    assert table["clip_mean"].tolist() == [stats.rounded(v) for v in good.groupby("prompt_id")["clip_score"].mean()]
    named = metrics.prompts_table(scores, COLUMNS, {p: f"name-{p}" for p in range(12)})
    assert list(named.columns)[:2] == ["prompt_id", "name"] and named["name"].iloc[3] == "name-3"
    assert named["mean:vqa"].tolist() == table["mean:vqa"].tolist()
    # A prompt with no usable image has no mean (and the others keep theirs).
    scores.loc[scores["prompt_id"] == 2, "flag"] = "black"
    table = metrics.prompts_table(scores, COLUMNS)
    assert table.loc[table["prompt_id"] == 2, "mean:vqa"].tolist() == [None]
    assert table.loc[table["prompt_id"] == 1, "mean:vqa"].tolist() == [stats.rounded(expected[1])]


def record(scores=None, settings=None):
    scores = frame() if scores is None else scores
    summary = metrics.summarize(scores, COLUMNS, DEFINITIONS)
    settings = settings or {"clip_model": "openai/clip-vit-base-patch32", "clip_dtype": "float16", "seed": 0,
                            "scorers": ["openai/clip-vit-base-patch32", "/models/vqa"]}
    return RunRecord(Path("/runs/a"), {"settings": settings}, summary, scores)


def test_select_is_the_view_of_one_scorer():
    run = record()
    assert metrics.select(run, None) is run
    for name in ("clip-b32", "openai/clip-vit-base-patch32"):
        assert metrics.select(run, name) is run  # the primary: the run as it is
    view = metrics.select(run, "vqa")
    assert view.scores["clip_score"].equals(run.scores["score:vqa"])
    assert view.scores["truncated"].equals(run.scores["truncated:vqa"])
    assert view.summary["clip/mean"] == run.summary["scorers"]["vqa"]["mean"]
    assert view.summary["clip/mean_ci"] == run.summary["scorers"]["vqa"]["mean_ci"]
    assert view.summary["scale"] == "probability" and view.summary["by_category"] == run.summary["scorers"]["vqa"]["by_category"]
    assert view.settings["clip_model"] == "/models/vqa" and view.settings["metric"] == "vqa"
    assert "clip_dtype" not in view.settings and view.settings["seed"] == 0
    assert run.scores["clip_score"].iloc[0] != view.scores["clip_score"].iloc[0]  # the run itself is unchanged
    assert metrics.select(run, "/models/vqa").summary == view.summary  # by model, too


def test_a_metric_is_found_by_label_model_or_short_name():
    blocks = record().summary["scorers"]
    assert metrics.find("vqa", blocks, "r") == "vqa"
    assert metrics.find("clip-b32", blocks, "r") == "clip-b32"
    assert metrics.find("openai/clip-vit-base-patch32", blocks, "r") == "clip-b32"
    old = {"openai/clip-vit-base-patch32": {"model": "openai/clip-vit-base-patch32", "column": "clip_score"}}
    assert metrics.find("clip-b32", old, "r") == "openai/clip-vit-base-patch32"  # a short name of its model
    with pytest.raises(ClipevalError) as err:
        metrics.find("clip-l336", blocks, "/runs/a")
    assert str(err.value) == ("/runs/a has no scorer 'clip-l336' (it has clip-b32, vqa): re-score it with "
                              "'clipeval score /runs/a --out NEW --scorer clip-l336'")
    with pytest.raises(ClipevalError, match="has no scorer 'vqa2' \\(it has clip-b32, vqa\\): did you mean vqa\\?$"):
        metrics.find("vqa2", blocks, "/runs/a")


def test_a_run_from_before_scorers_is_its_one_scorer():
    run = record()
    old = RunRecord(run.path, {"settings": {"clip_model": "/models/my-clip"}},
                    {k: v for k, v in run.summary.items() if k != "scorers"}, run.scores)
    assert metrics.names(old.summary, old.settings) == {"my-clip": {"model": "/models/my-clip", "column": "clip_score",
                                                                     "kind": "clip"}}
    assert metrics.select(old, "my-clip") is old
    with pytest.raises(ClipevalError, match="has no scorer 'vqa' \\(it has my-clip\\)"):
        metrics.select(old, "vqa")


def test_check_metric_before_a_run():
    metrics.check_metric(None, COLUMNS)
    metrics.check_metric("vqa", COLUMNS)
    with pytest.raises(ClipevalError, match="--metric: this run has no scorer 'pick'.*add it with --scorer pick"):
        metrics.check_metric("pick", COLUMNS)
    with pytest.raises(ClipevalError, match="--until-decided decides on the primary scorer \\(clip-b32\\)"):
        metrics.check_metric("vqa", COLUMNS, until_decided=True)
    metrics.check_metric("clip-b32", COLUMNS, until_decided=True)


def test_compare_through_one_scorer_and_never_across_two():
    from clipeval.compare import RunScores, compare

    a, b = record(frame(seed=0)), record(frame(seed=1))
    views = [metrics.select(r, "vqa") for r in (a, b)]
    result = compare([RunScores(str(r.path), r.path, r.settings, stats.usable(r.scores)) for r in views])
    good = [r.scores[r.scores["flag"] == ""] for r in (a, b)]
    expected = good[1]["score:vqa"].mean() - good[0]["score:vqa"].mean()
    assert math.isclose(result.runs[0].overall.delta, expected, abs_tol=1e-12)
    mixed = [metrics.select(a, "vqa"), b]
    with pytest.raises(ClipevalError, match="the scores of two scorers are never compared"):
        compare([RunScores(str(r.path), r.path, r.settings, stats.usable(r.scores)) for r in mixed])


def test_the_edges_of_naming_and_viewing(tmp_path):
    cols = metrics.columns(["clip-b32", "vqa"], ["openai/clip-vit-base-patch32", "/models/vqa"])  # kinds not known yet
    assert [(c.model, c.kind) for c in cols] == [("openai/clip-vit-base-patch32", "clip"), ("/models/vqa", "clip")]
    with pytest.raises(ClipevalError) as err:
        metrics.columns(["/a/x", "/b/x"], ["/a/x", "/b/x"])
    assert str(err.value) == "two scorers are both called 'x' (/a/x and /b/x): give one of them another folder name"
    assert metrics.names(None, {}) == {"clip": {"model": None, "column": "clip_score", "kind": "clip"}}
    metrics.check_metric("/models/vqa", COLUMNS)  # by its model, too
    with pytest.raises(ClipevalError) as err:
        metrics.check_metric("vqa", COLUMNS, until_decided=True)
    assert str(err.value) == ("--until-decided decides on the primary scorer (clip-b32); make vqa the primary one "
                              "(--clip-model, or the first --scorer) instead of --metric")
    run = record(settings={"clip_model": "openai/clip-vit-base-patch32", "clip_processor": "p", "clip_revision": "r",
                           "clip_dtype": "float16", "preprocess": "exact", "seed": 0})
    view = metrics.select(run, "vqa")
    assert not {"clip_processor", "clip_revision", "clip_dtype", "preprocess"} & set(view.settings)  # the primary's
    with pytest.raises(ClipevalError) as err:
        metrics.select(run, "pick")
    assert str(err.value).startswith("/runs/a has no scorer 'pick'")
    unsummarised = RunRecord(run.path, run.manifest, None, run.scores)  # a run whose images were all flagged
    assert metrics.select(unsummarised, "clip-b32") is unsummarised
