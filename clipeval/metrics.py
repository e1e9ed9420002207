"""Scores by scorer: which column of ``scores.csv`` holds whose number, each scorer's statistics in
``summary.json``, and ``--metric``, the one scorer a command decides on.

A run carries one or more scorers. The first (``--clip-model``, or the first ``--scorer``) is the
run's primary one: its numbers stay where every reader has always found them (``clip_score`` and
``truncated`` in scores.csv, ``clip_mean`` in prompts.csv, ``clip/mean`` ... in summary.json), so
a run made with one scorer reads as before. Every other scorer has its own columns,
``score:LABEL`` and ``truncated:LABEL`` (prompts.csv: ``mean:LABEL``), and every scorer, the
first included, its own block in ``summary.json``'s ``scorers``, keyed by label.

``select`` turns a run into the view of one scorer: that scorer's column in ``clip_score``, its
statistics at the top of the summary and its model in ``settings["clip_model"]``. Everything
downstream (compare, the gates, sweep's history, the report, the trackers) then works on that
scorer unchanged, and two runs viewed through different scorers differ in ``clip_model``, which
compare refuses to pair: numbers of two scorers are never mixed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clipeval.errors import ClipevalError

PRIMARY = "clip_score"
# summary.json keys that are one scorer's statistics (the rest describe the run, or the method).
STATISTICS = ("mean", "mean_ci", "min", "max", "std", "median")
PER_SCORER = (*STATISTICS, "images", "prompts", "few_prompts", "truncated_prompts", "by_category", "by_challenge",
              "score", "scale")


@dataclass(frozen=True)
class ScoreColumn:
    """One scorer of a run: what it is called, whose model it is and where its numbers are."""

    label: str  # what --metric and summary.json's "scorers" call it
    model: str  # canonical: a resolved path, or a hub id
    kind: str  # "clip" or "vqa"
    primary: bool

    @property
    def column(self) -> str:
        return PRIMARY if self.primary else f"score:{self.label}"

    @property
    def truncated(self) -> str:
        return "truncated" if self.primary else f"truncated:{self.label}"

    @property
    def prompt_mean(self) -> str:
        return "clip_mean" if self.primary else f"mean:{self.label}"


def label(spec: str) -> str:
    """A scorer's name in column headers: a short name or hub id as given, a local folder by its
    name (a path with its slashes would be a poor column header; an absolute path is a folder, also
    one that has moved since: hub ids are never absolute). ``demo`` is "demo" either way."""
    path = Path(spec).expanduser()
    if path.exists() or path.is_absolute():
        return path.resolve().name
    return spec


def columns(specs: list[str], models: list[str], kinds: list[str] | None = None) -> list[ScoreColumn]:
    """The columns of the scorers ``specs`` as given (``models``: the canonical setting of each;
    ``kinds``: each loaded scorer's, once known). Two scorers that would share a label are refused,
    naming both."""
    out: list[ScoreColumn] = []
    for i, (spec, model) in enumerate(zip(specs, models)):
        name = label(spec)
        clash = next((c for c in out if c.label == name), None)
        if clash is not None:
            raise ClipevalError(f"two scorers are both called {name!r} ({clash.model} and {model}): give one of them "
                                "another folder name")
        out.append(ScoreColumn(name, model, kinds[i] if kinds else "clip", i == 0))
    return out


def summarize(scores, cols: list[ScoreColumn], definitions: list[tuple[str, str]]):
    """summary.json: the primary scorer's statistics at the top (as a one-scorer run has them),
    and every scorer's under ``scorers``. ``definitions``: (what the score is, its scale), per scorer."""
    from clipeval import stats

    blocks, summaries = {}, []
    for col, (definition, scale) in zip(cols, definitions):
        view = scores.assign(clip_score=scores[col.column], truncated=scores[col.truncated])
        summaries.append(stats.summarize(view, definition=definition, scale=scale))
        blocks[col.label] = {"kind": col.kind, "model": col.model, "column": col.column,
                             **{k.removeprefix("clip/"): v for k, v in summaries[-1].items() if k.removeprefix("clip/") in PER_SCORER}}
    summary = summaries[0]  # the primary scorer's: cols[0]
    summary["scorers"] = blocks
    return summary


def prompts_table(scores, cols: list[ScoreColumn], names: dict[int, str] | None = None):
    """prompts.csv: the primary scorer's columns, then one mean per other scorer."""
    from clipeval import stats

    table = stats.prompts_table(scores, names)
    for col in cols[1:]:
        good = stats.usable(scores.assign(clip_score=scores[col.column]))
        means = good.groupby("prompt_id")[PRIMARY].mean().map(stats.rounded)  # mapped by prompt_id: any order
        table[col.prompt_mean] = table["prompt_id"].map(means).astype(object).where(table["prompt_id"].isin(means.index), None)
    return table


def extra_columns(cols: list[ScoreColumn]) -> list[str]:
    return [name for col in cols[1:] for name in (col.column, col.truncated)]


def names(summary: dict[str, Any] | None, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The scorers of a run, label → block; a run from before scorers had blocks has its one."""
    blocks = (summary or {}).get("scorers")
    if blocks:
        return blocks
    model = settings.get("clip_model")
    return {label(model) if isinstance(model, str) else "clip": {"model": model, "column": PRIMARY, "kind": "clip"}}


def find(metric: str, blocks: dict[str, dict[str, Any]], where: Any, hint: str | None = None) -> str:
    """The label ``metric`` names: a label, a scorer's model (id or folder), or a short name of it."""
    from clipeval import scorers, store

    if metric in blocks:
        return metric
    wanted = {store.canonical(metric)}
    entry = scorers.known().get(metric)
    if entry is not None:
        wanted.add(entry.model)
    for name, block in blocks.items():
        if block.get("model") in wanted:
            return name
    import difflib

    close = difflib.get_close_matches(metric, list(blocks), cutoff=0.8)  # a typo, not another model
    if close:
        hint = f"did you mean {close[0]}?"
    hint = hint or f"re-score it with 'clipeval score {where} --out NEW --scorer {metric}'"
    raise ClipevalError(f"{where} has no scorer {metric!r} (it has {', '.join(blocks)}): {hint}")


def check_metric(metric: str | None, cols: list[ScoreColumn], *, until_decided: bool = False) -> None:
    """Before a run loads anything: ``--metric`` names one of its scorers."""
    if metric is None:
        return
    name = find(metric, {c.label: {"model": c.model} for c in cols}, "--metric: this run",
                f"add it with --scorer {metric}")
    if until_decided and name != cols[0].label:
        raise ClipevalError(f"--until-decided decides on the primary scorer ({cols[0].label}); make {name} the "
                            "primary one (--clip-model, or the first --scorer) instead of --metric")


def view(summary: dict[str, Any], settings: dict[str, Any], metric: str | None, where: Any) -> tuple[str, dict[str, Any]]:
    """The summary of one scorer (its label, and the summary with its statistics at the top)."""
    blocks = names(summary, settings)
    name = next(iter(blocks)) if metric is None else find(metric, blocks, where)
    block = blocks[name]
    if block["column"] == PRIMARY:  # names() gives every block its column
        return name, summary
    out = dict(summary)
    for key in PER_SCORER:
        if key in block:
            out[f"clip/{key}" if key in STATISTICS else key] = block[key]
    return name, out


def select(record, metric: str | None):
    """The run (a ``store.RunRecord``) as seen through one scorer; ``None``: its primary one."""
    if metric is None:
        return record
    name, summary = view(record.summary or {}, record.settings, metric, record.path)
    block = names(record.summary, record.settings)[name]
    if block["column"] == PRIMARY:  # names() gives every block its column
        return record
    column = block["column"]
    truncated = "truncated:" + column.removeprefix("score:")
    scores = record.scores.assign(clip_score=record.scores[column], truncated=record.scores[truncated])
    settings = {**record.settings, "clip_model": block["model"], "metric": name}
    for key in ("clip_processor", "clip_revision", "clip_dtype", "preprocess"):
        settings.pop(key, None)  # the primary scorer's, not this one's
    manifest = {**record.manifest, "settings": settings}
    # A run without a summary has only its primary scorer (names()), so it returned above.
    return replace(record, manifest=manifest, summary=summary, scores=scores)
