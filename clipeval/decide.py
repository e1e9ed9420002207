"""``run --baseline RUN --until-decided``: generate the library in its seeded order and stop as soon
as the confidence sequence for the mean paired delta against the baseline decides.

The images do not depend on the order (each image's seed is a function of its prompt_id and
sample), so a stopped run is an ordinary run folder holding a prefix of the order: resumable,
extendable to the whole library by the same command without --until-decided, and paired with any
other run on the prompts they share. ``sequential`` holds the statistics; this module holds the
baseline, the deltas of what is done, and the decision to stop.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipeval.errors import ClipevalError


class BaselineTooShort(ClipevalError):
    """The sequence needs a prompt of the order the baseline does not hold (a stopped baseline)."""

    def __init__(self, message: str, prompts: int):
        super().__init__(message)
        self.prompts = prompts  # of the order the baseline holds


@dataclass
class Decider:
    order: list[int]  # prompt_ids, the seeded order of the whole library
    samples: int  # images per prompt
    margin: float  # in cosine
    method: str
    baseline: Path | None
    base: dict[int, dict[int, float]] = field(default_factory=dict)  # prompt_id: {sample: usable score}
    base_prompts: set[int] = field(default_factory=set)  # prompts whose every image the baseline holds
    prefix: int | None = None  # generate exactly this many prompts of the order, deciding nothing
    bound: float | None = None  # --delta-bound; None: the deciding scorer's default (sequential.DELTA_BOUND)
    scorer: str = ""  # the label of the scorer that decides (the primary one)
    kind: str = "clip"  # its kind, which sets the default bound; the runner sets both once it has loaded

    @property
    def population(self) -> int:
        return len(self.order)

    @property
    def rule(self):
        from clipeval import sequential

        return sequential.rule(self.method, kind=self.kind, bound=self.bound)

    def seen(self, done: dict) -> list[int]:
        """The prompts of the order whose every image is done, up to the first that is not."""
        out = []
        for prompt_id in self.order:
            if not all((prompt_id, s) in done for s in range(self.samples)):
                break
            out.append(prompt_id)
        return out

    def deltas(self, done: dict, seen: list[int] | None = None) -> list[float | None]:
        """Each seen prompt's paired delta (the mean of its usable images minus the baseline's mean
        over the same samples), in order, as far as the baseline reaches; None for a prompt with no
        usable pair, which ``compare`` leaves out too: the sequence skips it."""
        from clipeval.stats import usable_row

        out: list[float | None] = []
        for prompt_id in self.seen(done) if seen is None else seen:
            if prompt_id not in self.base_prompts:
                break
            theirs = self.base.get(prompt_id, {})
            pairs = [(done[(prompt_id, s)]["clip_score"], theirs[s]) for s in range(self.samples)
                     if s in theirs and usable_row(done[(prompt_id, s)])]
            out.append(sum(a - b for a, b in pairs) / len(pairs) if pairs else None)
        return out

    def should_stop(self, done: dict) -> bool:
        """Asked before each generation call: stop once the sequence has decided, once the prefix
        asked for is done, or when the next prompt of the order is one the baseline lacks."""
        seen = self.seen(done)
        if self.prefix is not None:
            return len(seen) >= self.prefix
        if self.baseline is None:
            return False
        from clipeval import sequential

        deltas = self.deltas(done, seen)
        if any(v is not None for v in sequential.decisions(deltas, self.population, self.margin, self.rule)):
            return True
        return len(deltas) < len(seen) or (len(seen) < self.population and self.order[len(seen)] not in self.base_prompts)

    def sequential_block(self, done: dict, out: Path) -> dict[str, Any] | None:
        """summary.json's "sequential": the decision against the baseline; a prefix extension (a
        sweep making its baseline longer) keeps the decision the run reached before, if any."""
        import json

        from clipeval import sequential

        if self.baseline is None:
            try:
                return json.loads((out / "summary.json").read_text(encoding="utf-8")).get("sequential")
            except (OSError, ValueError):
                return None
        return sequential.summarize(self.deltas(done), self.population, self.margin, rule=self.rule,
                                    baseline=str(self.baseline), scorer=self.scorer, generated=len(self.seen(done)))

    def check_reached(self, done: dict, result: dict[str, Any]) -> None:
        """After the tables are written: an undecided run whose baseline ran out is an error that
        says how to go on (the sweep extends the baseline itself)."""
        have = len(self.deltas(done))
        # The loop may end (its last calls in flight) before asking should_stop again: judge by the deltas.
        if not result["decided"] and have < self.population and self.order[have] not in self.base_prompts:
            raise BaselineTooShort(
                f"--baseline {self.baseline} holds {have} prompts of the seeded order and the sequence has not "
                f"decided after them: extend it (clipeval run --out {self.baseline} with its own options, with "
                "--until-decided or over the whole library) and rerun this command, which resumes", have)


def prepare(config, library, ranks) -> Decider | None:
    """Check the sequential options against each other and the baseline before any model loads."""
    from clipeval import sequential

    if config.order_prefix is None and not config.until_decided:
        if config.baseline is not None:
            raise ClipevalError("--baseline is the run --until-decided decides against; add --until-decided")
        return None
    if config.limit is not None:
        raise ClipevalError("--limit and --until-decided exclude each other: the sequence decides how many prompts")
    if ranks.world > 1:
        raise ClipevalError("--until-decided runs in one process (a decision after each prompt of one order)")
    if config.sequence not in sequential.METHODS:
        raise ClipevalError(f"--sequence {config.sequence}: use {' or '.join(sequential.METHODS)}")
    try:
        sequential.rule(config.sequence, bound=config.delta_bound)  # the rule's own check of the bound
    except ValueError as err:
        raise ClipevalError(f"--delta-bound {config.delta_bound:g}: {err} (a paired delta of scores in [-1, 1] lies "
                            f"in [-{sequential.FULL_RANGE:g}, {sequential.FULL_RANGE:g}])") from err
    order = sequential.order([p.prompt_id for p in library.prompts], config.seed)
    decider = Decider(order, config.images_per_prompt, config.margin, config.sequence, None, prefix=config.order_prefix,
                      bound=config.delta_bound, kind=_kind(config.clip_model))
    if config.order_prefix is not None:
        return decider
    if config.baseline is None:
        raise ClipevalError("--until-decided needs --baseline RUN: the run folder it decides against")
    _load_baseline(decider, Path(config.baseline).expanduser(), config, library)
    if ranks.main:
        _say_if_too_small(decider, library.name)
    return decider


def _say_if_too_small(decider: Decider, name: str) -> None:
    """Before anything loads: a library on which the rule cannot decide is generated whole."""
    from clipeval import sequential

    n = decider.population
    if sequential.fewest_prompts(n, decider.margin, decider.rule) is None:
        print(f"note: no decision is possible on {name}'s {_prompts(n)} with --sequence {decider.method} at margin "
              f"{decider.margin:g}, whatever the images: the whole library is generated and the summary says "
              "'undecided' (compare the runs for the fixed-size answer)", file=sys.stderr)
    elif decider.method == "asymptotic" and n <= sequential.BURN_IN:
        print(f"note: --sequence asymptotic decides nothing before prompt {sequential.BURN_IN} unless the deltas "
              f"seen already fix the mean, and {name} has {_prompts(n)}: the whole library is likely generated "
              "(--sequence betting, the default, has no burn-in)", file=sys.stderr)


def _prompts(n: int) -> str:
    return f"{n} prompt{'' if n == 1 else 's'}"


def _kind(spec: str) -> str:
    """The deciding scorer's kind as far as its name tells, before it loads (the runner corrects it)."""
    from clipeval.scorers import resolve

    entry = resolve(spec)
    return entry.kind if entry else "clip"


