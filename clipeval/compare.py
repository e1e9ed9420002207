"""Is run B really better than run A, or is it noise?

Runs are paired image by image on (prompt_id, sample) with the same prompt text, which with the
same base seed means the same starting noise: what differs is the checkpoint. The unit of the
statistics is the prompt (per-prompt means over the paired images):

- delta: mean of B minus mean of A over the paired images, with a paired bootstrap CI that
  resamples prompts;
- p: Wilcoxon signed-rank test of the per-prompt deltas (two-sided; 1 when all are zero);
- win rate: share of prompts whose mean rose (ties reported apart);
- the same per category and per challenge, with the groups that moved most first.

A run is "worse by more than M" when the whole CI of its delta lies below -M.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clipeval.errors import ClipevalError
from clipeval.stats import Bootstrap, weighted_mean_ci

FORMATS = ("text", "markdown", "csv", "json")
# Settings two runs must share to be compared without --allow-mismatch.
MUST_MATCH = ("library_sha256", "seed", "clip_model")


@dataclass
class RunScores:
    name: str
    path: Path
    settings: dict[str, Any]
    scores: Any  # DataFrame, the run's scores.csv
    library_prompts: int | None = None  # a run --until-decided stopped: the prompts of its whole library
    decided: dict[str, Any] | None = None  # its summary's "sequential": what it decided, against which run
    prompt_ids: frozenset[int] = frozenset()  # every prompt the run holds an image of, usable or not
    scorer: str = ""  # the label of the scorer compared
    kind: str = "clip"  # its kind ("clip" or "vqa")


def load_run(path: str | Path, metric: str | None = None) -> RunScores:
    """``metric``: the scorer compared (``clipeval.metrics``); None, the run's primary one."""
    from clipeval.metrics import PRIMARY, names, select
    from clipeval.stats import usable
    from clipeval.store import load_run as load

    whole = load(path)
    blocks = names(whole.summary, whole.settings)
    record = select(whole, metric)
    library = (record.manifest.get("selection") or {}).get("library_prompts")
    decided = (record.summary or {}).get("sequential")
    label = record.settings.get("metric") or next(n for n, b in blocks.items() if b["column"] == PRIMARY)
    held = frozenset(int(p) for p in record.scores["prompt_id"].unique())
    return RunScores(str(path), record.path, record.settings, usable(record.scores), library, decided,  # flagged images never pair
                     held, label, blocks[label].get("kind", "clip"))


@dataclass
class GroupDelta:
    kind: str  # "overall", "category" or "challenge"
    label: str
    prompts: int
    images: int
    baseline_mean: float
    mean: float
    mean_ci: tuple[float, float] | None
    delta: float
    delta_ci: tuple[float, float] | None
    p_value: float | None
    win_rate: float
    tie_rate: float
    few_prompts: bool
    power: dict[str, Any] | None = None  # minimum detectable difference, prompts needed (overall only)


@dataclass
class RunComparison:
    name: str
    paired_images: int
    run_images: int
    baseline_images: int
    overall: GroupDelta
    groups: list[GroupDelta] = field(default_factory=list)
    worse: bool = False
    sequential: dict[str, Any] | None = None  # compare --sequential: when the seeded order would have decided


@dataclass
class Comparison:
    baseline: str
    baseline_mean: float
    baseline_ci: tuple[float, float] | None
    baseline_images: int
    margin: float
    bootstrap: dict[str, Any]
    mismatches: list[str]
    runs: list[RunComparison]
    stopped: list[str] = field(default_factory=list)  # runs --until-decided stopped early: what each decided

    @property
    def failed(self) -> list[RunComparison]:
        return [r for r in self.runs if r.worse]


