"""Tables and summaries from per-image scores: the one place where numbers are aggregated.

``clip/std`` is the sample standard deviation (ddof=1) over images, stated as such in the
summary. Groups (category, challenge) report the mean, sample std and number of images and
prompts behind each mean.
"""

from __future__ import annotations

import math
from typing import Any

SCORE_DEFINITION = (
    "cosine similarity of the L2-normalised CLIP image and text embeddings, computed in float32, "
    "in [-1, 1]; not multiplied by 100 and not clamped (torchmetrics' CLIPScore reports "
    "max(100 * mean, 0))"
)
SCORE_COLUMNS = ["prompt_id", "sample", "seed", "prompt", "category", "challenge", "clip_score", "truncated", "image"]
PROMPT_COLUMNS = ["prompt_id", "prompt", "category", "challenge", "n", "clip_mean", "clip_min", "clip_max"]


def _num(value: Any) -> float | None:
    """Aggregates of float32 scores, to 10 significant digits (float64 sums add only noise
    beyond that); JSON has no NaN, so an undefined statistic (std of one value) is null."""
    value = float(value)
    return None if math.isnan(value) else float(f"{value:.10g}")


def scores_table(rows: list[dict[str, Any]]):
    import pandas as pd

    frame = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    return frame.sort_values(["prompt_id", "sample"], kind="stable").reset_index(drop=True)


def prompts_table(scores):
    grouped = scores.groupby("prompt_id", sort=True)
    frame = grouped.agg(
        prompt=("prompt", "first"),
        category=("category", "first"),
        challenge=("challenge", "first"),
        n=("clip_score", "size"),
        clip_mean=("clip_score", "mean"),
        clip_min=("clip_score", "min"),
        clip_max=("clip_score", "max"),
    ).reset_index()
    for column in ("clip_mean", "clip_min", "clip_max"):
        frame[column] = frame[column].map(_num)
    return frame[PROMPT_COLUMNS]


def _group(scores, column: str) -> dict[str, dict[str, Any]]:
    labelled = scores[scores[column] != ""]
    out = {}
    for label, part in labelled.groupby(column, sort=True):
        out[str(label)] = {
            "mean": _num(part["clip_score"].mean()),
            "std": _num(part["clip_score"].std(ddof=1)),
            "n": int(len(part)),
            "prompts": int(part["prompt_id"].nunique()),
        }
    return out


def summarize(scores) -> dict[str, Any]:
    values = scores["clip_score"]
    return {
        "score": SCORE_DEFINITION,
        "scale": "cosine",
        "clip/mean": _num(values.mean()),
        "clip/min": _num(values.min()),
        "clip/max": _num(values.max()),
        "clip/std": _num(values.std(ddof=1)),
        "clip/median": _num(values.median()),
        "std_kind": "sample standard deviation over images (ddof=1)",
        "images": int(len(scores)),
        "prompts": int(scores["prompt_id"].nunique()),
        "truncated_prompts": int(scores.loc[scores["truncated"].astype(bool), "prompt_id"].nunique()),
        "by_category": _group(scores, "category"),
        "by_challenge": _group(scores, "challenge"),
    }