def _load_baseline(decider: Decider, path: Path, config, library) -> None:
    from clipeval import store
    from clipeval.compare import MUST_MATCH
    from clipeval.stats import usable

    record = store.load_run(path)
    theirs = record.settings
    ours = {"library_sha256": library.sha256, "seed": config.seed, "clip_model": store.canonical(config.clip_model)}
    for key in MUST_MATCH:
        if store.canonical(theirs.get(key)) != store.canonical(ours[key]):
            what = {"library_sha256": "another prompt library", "seed": "another --seed",
                    "clip_model": "another scorer"}[key]
            raise ClipevalError(f"--baseline {path} was made with {what} ({key} {theirs.get(key)!r}, this run "
                                f"{ours[key]!r}): the images would not pair")
    samples = (record.manifest.get("selection") or {}).get("images_per_prompt")
    if samples != config.images_per_prompt:
        raise ClipevalError(f"--baseline {path} has {samples} images per prompt, this run "
                            f"{config.images_per_prompt}: give --images-per-prompt {samples}")
    scores = record.scores
    for row in usable(scores).itertuples(index=False):
        decider.base.setdefault(int(row.prompt_id), {})[int(row.sample)] = float(row.clip_score)
    counts = scores.groupby("prompt_id").size()
    decider.base_prompts = {int(p) for p, n in counts.items() if n >= config.images_per_prompt}
    decider.baseline = path
