"""Deciding with fewer prompts: sequential tests of a library's mean paired delta that may be read
after every prompt.

The quantity is the mean, over the library's prompts that pair (a usable image in both runs, the
prompts ``compare`` counts), of each prompt's paired delta: the new run's mean score over its images
minus the baseline's over the same images. Prompts are visited in one seeded order, a finite
population sampled without replacement, and after each one the rule says whether the mean is
already known to lie below -M (worse), above +M (better) or inside (-M, +M) (no difference larger
than M).

The default, ``betting``, is four one-sided tests by betting, each a nonnegative supermartingale
under its null, so that by Ville's inequality the chance that any of them ever rejects a true null,
however often it is read, is at most alpha/2 (Waudby-Smith & Ramdas, "Estimating means of bounded
random variables by betting", JRSS-B 2024, sections 4 and 6). Which nulls can be true together
makes the error of the verdict at most alpha: "worse" rejects mean >= -M, "better" rejects
mean <= +M, "no difference" rejects both mean <= -M and mean >= +M; whatever the true mean, at most
two of these four nulls are false, and a wrong verdict needs a true null rejected on one side.

- Each test bets on the next prompt's delta against the mean of the prompts not yet seen, were the
  library's mean at the null's edge (the without-replacement martingale, their section 6). The bet
  is their approximate-Kelly (aGRAPA) bet, clipped at zero so it only ever bets on its own side
  (which keeps the test valid for every mean of its null, not only the edge) and truncated at
  TRUNCATION of what the capital could lose.
- The guarantee holds for every library whose deltas lie within the declared bound: exact, for
  any shape (skewed, sparse, heavy-tailed), any size, any order of reading. The bound is what makes
  the bets large enough to save prompts: a cosine delta can be anything in [-2, 2], and betting
  on that range needs most of a library (benchmarks/RESULTS.md). The default bound is 0.5 for a
  cosine, wider than the whole span of CLIP-family cosines between images and texts (about 0 to 0.45:
  a checkpoint that stops following prompts altogether moves a prompt's cosine by about 0.25, and
  deltas between checkpoints of one run are a few hundredths), and 1, the whole range, for a
  VQAScore probability. Every delta is checked: from the first delta outside the bound on, the rule
  decides by the same tests on the whole range [-2, 2] (no assumption at all), and the summary
  says at which prompt that happened.
- An unpaired prompt (no usable image in one of the runs) is no observation: the population shrinks
  by one, so that the target is the mean over the paired prompts, as in ``compare``. (The count of
  paired prompts still to come is taken to be all prompts still to come; exact when every prompt
  pairs.)

``asymptotic`` stays as a faster option with a weaker guarantee: the asymptotic confidence
sequence of Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas ("Time-uniform central limit theory and
asymptotic confidence sequences", Annals of Statistics 2024, arXiv 2103.06476) on the same
martingale. Its coverage holds only as the library grows and the deltas look normal: measured on
skewed and sparse deltas it is wrong in up to 18% of runs (benchmarks/RESULTS.md). No decision
before BURN_IN prompts.

No maintained library implements these for sampling without replacement (confseq, the authors'
own, needs a Boost build and is unmaintained), so they are written here; the capitals are tested
against confseq's own ``betting_mart`` and ``lambda_aKelly``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

ALPHA = 0.05
FULL_RANGE = 2.0  # every scorer's number lies in [-1, 1], so a paired delta in [-2, 2]
DELTA_BOUND = {"clip": 0.5, "vqa": 1.0}  # the default declared bound, by the scorer's kind
TRUNCATION = 0.9  # a bet risks at most this share of the capital
# The bets' estimates start from one pseudo-observation: delta 0 with a spread of 0.04, a typical
# per-prompt sd of cosine deltas. Any value keeps the guarantee (it holds for every predictable bet).
PRIOR_SD = 0.04
ORDER = "sha256('clipeval-order:{seed}:{prompt_id}'), ascending"
VERDICTS = ("worse", "better", "no difference larger than the margin")
METHODS = ("betting", "asymptotic")
BURN_IN = 50  # prompts before the asymptotic sequence may decide: its variance estimate needs them
GUARANTEES = {
    "betting": "wrong at most alpha of the time, on every library whose deltas lie within the bound",
    "asymptotic": "wrong about alpha of the time as the library grows and its deltas look normal; measured up to "
                  "18% on skewed or sparse deltas",
}


@dataclass(frozen=True)
class Rule:
    """How a sequential run decides; summary.json records it whole."""

    method: str = "betting"
    alpha: float = ALPHA
    bound: float = DELTA_BOUND["clip"]  # the declared bound on every |delta| (betting)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; one of {', '.join(METHODS)}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), not {self.alpha}")
        if not 0 < self.bound <= FULL_RANGE:
            raise ValueError(f"the delta bound must be in (0, {FULL_RANGE:g}], not {self.bound}")

    def record(self) -> dict[str, Any]:
        if self.method == "asymptotic":
            return {"method": self.method, "alpha": self.alpha, "burn_in": BURN_IN, "tuned_for": "half the library",
                    "guarantee": GUARANTEES[self.method]}
        return {"method": self.method, "alpha": self.alpha, "delta_bound": self.bound, "fallback_range": FULL_RANGE,
                "bets": "approximate Kelly (aGRAPA), one-sided", "truncation": TRUNCATION, "prior_sd": PRIOR_SD,
                "tests_at": "alpha/2 each", "guarantee": GUARANTEES[self.method]}

    @property
    def description(self) -> str:
        if self.method == "asymptotic":
            return ("asymptotic confidence sequence (Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas, Annals of "
                    "Statistics 2024) on the sampling-without-replacement martingale, normal mixture tuned at half "
                    f"the library, no decision before {BURN_IN} prompts; coverage asymptotic")
        return ("one-sided tests by betting for sampling without replacement (Waudby-Smith & Ramdas, JRSS-B 2024), "
                f"approximate-Kelly bets, each at alpha/2; exact while every delta lies within ±{self.bound:g}, "
                f"then on the whole range ±{FULL_RANGE:g}")


def rule(method: str = "betting", *, kind: str = "clip", bound: float | None = None, alpha: float = ALPHA) -> Rule:
    """The rule for a scorer of this kind: the declared bound, or the kind's default."""
    return Rule(method, alpha, DELTA_BOUND.get(kind, FULL_RANGE) if bound is None else bound)


