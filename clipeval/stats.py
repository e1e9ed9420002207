"""Tables, summaries and the statistics behind them: the one place where numbers are aggregated.

``clip/std`` is the sample standard deviation (ddof=1) over images, stated as such in the
summary. Groups (category, challenge) report the mean, sample std and number of images and
prompts behind each mean.

Confidence intervals resample prompts, not images: prompts are what was sampled from the space
of things people ask for, and the K images of one prompt are not independent evidence. The
bootstrap is scipy's (BCa by default), seeded, so the same scores give the same interval.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

CONFIDENCE = 0.95
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
FEW_PROMPTS = 10  # a mean over fewer prompts is flagged: its interval says little

SCORE_DEFINITION = (
    "cosine similarity of the L2-normalised CLIP image and text embeddings, computed in float32, "
    "in [-1, 1]; not multiplied by 100 and not clamped (torchmetrics' CLIPScore reports "
    "max(100 * mean, 0))"
)
SCORE_COLUMNS = ["prompt_id", "sample", "seed", "prompt", "category", "challenge", "clip_score", "truncated", "image", "flag"]
FLAGS = {
    "nan": "non-finite pixels (e.g. a float16 overflow in the VAE); no score",
    "nsfw": "blanked by the pipeline's safety checker",
    "black": "every pixel is 0",
}
PROMPT_COLUMNS = ["prompt_id", "prompt", "category", "challenge", "n", "clip_mean", "clip_min", "clip_max"]


def rounded(value: Any) -> float | None:
    """Aggregates of float32 scores, to 10 significant digits (float64 sums add only noise
    beyond that); JSON has no NaN, so an undefined statistic (std of one value) is null."""
    value = float(value)
    return None if math.isnan(value) else float(f"{value:.10g}")


def score_value(x: float) -> float:
    """Scores are float32: keep the shortest decimal that identifies the float32, everywhere."""
    import numpy as np

    return float(str(np.float32(x)))


def scores_table(rows: list[dict[str, Any]], extra: list[str] = ()):
    """``extra``: the columns of a run's other scorers (``clipeval.metrics``), after the others."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=SCORE_COLUMNS + list(extra))
    frame["flag"] = _flag_text(frame["flag"])
    return frame.sort_values(["prompt_id", "sample"], kind="stable").reset_index(drop=True)


def usable(scores):
    """Rows that count: not flagged, with a score. Flagged images stay in scores.csv for the record."""
    keep = scores["clip_score"].notna()
    if "flag" in scores.columns:
        keep &= _flag_text(scores["flag"]) == ""
    return scores[keep]


def _flag_text(flags):
    """Flags as text, a missing one (an older journal's row, a caller's None or NaN) as "" (clean).
    object first: a column every row lacks is float NaN, which pandas will not fill with text."""
    return flags.astype(object).fillna("")


def usable_row(row: dict[str, Any]) -> bool:
    """``usable`` for one journal row."""
    score = row.get("clip_score")
    return score is not None and score == score and not row.get("flag")


