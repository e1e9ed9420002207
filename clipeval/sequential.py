"""Deciding with fewer prompts: anytime-valid confidence sequences for a library's mean paired delta.

The quantity is the mean, over the N prompts of the library, of each prompt's paired delta (the
new run's mean score over its images minus the baseline's over the same images). Prompts are
visited in one seeded order, a finite population sampled without replacement, and after each
one the sequence says whether the mean is already known to lie wholly below -M (worse), wholly
above +M (better) or wholly inside (-M, +M) (no difference larger than M). Looking after every
prompt and stopping at the first decision keeps the error rate at alpha, because the sequence
covers the mean at every prompt at once with probability 1 - alpha.

Two sequences, both built on the without-replacement martingale of Waudby-Smith & Ramdas ("Confidence
sequences for sampling without replacement", NeurIPS 2020; JRSS-B 2024, section 6): each increment is
a prompt's delta minus the mean of the prompts not yet seen, were the library's mean m.

- ``asymptotic`` (the default): the Robbins normal-mixture boundary on that martingale with a
  plug-in variance, Waudby-Smith, Arnold, Wu, Wang & Ramdas, "Time-uniform central limit theory
  and asymptotic confidence sequences" (Annals of Statistics 2024), the martingale form of their
  asymptotic confidence sequence, tuned for half the library. Its coverage is asymptotic (as for
  a t-test); measured in simulation (tests, benchmarks/RESULTS.md). No decision before BURN_IN prompts.
- ``betting``: the hedged-capital betting sequence (JRSS-B 2024, Theorem 3 and section 6) with their
  predictable plug-in bets: valid for every library, no approximation, since deltas lie in [-2, 2].
  That range is its cost: a bet may risk at most about 1/2 of the capital on the gap to a bound
  two cosines away, so a difference of 0.004 takes most of Parti to show (measured: 89% of it at
  twice the fixed-size minimum detectable difference, against 20% for ``asymptotic``).

No maintained library implements either for sampling without replacement (confseq, the authors'
own, needs a Boost build and is unmaintained; ville and sequential-analysis sample with
replacement), so both are written here; the betting one is tested against confseq's reference
code, the asymptotic one against its closed form and by simulation.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

ALPHA = 0.05
THETA = 0.5  # the share of capital betting that the mean is above m; the rest bets below
TRUNCATION = 0.5  # bets at most c/mu and c/(1 - mu): capital never reaches 0
LOW, HIGH = -2.0, 2.0  # a paired delta of two cosines
# The plug-in variance starts from one pseudo-observation of this variance (on [0, 1]): a per-prompt
# delta sd of 0.04 in cosine, a typical spread. The paper's default (1/4, the largest possible) makes
# the first hundreds of bets far too timid for deltas that span 1% of their range; any fixed value
# keeps the guarantee, which holds for every predictable bet.
PRIOR_VARIANCE = (0.04 / (HIGH - LOW)) ** 2
ORDER = "sha256('clipeval-order:{seed}:{prompt_id}'), ascending"
VERDICTS = ("worse", "better", "no difference larger than the margin")
METHODS = ("asymptotic", "betting")
BURN_IN = 50  # prompts before the asymptotic sequence may decide: its variance estimate needs them



def order(prompt_ids: Sequence[int], seed: int) -> list[int]:
    """The seeded order in which a sequential run visits the library: a pure function of the base
    seed and each prompt_id (no random generator whose stream a library upgrade could change), so
    any two runs with the same seed share it, and a shorter run is a prefix of a longer one."""
    return sorted(prompt_ids, key=lambda p: hashlib.sha256(f"clipeval-order:{seed}:{p}".encode()).digest())


def _scaled(delta: float) -> float:
    return (delta - LOW) / (HIGH - LOW)


def _unscaled(x: float) -> float:
    return LOW + x * (HIGH - LOW)


def bets(x, alpha: float = ALPHA):
    """Predictable plug-in bets (the paper's eq. 26, as confseq's ``lambda_predmix_eb``): bet t uses
    the mean and variance of the first t - 1 values only, each regularised by one pseudo-observation
    (mean 1/2, variance PRIOR_VARIANCE). Returns (bets for the upward capital, the downward).

    For CLIP deltas (a few hundredths of the [-2, 2] range) every bet exceeds log_capital's cap;
    they matter for scorers whose deltas spread wider."""
    import numpy as np

    x = np.asarray(x, float)
    t = np.arange(1, len(x) + 1)
    mean = (0.5 + np.cumsum(x)) / (t + 1)  # below 1 for values in [0, 1]: confseq's cap at 1 never binds
    variance = (PRIOR_VARIANCE + np.cumsum((x - mean) ** 2)) / (t + 1)
    before = np.append(PRIOR_VARIANCE, variance[:-1])
    up = np.sqrt(2 * np.log(1 / (alpha * THETA)) / (t * np.log1p(t) * before))
    down = np.sqrt(2 * np.log(1 / (alpha * (1 - THETA))) / (t * np.log1p(t) * before))
    return up, down


def log_capital(x, m: float, population: int, alpha: float = ALPHA):
    """log K+_t(m) and log K-_t(m) for t = 1..n: the wealth of betting that the population mean
    (on [0, 1]) is above, and below, ``m``, after each of the values ``x`` drawn without replacement
    from ``population`` values. Where what was drawn rules m out, the capital betting against it is
    +inf and the other -inf (m is then rejected from that side, as the monotone reading needs)."""
    import numpy as np

    x = np.asarray(x, float)
    t = np.arange(1, len(x) + 1)
    drawn = np.append(0, np.cumsum(x)[:-1])
    left = population - (t - 1)
    mu = (population * m - drawn) / left  # the mean of what is left, were the population mean m
    up, down = bets(x, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.minimum(up, TRUNCATION / mu)
        down = np.minimum(down, TRUNCATION / (1 - mu))
        log_up = np.cumsum(np.log1p(up * (x - mu)))
        log_down = np.cumsum(np.log1p(-down * (x - mu)))
    # An m the values drawn already rule out is rejected, and on its own side only: one so low that the
    # rest would need a mean below 0 by the upward capital (which also rejects every m below it), one
    # so high that the rest would need a mean above 1 by the downward (and every m above it).
    too_low, too_high = np.logical_or.accumulate(mu < 0), np.logical_or.accumulate(mu > 1)
    log_up = np.where(too_low, np.inf, np.where(too_high, -np.inf, log_up))
    log_down = np.where(too_high, np.inf, np.where(too_low, -np.inf, log_down))
    # Nothing else is NaN: with mu in [0, 1] each bet is at most 1/2 / mu (or 1/2 / (1 - mu)), so
    # every log1p argument is at least -1/2.
    return log_up, log_down


def asymptotic_bounds(deltas, population: int, alpha: float = ALPHA):
    """The asymptotic sequence after each prompt, as (lower, upper) arrays of the mean delta.

    With m the library's mean, ``a_i = N / (N - i + 1)`` and ``b_i = S_{i-1} / (N - i + 1)``, the
    increments ``x_i - (a_i m - b_i)`` form a martingale ``S_t + B_t - m A_t`` whose increments have the
    variance of the prompts not yet seen; the normal-mixture boundary ``R_t`` on it (plug-in sample
    variance, mixture width optimised at N/2 prompts) gives ``m in [(S + B - R) / A, (S + B + R) / A]``,
    intersected with what the deltas seen already fix. ``A_t`` outgrows ``t`` as the library runs
    out, which is the finite population's gain."""
    import numpy as np

    d = np.asarray(deltas, float)
    n = len(d)
    t = np.arange(1, n + 1)
    s = np.cumsum(d)
    before = np.append(0.0, s[:-1])
    left = population - t + 1
    a, b = np.cumsum(population / left), np.cumsum(before / left)
    mean = s / t
    variance = np.maximum((np.cumsum(d * d) - t * mean * mean) / np.maximum(t - 1, 1), 0.0)
    rho2 = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / (population / 2)
    radius = np.sqrt(variance * (t * rho2 + 1) / rho2 * 2 * np.log(np.sqrt(t * rho2 + 1) / alpha))
    lower, upper = (s + b - radius) / a, (s + b + radius) / a
    logical_lower, logical_upper = (s + (population - t) * LOW) / population, (s + (population - t) * HIGH) / population
    lower, upper = np.maximum(lower, logical_lower), np.minimum(upper, logical_upper)
    early = t < BURN_IN
    lower[early], upper[early] = np.maximum(LOW, logical_lower[early]), np.minimum(HIGH, logical_upper[early])
    return lower, upper