def compare(
    runs: list[RunScores],
    *,
    baseline: int = 0,
    allow_mismatch: bool = False,
    margin: float = 0.0,
    boot: Bootstrap = Bootstrap(),
    sequence: str | None = None,
    delta_bound: float | None = None,
    way_out: str = "--allow-mismatch compares the prompts they share",
) -> Comparison:
    """``way_out``: what the mismatch error offers (sweep has no --allow-mismatch)."""
    if len(runs) < 2:
        raise ClipevalError("compare needs at least two runs")
    base = runs[baseline]
    others = [r for i, r in enumerate(runs) if i != baseline]
    mismatches = []
    from clipeval.store import canonical

    for run in others:
        for key in MUST_MATCH:
            if canonical(base.settings.get(key)) != canonical(run.settings.get(key)):  # one folder, however spelled
                mismatches.append(f"{run.name} has {key} {run.settings.get(key)!r}, {base.name} has {key} {base.settings.get(key)!r}")
    if mismatches and not allow_mismatch:
        raise ClipevalError(
            f"runs differ in what must match ({'; '.join(mismatches)}); "
            + ("the scores of two scorers are never compared: --metric NAME compares a scorer both runs carry"
               if any(" has clip_model " in m for m in mismatches) else way_out)
        )
    base_sums = _prompt_means(base.scores)
    results = [_compare_one(base, run, margin, boot) for run in others]
    stopped = [f"{r.name} is a run stopped by --until-decided: {_decided(r.decided)}" for r in runs if r.decided]
    if sequence is not None:
        for run, result in zip(others, results):
            result.sequential = sequential_result(base, run, margin, sequence, delta_bound)
    return Comparison(
        baseline=base.name,
        baseline_mean=float(base.scores["clip_score"].mean()),
        baseline_ci=weighted_mean_ci(base_sums["sum"], base_sums["n"], boot),
        baseline_images=len(base.scores),
        margin=margin,
        bootstrap=boot.describe(),
        mismatches=mismatches,
        runs=results,
        stopped=stopped,
    )


def _prompt_means(scores):
    grouped = scores.groupby("prompt_id", sort=True)["clip_score"]
    return grouped.agg(sum="sum", n="size")


def sequential_result(base: RunScores, run: RunScores, margin: float, method: str,
                      delta_bound: float | None = None) -> dict[str, Any]:
    """After how many prompts of the seeded order (the one ``run --until-decided`` follows) the
    sequence would have decided. Its prompts are those both runs hold, in that order; one without a
    usable pair is skipped, as ``compare`` leaves it out (one target: the mean over paired prompts).
    The library is the population: the whole library where a run was stopped early (its prefix is
    the start of the order), else the prompts both hold."""
    from clipeval import sequential

    keys = ["prompt_id", "sample", "prompt"]
    paired = base.scores[keys + ["clip_score"]].merge(run.scores[keys + ["clip_score"]], on=keys, suffixes=("_a", "_b"))
    per_prompt = paired.groupby("prompt_id", sort=True)[["clip_score_a", "clip_score_b"]].mean()
    deltas = {int(p): float(d) for p, d in zip(per_prompt.index, per_prompt["clip_score_b"] - per_prompt["clip_score_a"])}
    held = sorted((base.prompt_ids & run.prompt_ids) | set(deltas))
    population = max([len(held)] + [r.library_prompts for r in (base, run) if r.library_prompts])
    ordered = [deltas.get(p) for p in sequential.order(held, int(base.settings.get("seed") or 0))]
    rule = sequential.rule(method, kind=run.kind, bound=delta_bound)
    return sequential.summarize(ordered, population, margin, rule=rule, baseline=base.name, scorer=run.scorer)


def _compare_one(base: RunScores, run: RunScores, margin: float, boot: Bootstrap) -> RunComparison:
    keys = ["prompt_id", "sample", "prompt"]
    paired = base.scores[keys + ["category", "challenge", "clip_score"]].merge(
        run.scores[keys + ["clip_score"]], on=keys, suffixes=("_a", "_b"), validate="one_to_one"
    )
    if paired.empty:
        raise ClipevalError(f"{run.name} and {base.name} share no image (same prompt_id, sample and prompt)")
    overall = _delta(paired, "overall", "all", boot, with_power=True)
    groups = []
    for kind in ("category", "challenge"):
        labelled = paired[paired[kind] != ""]
        for label, part in labelled.groupby(kind, sort=True):
            groups.append(_delta(part, kind, str(label), boot))
    groups.sort(key=lambda g: (-abs(g.delta), g.kind, g.label))
    return RunComparison(
        name=run.name,
        paired_images=len(paired),
        run_images=len(run.scores),
        baseline_images=len(base.scores),
        overall=overall,
        groups=groups,
        worse=overall.delta_ci is not None and overall.delta_ci[1] < -margin,
    )