def order(prompt_ids: Sequence[int], seed: int) -> list[int]:
    """The seeded order in which a sequential run visits the library: a pure function of the base
    seed and each prompt_id (no random generator whose stream a library upgrade could change), so
    any two runs with the same seed share it, and a shorter run is a prefix of a longer one."""
    return sorted(prompt_ids, key=lambda p: hashlib.sha256(f"clipeval-order:{seed}:{p}".encode()).digest())


def _before(a, first):
    """Each position's value at the position before (``first`` at the first): what a bet may use."""
    import numpy as np

    return np.concatenate([np.full(a.shape[:-1] + (1,), first), a[..., :-1]], axis=-1)


def log_capital(d, m: float, population, bound: float, side: int):
    """log of one test's capital after each delta of ``d`` (last axis): ``side`` +1 bets that the
    library's mean is above ``m`` (rejecting mean <= m), -1 below it. ``population``: the library's
    paired prompts as known at each delta (a number, or an array shaped like ``d``). Deltas are
    taken to lie in [-bound, bound]; a mean the deltas drawn already rule out is rejected (+inf)."""
    import numpy as np

    d = np.asarray(d, float)
    scale = 2 * bound
    x, mm = (d + bound) / scale, (m + bound) / scale
    t = np.arange(1, d.shape[-1] + 1)
    drawn = np.cumsum(x, axis=-1)
    before = drawn - x
    left = population - t + 1
    mu = (population * mm - before) / left  # the mean of what is left, were the library's mean m
    prior_mean, prior_variance = bound / scale, (PRIOR_SD / scale) ** 2
    mean = (prior_mean + drawn) / (t + 1)
    variance = (prior_variance + np.cumsum((x - mean) ** 2, axis=-1)) / (t + 1)
    expected = (population * _before(mean, prior_mean) - before) / left  # confseq's conditional estimate
    edge = side * (expected - mu)
    room = mu if side > 0 else 1 - mu  # what the capital loses per unit of bet on the worst delta
    with np.errstate(divide="ignore", invalid="ignore"):
        bet = np.clip(edge / (_before(variance, prior_variance) + edge * edge), 0, None)
        bet = np.where(room > 0, np.minimum(bet, TRUNCATION / room), 0.0)
        log = np.cumsum(np.log1p(side * bet * (x - mu)), axis=-1)
    impossible = np.logical_or.accumulate((mu < 0) if side > 0 else (mu > 1), axis=-1)
    return np.where(impossible, np.inf, log)