def _betting_flags(deltas, population: int, margin: float, alpha: float):
    """(below, above, not_below, not_above) after each prompt for the betting sequence, read off the
    capital at -margin and +margin: the downward capital rises with m, so once it rejects m0 it
    rejects every m above m0; the upward capital, every m below."""
    import numpy as np

    x = np.array([_scaled(d) for d in deltas])
    threshold = math.log(1 / alpha)
    low, high = _scaled(-margin), _scaled(margin)
    up_low, down_low = log_capital(x, low, population, alpha)
    up_high, down_high = log_capital(x, high, population, alpha)
    log_theta, log_rest = math.log(THETA), math.log(1 - THETA)
    t = np.arange(1, len(x) + 1)
    drawn = np.cumsum(x)
    logical_low, logical_high = drawn / population, (drawn + (population - t)) / population
    return ((log_rest + down_low >= threshold) | (logical_high < low),
            (log_theta + up_high >= threshold) | (logical_low > high),
            (log_theta + up_low >= threshold) | (logical_low > low),
            (log_rest + down_high >= threshold) | (logical_high < high))


def decisions(deltas, population: int, margin: float, *, method: str = "asymptotic",
              alpha: float = ALPHA) -> list[str | None]:
    """The verdict after each prompt, None until one is reached: the sequence lies wholly below
    -margin (worse), above +margin (better), or inside (-margin, +margin). The last prompt of the
    library never decides: the mean is then known exactly and the fixed-size answer stands."""
    _known(method)
    if not len(deltas):
        return []
    if method == "betting":
        below, above, not_below, not_above = _betting_flags(deltas, population, margin, alpha)
    else:
        lower, upper = asymptotic_bounds(deltas, population, alpha)
        below, above, not_below, not_above = upper < -margin, lower > margin, lower > -margin, upper < margin
    out: list[str | None] = []
    for i, (b, a, nb, na) in enumerate(zip(below, above, not_below, not_above)):
        if i + 1 >= population:
            out.append(None)
        else:
            out.append(VERDICTS[0] if b else VERDICTS[1] if a else VERDICTS[2] if (nb and na and margin > 0) else None)
    return out