def prompts_table(scores, names: dict[int, str] | None = None):
    """One row per prompt, over its usable images (n = 0 and empty means when none is usable).
    ``names`` (a {name: prompt} library's keys) adds a ``name`` column after prompt_id."""
    good = usable(scores)
    first = scores.groupby("prompt_id", sort=True)[["prompt", "category", "challenge"]].first()
    stats = good.groupby("prompt_id", sort=True)["clip_score"].agg(["size", "mean", "min", "max"])
    frame = first.join(stats, how="left").reset_index()
    frame["n"] = frame["size"].fillna(0).astype(int)
    for column in ("mean", "min", "max"):
        frame[f"clip_{column}"] = frame[column].map(lambda v: None if v != v else rounded(v))
    if names and any(names.values()):
        frame["name"] = frame["prompt_id"].map(names).fillna("")
        return frame[[PROMPT_COLUMNS[0], "name", *PROMPT_COLUMNS[1:]]]
    return frame[PROMPT_COLUMNS]


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are computed; recorded next to every interval it produced."""

    confidence: float = CONFIDENCE
    resamples: int = RESAMPLES
    seed: int = BOOTSTRAP_SEED

    def describe(self) -> dict[str, Any]:
        return {
            "level": self.confidence,
            "method": "BCa bootstrap over prompts (scipy.stats.bootstrap; percentile where BCa is undefined)",
            "resamples": self.resamples,
            "seed": self.seed,
        }


def weighted_mean_ci(sums, counts, boot: Bootstrap = Bootstrap()) -> tuple[float, float] | None:
    """CI of ``sum(sums) / sum(counts)`` resampling prompts (one entry each): the mean over images
    when prompts have ``counts`` images with score sums ``sums``. None below two prompts."""
    import numpy as np
    from scipy import stats as sps

    sums, counts = np.asarray(sums, float), np.asarray(counts, float)
    if len(sums) < 2:
        return None
    means = sums / counts
    if np.ptp(means) <= 1e-12:  # no spread (beyond float rounding): the interval is the point
        value = float(sums.sum() / counts.sum())
        return value, value

    def ratio(s, c, axis=-1):
        return s.sum(axis=axis) / c.sum(axis=axis)

    def interval(method: str) -> tuple[float, float]:
        result = sps.bootstrap(
            (sums, counts),
            ratio,
            paired=True,
            vectorized=True,
            n_resamples=boot.resamples,
            confidence_level=boot.confidence,
            batch=1000,
            method=method,
            rng=np.random.default_rng(boot.seed),
        )
        return result.confidence_interval

    with warnings.catch_warnings():
        # BCa is undefined when the estimate lies beyond every resample (a few prompts, few
        # resamples): scipy then returns NaN with a DegenerateDataWarning (a RuntimeWarning) and
        # the percentile interval of the same resamples stands in.
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = interval("BCa")
    if math.isnan(low) or math.isnan(high):
        low, high = interval("percentile")
    return float(low), float(high)


def prompt_sums(scores):
    """Per prompt: the sum and number of its image scores (the bootstrap's unit)."""
    grouped = scores.groupby("prompt_id", sort=True)["clip_score"]
    return grouped.sum(), grouped.size()


def _ci(scores, boot: Bootstrap) -> list[float] | None:
    sums, counts = prompt_sums(scores)
    ci = weighted_mean_ci(sums.to_numpy(), counts.to_numpy(), boot)
    return None if ci is None else [rounded(ci[0]), rounded(ci[1])]


def _group(scores, column: str, boot: Bootstrap) -> dict[str, dict[str, Any]]:
    labelled = scores[scores[column] != ""]
    out = {}
    for label, part in labelled.groupby(column, sort=True):
        prompts = int(part["prompt_id"].nunique())
        out[str(label)] = {
            "mean": rounded(part["clip_score"].mean()),
            "ci": _ci(part, boot),
            "std": rounded(part["clip_score"].std(ddof=1)),
            "n": int(len(part)),
            "prompts": prompts,
            "few_prompts": prompts < FEW_PROMPTS,
        }
    return out


def summarize(scores, boot: Bootstrap = Bootstrap(), *, definition: str = SCORE_DEFINITION,
              scale: str = "cosine") -> dict[str, Any]:
    good = usable(scores)
    flagged = scores.loc[~scores.index.isin(good.index), "flag"] if "flag" in scores.columns else scores.iloc[:0]
    if good.empty:
        from clipeval.errors import ClipevalError

        counts = ", ".join(f"{flag}: {n}" for flag, n in _counts(flagged).items())
        raise ClipevalError(f"no usable image: all {len(scores)} are flagged ({counts}); see scores.csv")
    values = good["clip_score"]
    prompts = int(good["prompt_id"].nunique())
    return {
        "score": definition,
        "scale": scale,
        "clip/mean": rounded(values.mean()),
        "clip/mean_ci": _ci(good, boot),
        "clip/min": rounded(values.min()),
        "clip/max": rounded(values.max()),
        "clip/std": rounded(values.std(ddof=1)),
        "clip/median": rounded(values.median()),
        "std_kind": "sample standard deviation over images (ddof=1)",
        "ci": boot.describe(),
        "images": int(len(good)),
        "prompts": prompts,
        "flagged_images": _counts(flagged),
        "flags": FLAGS,
        "few_prompts": prompts < FEW_PROMPTS,
        "few_prompts_threshold": FEW_PROMPTS,
        "truncated_prompts": int(good.loc[good["truncated"].astype(bool), "prompt_id"].nunique()),
        "by_category": _group(good, "category", boot),
        "by_challenge": _group(good, "challenge", boot),
    }


def _counts(flags) -> dict[str, int]:
    return {str(k): int(v) for k, v in _flag_text(flags).replace("", "unscored").value_counts().sort_index().items()}


# -- how many prompts a difference needs ------------------------------------------------------------
ALPHA = 0.05  # two-sided
POWER = 0.8
DIFFERENCES = (0.005, 0.01)


def power_analysis(prompt_deltas) -> dict[str, Any] | None:
    """The smallest paired difference detectable with these prompts, and the prompts needed for
    DIFFERENCES, from the spread of the per-prompt paired deltas (normal approximation of a paired
    test: n = ((z₁₋α/₂ + z_power) · sd / d)²). None below two prompts."""
    import numpy as np
    from scipy.stats import norm

    deltas = np.asarray(prompt_deltas, float)
    if len(deltas) < 2:
        return None
    sd = float(deltas.std(ddof=1))
    z = float(norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER))
    return {
        "alpha": ALPHA,
        "power": POWER,
        "prompts": len(deltas),
        "prompt_delta_sd": rounded(sd),
        "mde": rounded(z * sd / math.sqrt(len(deltas))),
        "prompts_needed": {f"{d:g}": max(2, math.ceil((z * sd / d) ** 2)) for d in DIFFERENCES},
    }