def _delta(paired, kind: str, label: str, boot: Bootstrap, with_power: bool = False) -> GroupDelta:
    import numpy as np
    from scipy import stats as sps

    from clipeval.stats import FEW_PROMPTS, power_analysis

    per_prompt = paired.groupby("prompt_id", sort=True).agg(
        a=("clip_score_a", "sum"), b=("clip_score_b", "sum"), n=("clip_score_a", "size")
    )
    n = per_prompt["n"].to_numpy(float)
    a, b = per_prompt["a"].to_numpy(float), per_prompt["b"].to_numpy(float)
    deltas = (b - a) / n
    if len(deltas) < 2:
        p = None
    elif not np.any(deltas):
        p = 1.0  # identical scores: no evidence of any difference (scipy returns NaN here)
    else:
        p = float(sps.wilcoxon(deltas).pvalue)
    return GroupDelta(
        kind=kind,
        label=label,
        prompts=len(per_prompt),
        images=int(n.sum()),
        baseline_mean=float(a.sum() / n.sum()),
        mean=float(b.sum() / n.sum()),
        mean_ci=weighted_mean_ci(b, n, boot),
        delta=float((b - a).sum() / n.sum()),
        delta_ci=weighted_mean_ci(b - a, n, boot),
        p_value=p,
        win_rate=float(np.mean(deltas > 0)),
        tie_rate=float(np.mean(deltas == 0)),
        few_prompts=len(per_prompt) < FEW_PROMPTS,
        power=power_analysis(deltas) if with_power else None,
    )


# -- rendering ------------------------------------------------------------------------------------

def _f(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def _ci(ci, signed: bool = False) -> str:
    return "" if ci is None else f"[{_f(ci[0], signed)}, {_f(ci[1], signed)}]"


def format_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        def esc(cell: str) -> str:
            return cell.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows])