def _known(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")


def betting_interval(deltas, population: int, alpha: float = ALPHA) -> tuple[float, float]:
    """The betting sequence after all of ``deltas``, as an interval of the mean delta: bisection
    on the monotone capitals (to 1e-8 in delta), intersected with what the values drawn already fix
    (the logical bounds: the rest of the population could be all -2 or all +2)."""
    import numpy as np

    x = np.array([_scaled(d) for d in deltas])
    threshold = math.log(1 / alpha)
    n, drawn = len(x), float(x.sum())
    logical = (drawn / population, (drawn + population - n) / population)

    def rejected_from_above(m: float) -> bool:  # the downward capital rejects m (and all above it)
        return bool(math.log(1 - THETA) + log_capital(x, m, population, alpha)[1][-1] >= threshold)

    def rejected_from_below(m: float) -> bool:
        return bool(math.log(THETA) + log_capital(x, m, population, alpha)[0][-1] >= threshold)

    def edge(rejected, inside: float, outside: float) -> float:
        if not rejected(outside):
            return outside
        for _ in range(60):
            middle = (inside + outside) / 2
            if rejected(middle):
                outside = middle
            else:
                inside = middle
            if abs(outside - inside) < 1e-8 / (HIGH - LOW):
                break
        return outside  # the first rejected value: conservatively, the interval's closed end

    if n == 0:
        return LOW, HIGH
    if n >= population:
        return _unscaled(logical[0]), _unscaled(logical[1])
    centre = float(x.mean())  # inside the logical bounds: drawn / N <= drawn / n <= (drawn + N - n) / N
    low = max(edge(rejected_from_below, centre, logical[0]), logical[0])
    high = min(edge(rejected_from_above, centre, logical[1]), logical[1])
    return _unscaled(low), _unscaled(high)


def interval(deltas, population: int, *, method: str = "asymptotic", alpha: float = ALPHA) -> tuple[float, float]:
    _known(method)
    if method == "betting":
        return betting_interval(deltas, population, alpha)
    if not len(deltas):
        return LOW, HIGH
    lower, upper = asymptotic_bounds(deltas, population, alpha)
    return float(lower[-1]), float(upper[-1])


DESCRIPTIONS = {
    "asymptotic": "asymptotic confidence sequence (Waudby-Smith, Arnold, Wu, Wang & Ramdas, Annals of Statistics "
                  "2024) on the sampling-without-replacement martingale, normal mixture tuned at half the library, "
                  f"no decision before {BURN_IN} prompts",
    "betting": "hedged-capital betting confidence sequence for sampling without replacement (Waudby-Smith & Ramdas, "
               "JRSS-B 2024), predictable plug-in bets, deltas bounded in [-2, 2]",
}


def summarize(deltas, population: int, margin: float, *, method: str = "asymptotic", alpha: float = ALPHA,
              baseline: str = "", unpaired: int = 0) -> dict[str, Any]:
    """The sequential result as summary.json, compare and the trackers carry it: the verdict at the
    first prompt where the sequence decided (else "undecided"), and the sequence there."""
    deltas = list(deltas)
    steps = decisions(deltas, population, margin, method=method, alpha=alpha)
    decided_at = next((i + 1 for i, v in enumerate(steps) if v is not None), None)
    used = decided_at or len(steps)
    low, high = interval(deltas[:used], population, method=method, alpha=alpha)
    return {
        "method": method,
        "description": DESCRIPTIONS[method],
        "order": ORDER,
        "alpha": alpha,
        "margin": margin,
        "baseline": baseline,
        "library_prompts": population,
        "prompts_seen": len(steps),
        "decided": decided_at is not None,
        "prompts_used": used,
        "verdict": steps[used - 1] if decided_at else "undecided",
        "mean_delta_ci": [low, high],
        "mean_delta": float(sum(deltas[:used]) / used) if used else None,
        "unpaired_prompts": unpaired,
    }