def _betting_codes(d, population, margin: float, bound: float, alpha: float):
    """Codes of the four tests, each also rejecting once the deltas drawn so far (this one included)
    leave its null no room: the rest of the library would need a mean beyond the bound."""
    import numpy as np

    threshold = math.log(2 / alpha)
    t = np.arange(1, d.shape[-1] + 1)
    drawn = np.cumsum(d, axis=-1)
    lowest, highest = (drawn - (population - t) * bound) / population, (drawn + (population - t) * bound) / population

    def rejects(m: float, side: int):
        return log_capital(d, m, population, bound, side) >= threshold

    worse = rejects(-margin, -1) | (highest < -margin)
    better = rejects(margin, +1) | (lowest > margin)
    inside = ((rejects(-margin, +1) | (lowest > -margin)) & (rejects(margin, -1) | (highest < margin))
              if margin > 0 else np.zeros_like(worse))
    return np.where(worse, 1, np.where(better, 2, np.where(inside, 3, 0)))


def asymptotic_bounds(deltas, population, alpha: float = ALPHA):
    """The asymptotic sequence after each delta (last axis), as (lower, upper) arrays of the mean.

    With m the library's mean, ``a_i = N / (N - i + 1)`` and ``b_i = S_{i-1} / (N - i + 1)``, the
    increments ``x_i - (a_i m - b_i)`` form a martingale ``S_t + B_t - m A_t`` whose increments have the
    variance of the prompts not yet seen; the normal-mixture boundary ``R_t`` on it (plug-in sample
    variance, mixture width optimised at N/2 prompts) gives ``m in [(S + B - R) / A, (S + B + R) / A]``,
    intersected with what the deltas seen already fix."""
    import numpy as np

    d = np.asarray(deltas, float)
    t = np.arange(1, d.shape[-1] + 1)
    s = np.cumsum(d, axis=-1)
    left = population - t + 1
    a, b = np.cumsum(population / left * np.ones_like(d), axis=-1), np.cumsum((s - d) / left, axis=-1)
    mean = s / t
    variance = np.maximum((np.cumsum(d * d, axis=-1) - t * mean * mean) / np.maximum(t - 1, 1), 0.0)
    size = float(np.max(population))
    rho2 = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / (size / 2)
    radius = np.sqrt(variance * (t * rho2 + 1) / rho2 * 2 * np.log(np.sqrt(t * rho2 + 1) / alpha))
    logical_lower = (s - (population - t) * FULL_RANGE) / population
    logical_upper = (s + (population - t) * FULL_RANGE) / population
    lower = np.maximum((s + b - radius) / a, logical_lower)
    upper = np.minimum((s + b + radius) / a, logical_upper)
    early = t < BURN_IN
    lower, upper = np.where(early, logical_lower, lower), np.where(early, logical_upper, upper)
    return np.maximum(lower, -FULL_RANGE), np.minimum(upper, FULL_RANGE)


def codes(d, population, margin: float, rule: Rule = Rule()):
    """The verdict after each delta (last axis) as a code: 0 none yet, else 1 + its index in VERDICTS.
    The core of ``decisions``, on a whole array of orders at once (the simulation drives it so)."""
    import numpy as np

    d = np.atleast_1d(np.asarray(d, float))
    if d.size and np.max(np.abs(d)) > FULL_RANGE:
        raise ValueError(f"a paired delta of {np.max(np.abs(d)):g} is outside [-{FULL_RANGE:g}, {FULL_RANGE:g}]")
    t = np.arange(1, d.shape[-1] + 1)
    if rule.method == "asymptotic":
        lower, upper = asymptotic_bounds(d, population, rule.alpha)
        out = np.where(upper < -margin, 1, np.where(lower > margin, 2, np.where(
            (lower > -margin) & (upper < margin) & (margin > 0), 3, 0)))
    else:
        out = _betting_codes(d, population, margin, rule.bound, rule.alpha)
        outside = np.logical_or.accumulate(np.abs(d) > rule.bound, axis=-1)
        if outside.any():
            out = np.where(outside, _betting_codes(d, population, margin, FULL_RANGE, rule.alpha), out)
    # The library's last prompt decides nothing: the mean is then known, and the fixed-size answer stands.
    return np.where(t >= population, 0, out)


def first_decisions(d, population: int, margin: float, rule: Rule = Rule()):
    """For each row of ``d`` (orders of one library, every prompt paired): the prompts read when the
    run stops (its first decision, else all of them) and the verdict code there (0: undecided)."""
    import numpy as np

    c = codes(d, population, margin, rule)
    decided = c != 0
    stop = np.where(decided.any(axis=-1), decided.argmax(axis=-1), c.shape[-1] - 1)
    return stop + 1, np.take_along_axis(c, stop[..., None], axis=-1)[..., 0]