def render(result: Comparison, fmt: str, *, top: int = 5) -> str:
    if fmt == "json":
        return json.dumps(_jsonable(result), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    if fmt == "csv":
        return _csv(result)
    markdown = fmt == "markdown"
    level = int(round(result.bootstrap["level"] * 100))
    header = ["run", "images", f"mean [{level}% CI]", f"delta [{level}% CI]", "p (Wilcoxon)", "win rate", "verdict"]
    rows = [[result.baseline + " (baseline)", str(result.baseline_images),
             f"{_f(result.baseline_mean)} {_ci(result.baseline_ci)}", "", "", "", ""]]
    for run in result.runs:
        o = run.overall
        rows.append([
            run.name,
            f"{run.paired_images}" + ("" if run.paired_images == run.run_images == run.baseline_images else f"/{run.run_images}"),
            f"{_f(o.mean)} {_ci(o.mean_ci)}",
            f"{_f(o.delta, True)} {_ci(o.delta_ci, True)}",
            format_p(o.p_value),
            "n/a (all tied)" if o.tie_rate == 1 else f"{o.win_rate:.1%}",
            verdict(run, result.margin),
        ])
    out = [_table(header, rows, markdown)]
    for message in result.mismatches:
        out.append(f"{'> ' if markdown else ''}mismatch (allowed): {message}")
    for message in result.stopped:
        out.append(f"{'> ' if markdown else ''}{message}")
    for run in result.runs:
        line = power_line(run)
        if line:
            out.append(f"{'> ' if markdown else ''}{line}")
        if run.sequential is not None:
            out.append(f"{'> ' if markdown else ''}{sequential_line(run)}")
    for run in result.runs:
        if run.paired_images < max(run.run_images, run.baseline_images):
            out.append(f"{'> ' if markdown else ''}{run.name}: {run.paired_images} images paired "
                       f"of {run.run_images} (run) and {run.baseline_images} (baseline)")
        moved = run.groups[:top]
        if moved:
            title = f"Groups that moved most, {run.name} vs {result.baseline}:"
            out.append(("\n**" + title + "**\n") if markdown else "\n" + title)
            group_rows = [[g.kind, g.label + (" (few prompts)" if g.few_prompts else ""), str(g.prompts),
                           f"{_f(g.delta, True)} {_ci(g.delta_ci, True)}", format_p(g.p_value)] for g in moved]
            out.append(_table(["group", "name", "prompts", f"delta [{level}% CI]", "p"], group_rows, markdown))
    return "\n".join(out) + "\n"


def power_line(run: RunComparison) -> str | None:
    """How big a difference these prompts can see, and how many prompts smaller ones need."""
    power = run.overall.power
    if power is None:
        return None
    if power["prompt_delta_sd"] == 0:
        return (f"{run.name}: every one of the {power['prompts']} prompts moved by the same amount: there is no "
                "spread to measure, so no number of prompts to say")
    needed = ", ".join(f"{d} needs {n} prompts" for d, n in power["prompts_needed"].items())
    return (f"{run.name}: with {power['prompts']} prompts the smallest detectable difference is "
            f"±{power['mde']:.4f} (two-sided α {power['alpha']:g}, power {power['power']:g}, per-prompt delta sd "
            f"{power['prompt_delta_sd']:.4f}); {needed}")


def _decided(q: dict[str, Any]) -> str:
    verdict = f"{q['verdict']} (margin {q['margin']:g})" if q["decided"] else "undecided"
    return (f"{verdict} after {q['prompts_used']} of {q['library_prompts']} prompts against {q['baseline']}; the "
            f"figures here cover the prompts it shares, of the {q['prompts_seen']} it generated")


def sequential_line(run: RunComparison) -> str:
    """What the seeded order would have cost: the verdict of the sequence and its prompts."""
    q = run.sequential
    low, high = q["mean_delta_ci"]
    head = f"{run.name}: sequential ({q['method']}, margin {q['margin']:g}, α {q['alpha']:g})"
    if not q["decided"]:
        return (f"{head}: undecided after all {q['prompts_used']} prompts of the seeded order; the fixed-size "
                "answer above stands")
    return (f"{head}: {q['verdict']} after {q['prompts_used']} of {q['library_prompts']} prompts of the seeded order "
            f"({q['prompts_used'] / q['library_prompts']:.0%}), sequence [{low:+.4f}, {high:+.4f}]")


def verdict(run: RunComparison, margin: float) -> str:
    ci = run.overall.delta_ci
    if ci is None:
        return "too few prompts"
    if run.worse:
        return "worse" + (f" by > {margin:g}" if margin else "")
    if ci[0] > 0:
        return "better"
    return "no significant change"


def _jsonable(result: Comparison) -> dict[str, Any]:
    data = asdict(result)
    data["failed"] = [r.name for r in result.failed]
    return data


def _csv(result: Comparison) -> str:
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "baseline", "kind", "group", "prompts", "images", "baseline_mean", "mean",
                     "mean_ci_low", "mean_ci_high", "delta", "delta_ci_low", "delta_ci_high", "p_value",
                     "win_rate", "tie_rate", "few_prompts", "worse", "mde", "prompts_for_0.005", "prompts_for_0.01",
                     "sequential_verdict", "sequential_prompts"])
    for run in result.runs:
        for g in [run.overall, *run.groups]:
            writer.writerow([
                run.name, result.baseline, g.kind, g.label, g.prompts, g.images, g.baseline_mean, g.mean,
                *(g.mean_ci or ("", "")), g.delta, *(g.delta_ci or ("", "")),
                "" if g.p_value is None else g.p_value, g.win_rate, g.tie_rate, g.few_prompts,
                run.worse if g.kind == "overall" else "",
                *((g.power["mde"], g.power["prompts_needed"]["0.005"], g.power["prompts_needed"]["0.01"])
                  if g.power else ("", "", "")),
                *((run.sequential["verdict"], run.sequential["prompts_used"])
                  if run.sequential and g.kind == "overall" else ("", "")),
            ])
    return buffer.getvalue()