def _unpaired(v) -> bool:
    """A prompt without a usable pair: None (the Decider, compare) or NaN (a caller's array)."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def _paired(deltas, population: int):
    """The paired deltas as an array, and the population at each (less the unpaired seen before)."""
    import numpy as np

    values, known, unpaired = [], [], 0
    for v in deltas:
        if _unpaired(v):
            unpaired += 1
        else:
            values.append(float(v))
            known.append(population - unpaired)
    return np.array(values), np.array(known, dtype=float), unpaired


def decisions(deltas, population: int, margin: float, rule: Rule = Rule()) -> list[str | None]:
    """The verdict after each prompt of ``deltas`` (None where a prompt did not pair), None until
    one is reached; the last prompt of the library never decides."""
    values, known, _ = _paired(deltas, population)
    found = iter(codes(values, known, margin, rule).tolist() if len(values) else [])
    out: list[str | None] = []
    for v in deltas:
        code = 0 if _unpaired(v) else next(found)
        out.append(VERDICTS[code - 1] if code else None)
    return out


def fewest_prompts(population: int, margin: float, rule: Rule = Rule()) -> int | None:
    """The fewest prompts after which any verdict is possible on this library (the most extreme
    deltas the rule allows, each way), or None where none is before its last prompt."""
    import numpy as np

    if population < 2:
        return None
    extremes = [-rule.bound, rule.bound] + ([0.0] if margin > 0 else [])
    stops = [int(s) for s, c in zip(*first_decisions(np.array([[e] * population for e in extremes]), population,
                                                     margin, rule)) if c]
    return min(stops) if stops else None


def interval(deltas, population: int, rule: Rule = Rule()) -> tuple[float, float]:
    """The means the rule has not rejected after all of ``deltas``: for ``betting``, bisection (to
    1e-8) on the one-sided tests' capitals, each at alpha/2, within what the deltas drawn fix."""
    import numpy as np

    values, known, _ = _paired(deltas, population)
    if not len(values):
        return -FULL_RANGE, FULL_RANGE
    if rule.method == "asymptotic":
        lower, upper = asymptotic_bounds(values, known, rule.alpha)
        return float(lower[-1]), float(upper[-1])
    bound = rule.bound if np.max(np.abs(values)) <= rule.bound else FULL_RANGE
    n, size, total = len(values), float(known[-1]), float(values.sum())
    logical = ((total - (size - n) * bound) / size, (total + (size - n) * bound) / size)
    if n >= size:
        return logical
    threshold = math.log(2 / rule.alpha)

    def rejected(m: float, side: int) -> bool:
        return bool(log_capital(values, m, known, bound, side)[-1] >= threshold)

    def edge(side: int, inside: float, outside: float) -> float:
        if not rejected(outside, side):
            return outside
        while abs(outside - inside) > 1e-8:
            middle = (inside + outside) / 2
            inside, outside = (inside, middle) if rejected(middle, side) else (middle, outside)
        return outside

    centre = min(max(total / n, logical[0]), logical[1])
    return max(edge(+1, centre, logical[0]), logical[0]), min(edge(-1, centre, logical[1]), logical[1])


def summarize(deltas, population: int, margin: float, *, rule: Rule = Rule(), baseline: str = "",
              scorer: str = "", generated: int | None = None) -> dict[str, Any]:
    """The sequential result as summary.json, compare and the trackers carry it: the verdict at the
    first prompt where the rule decided (else "undecided"), and the interval there.

    ``deltas``: each prompt's delta in the seeded order, None where it did not pair; ``generated``:
    the prompts the run generated, which may be more than the deltas (a batch under way when the
    rule decided, or a baseline that ends sooner)."""
    import numpy as np

    deltas = list(deltas)
    steps = decisions(deltas, population, margin, rule)
    decided_at = next((i + 1 for i, v in enumerate(steps) if v is not None), None)
    used = decided_at or len(steps)
    values, _, unpaired = _paired(deltas[:used], population)
    outside = np.flatnonzero([not _unpaired(v) and abs(v) > rule.bound for v in deltas[:used]]) \
        if rule.method == "betting" else []
    generated = len(deltas) if generated is None else generated
    low, high = interval(deltas[:used], population, rule)
    return {
        "method": rule.method,
        "rule": rule.record(),
        "description": rule.description,
        "order": ORDER,
        "alpha": rule.alpha,
        "margin": margin,
        "scorer": scorer,
        "baseline": baseline,
        "library_prompts": population,
        "prompts_seen": len(steps),
        "prompts_generated": generated,
        "prompts_saved": population - generated,
        "decided": decided_at is not None,
        "prompts_used": used,
        "verdict": steps[used - 1] if decided_at else "undecided",
        "mean_delta_ci": [low, high],
        "mean_delta": float(values.mean()) if len(values) else None,
        "unpaired_prompts": unpaired,
        "bound_exceeded_at": int(outside[0]) + 1 if len(outside) else None,
    }
