"""The sequential rules behind --until-decided: the betting tests' capitals equal to the authors'
reference code (confseq's betting_mart and lambda_aKelly), the asymptotic sequence equal to its
closed form, a delta beyond the bound handing over to the whole range, unpaired prompts skipped,
closing on the exact mean at the end of the library. How often each is wrong, by simulation on
every shape of deltas: test_sequential_promise.py."""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import confseq_reference as reference
from clipeval import sequential as sq

DELTAS = pd.read_csv(Path(__file__).parent / "data" / "demo_deltas.csv", comment="#")["delta"].to_numpy()


def _population(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pop = rng.choice(DELTAS, n)
    return pop - pop.mean() + shift


def test_the_order_is_the_sha256_order_and_a_prefix_of_any_longer_library():
    ids = list(range(40))
    want = sorted(ids, key=lambda p: hashlib.sha256(f"clipeval-order:3:{p}".encode()).hexdigest())
    assert sq.order(ids, 3) == want
    assert sq.order(ids, 3) != sq.order(ids, 4) and sorted(sq.order(ids, 4)) == ids
    subset = [p for p in ids if p % 3]
    assert sq.order(subset, 3) == [p for p in want if p % 3]  # a sub-library keeps the library's order
    assert sq.order(ids, 0)[:3] == [p for p in sorted(range(40), key=lambda p: hashlib.sha256(
        f"clipeval-order:0:{p}".encode()).digest())][:3]


def _scaled(d, bound: float):
    return (np.asarray(d, float) + bound) / (2 * bound)


def _confseqs_capital(d, m: float, population: int, bound: float, side: int) -> np.ndarray:
    """The authors' code: betting_mart on one side only, its bets lambda_aKelly clipped at zero."""
    x, prior = _scaled(d, bound), (sq.PRIOR_SD / (2 * bound)) ** 2
    kelly = lambda x, m: reference.lambda_aKelly(x, m, prior_mean=1 / 2, prior_variance=prior, N=population)  # noqa: E731
    if side > 0:
        return reference.betting_mart(x, float(_scaled(m, bound)), N=population, theta=1, trunc_scale=sq.TRUNCATION,
                                      lambdas_fn_positive=lambda x, m: np.maximum(0, kelly(x, m)))
    return reference.betting_mart(x, float(_scaled(m, bound)), N=population, theta=0, trunc_scale=sq.TRUNCATION,
                                  lambdas_fn_negative=lambda x, m: np.maximum(0, -kelly(x, m)))


@pytest.mark.parametrize("m", [-0.02, -0.005, 0.0, 0.003, 0.005])
@pytest.mark.parametrize("side", [1, -1])
@pytest.mark.parametrize("bound, spread", [(0.25, 0.03), (2.0, 0.03), (1.0, 0.4)])
def test_each_tests_capital_equals_confseqs(m, side, bound, spread):
    """clipeval's one-sided capitals against confseq's betting_mart and lambda_aKelly on the same
    deltas: without replacement from 300, truncation 0.9, at the default bound, the whole range, and
    deltas spread widely enough that the bets themselves (not the truncation) count."""
    population = 300
    d = np.clip(np.random.default_rng(0).normal(-0.004, spread, 250), -bound, bound)
    theirs = _confseqs_capital(d, m, population, bound, side)
    ours = sq.log_capital(d, m, population, bound, side)
    assert np.allclose(np.exp(ours), theirs, rtol=1e-9, atol=0)


@pytest.mark.parametrize("m, side", [(-0.25, 1), (0.25, -1), (-0.2, 1), (0.2, -1)])
def test_a_mean_the_deltas_drawn_rule_out_is_rejected_without_warnings(m, side):
    """From the first delta after which the rest of the library would need a mean outside the bound,
    the test whose null that is has capital +inf, never NaN, and the divisions on the way print nothing
    (a user would see numpy's RuntimeWarning)."""
    d = np.full(50, 0.25 if side > 0 else -0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log = sq.log_capital(d, m, 60, 0.25, side)
    assert not np.isnan(log).any() and log[-1] == np.inf
    assert np.isfinite(log[0])


def test_a_bet_is_never_against_its_own_side():
    """A test of mean <= m bets only that the deltas run above the mean left (and the other below):
    deltas running the other way leave its capital at exactly 1, which keeps it a supermartingale for
    every mean of its null, not only at the edge."""
    d = np.random.default_rng(1).normal(-0.05, 0.01, 100)  # far below 0
    assert (sq.log_capital(d, 0.0, 400, 0.25, +1) <= 1e-12).all()
    assert sq.log_capital(d, 0.0, 400, 0.25, -1)[-1] > math.log(40)


@pytest.mark.parametrize("alpha", [sq.ALPHA, 0.2])
def test_the_interval_ends_where_a_test_first_rejects_to_1e8(alpha):
    """Each end is a mean its one-sided test rejects at alpha/2, and 1e-8 inside it one it does not:
    the documented precision of the bisection, at the level asked for."""
    population, bound = 300, 0.25
    d = np.clip(-0.01 + 0.05 * np.random.default_rng(9).standard_normal(120), -bound, bound)
    low, high = sq.interval(list(d), population, sq.Rule(alpha=alpha, bound=bound))
    threshold = math.log(2 / alpha)

    def rejected(m, side):
        return sq.log_capital(d, m, population, bound, side)[-1] >= threshold

    assert -bound < low < d.mean() < high < bound
    assert rejected(low, +1) and not rejected(low + 1e-8, +1)
    assert rejected(high, -1) and not rejected(high - 1e-8, -1)


def test_an_unknown_method_or_bound_is_refused_by_name_and_the_default_is_betting():
    d = list(np.random.default_rng(3).normal(-0.02, 0.01, 80))
    assert sq.Rule() == sq.Rule("betting", sq.ALPHA, 0.5) == sq.rule() == sq.rule(kind="clip")
    assert sq.rule(kind="vqa").bound == 1.0 and sq.rule(bound=0.1).bound == 0.1
    assert sq.interval(d, 100) == sq.interval(d, 100, sq.Rule("betting")) != sq.interval(d, 100, sq.Rule("asymptotic"))
    with pytest.raises(ValueError, match=r"^unknown method 'bayes'; one of betting, asymptotic$"):
        sq.Rule("bayes")
    for bound in (0.0, -0.1, 2.5):
        with pytest.raises(ValueError, match=r"^the delta bound must be in \(0, 2\]"):
            sq.Rule(bound=bound)
    with pytest.raises(ValueError, match=r"outside \[-2, 2\]"):
        sq.decisions([0.1, 2.5], 10, 0.0)


def test_a_delta_beyond_the_bound_hands_the_decision_to_the_whole_range_from_that_prompt_on():
    """Before the first delta beyond ±bound the verdicts are the bounded tests'; from it on, exactly
    those of the same tests on [-2, 2] over every delta so far; the summary names that prompt."""
    population, bound = 400, 0.25
    d = np.random.default_rng(4).normal(-0.02, 0.02, 300)
    d[120] = -0.4
    narrow = sq.codes(d, population, 0.005, sq.Rule(bound=bound))
    wide = sq.codes(d, population, 0.005, sq.Rule(bound=2.0))
    inside = sq.codes(np.clip(d, -bound, bound), population, 0.005, sq.Rule(bound=bound))
    assert (narrow[:120] == inside[:120]).all() and (narrow[120:] == wide[120:]).all()
    assert (inside[120:] != wide[120:]).any()  # the two really differ there
    late = sq.summarize(list(d), population, 0.005, rule=sq.Rule(bound=bound))
    assert late["bound_exceeded_at"] is None and late["prompts_used"] <= 120  # decided before it
    d[5] = 0.3
    wide = sq.codes(d, population, 0.005, sq.Rule(bound=2.0))
    early = sq.summarize(list(d), population, 0.005, rule=sq.Rule(bound=bound))
    assert early["bound_exceeded_at"] == 6 and (sq.codes(d, population, 0.005, sq.Rule(bound=bound))[5:] == wide[5:]).all()
    assert early["prompts_used"] == (1 + int(np.argmax(wide != 0)) if (wide != 0).any() else 300)


def test_an_unpaired_prompt_is_skipped_and_shrinks_the_library():
    """A prompt with no usable pair is no observation (compare leaves it out too): the verdicts at the
    paired prompts are those of the paired deltas alone in a library smaller by the unpaired seen so
    far, and the mean is theirs. Counting it as a delta of 0 would give other verdicts here."""
    population = 200
    d = list(np.random.default_rng(5).normal(-0.012, 0.02, 150))
    with_gaps = [None] * 10 + d
    got = sq.decisions(with_gaps, population, 0.005)
    assert got[:10] == [None] * 10 and got[10:] == sq.decisions(d, population - 10, 0.005)
    counted = sq.decisions([0.0] * 10 + d, population, 0.005)
    assert next(i for i, v in enumerate(got) if v) != next(i for i, v in enumerate(counted) if v)
    s = sq.summarize(with_gaps, population, 0.005)
    used = s["prompts_used"]
    assert s["unpaired_prompts"] == 10 and s["mean_delta"] == pytest.approx(np.mean(d[:used - 10]), abs=1e-15)
    assert s["mean_delta_ci"] == list(sq.interval(d[:used - 10], population - 10))
    inner = sq.decisions(d[:40] + [float("nan")] + d[40:], population, 0.005)
    assert inner[40] is None and len(inner) == 151


@pytest.mark.parametrize("method, margin", [("betting", 0.005), ("betting", 0.0), ("asymptotic", 0.005)])
def test_fewest_prompts_is_where_the_most_extreme_deltas_first_decide(method, margin):
    rule = sq.Rule(method)
    for population in (16, 64, 200):
        fewest = sq.fewest_prompts(population, margin, rule)
        firsts = []
        for e in (-rule.bound, rule.bound, 0.0):
            steps = sq.decisions([e] * population, population, margin, rule)
            firsts += [i + 1 for i, v in enumerate(steps) if v][:1]
        assert fewest == min(firsts)
    assert sq.fewest_prompts(1, 0.005) is None and sq.fewest_prompts(2, 0.005) is None
    assert sq.fewest_prompts(40, 0.005, sq.Rule("asymptotic")) > 30  # below the burn-in only the deltas drawn decide


def test_the_asymptotic_bounds_are_the_martingale_form_in_a_small_library():
    """Where the without-replacement terms matter (300 prompts, up to 299 seen), each bound against a
    prompt-by-prompt evaluation of the docstring's formula: A_t, B_t summed term by term, the plug-in
    variance from scratch, the logical bounds, the burn-in."""
    population, alpha = 300, sq.ALPHA
    d = np.random.default_rng(8).normal(-0.004, 0.03, 299)
    low, high = sq.asymptotic_bounds(d, population, alpha)
    rho2 = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / (population / 2)
    for t in range(1, 300):
        seen = d[:t]
        a = sum(population / (population - i + 1) for i in range(1, t + 1))
        b = sum(d[: i - 1].sum() / (population - i + 1) for i in range(1, t + 1))
        variance = seen.var(ddof=1) if t > 1 else 0.0
        radius = math.sqrt(variance * (t * rho2 + 1) / rho2 * 2 * math.log(math.sqrt(t * rho2 + 1) / alpha))
        logical = ((seen.sum() - (population - t) * sq.FULL_RANGE) / population, (seen.sum() + (population - t) * sq.FULL_RANGE) / population)
        want = ((max((seen.sum() + b - radius) / a, logical[0]), min((seen.sum() + b + radius) / a, logical[1]))
                if t >= sq.BURN_IN else logical)
        assert (low[t - 1], high[t - 1]) == pytest.approx(want, rel=1e-9, abs=1e-12), t


def test_the_asymptotic_bounds_are_the_closed_form():
    """Far from the end of a huge library the without-replacement terms all but vanish (a_i = 1 + O(t/N))
    and the bounds are the paper's asymptotic confidence sequence,
    mean ± sd · sqrt(2 (tρ² + 1) / (t² ρ²) · log(sqrt(tρ² + 1) / α)), with ρ tuned at N/2."""
    population = 10**7
    d = np.random.default_rng(5).normal(0.01, 0.03, 500)
    low, high = sq.asymptotic_bounds(d, population)
    t = np.arange(1, 501)
    mean = np.cumsum(d) / t
    sd = np.array([d[:k].std(ddof=1) if k > 1 else 0.0 for k in t])
    rho2 = (-2 * math.log(0.05) + math.log(-2 * math.log(0.05) + 1)) / (population / 2)
    radius = sd * np.sqrt(2 * (t * rho2 + 1) / (t**2 * rho2) * np.log(np.sqrt(t * rho2 + 1) / 0.05))
    late = t >= sq.BURN_IN
    assert np.allclose(low[late], (mean - radius)[late], atol=1e-5, rtol=0)
    assert np.allclose(high[late], (mean + radius)[late], atol=1e-5, rtol=0)
    assert (high - low)[-1] < 1  # the bound is not the logical one
    logical = (np.cumsum(d) - (population - t) * sq.FULL_RANGE) / population, (np.cumsum(d) + (population - t) * sq.FULL_RANGE) / population
    assert np.allclose(low[~late], logical[0][~late]) and np.allclose(high[~late], logical[1][~late])  # the burn-in


@pytest.mark.parametrize("method", sq.METHODS)
def test_the_sequence_closes_on_the_exact_mean_and_the_last_prompt_decides_nothing(method):
    population = 120
    d = np.random.default_rng(6).permutation(_population(population, 7, -0.003))
    rule = sq.Rule(method)
    low, high = sq.interval(list(d), population, rule)
    assert low == pytest.approx(d.mean(), abs=1e-12) and high == pytest.approx(d.mean(), abs=1e-12)
    one_short = sq.interval(list(d[:-1]), population, rule)
    width = 2 * (rule.bound if method == "betting" else sq.FULL_RANGE) / population
    assert one_short[0] <= d.mean() <= one_short[1] and one_short[1] - one_short[0] <= width + 1e-12
    assert sq.decisions(list(d), population, 0.0, rule)[-1] is None  # the fixed-size answer stands


def test_inside_the_margin_is_decided_only_with_a_margin():
    population = 600
    d = list(np.random.default_rng(8).permutation(_population(population, 9, 0.0005)))
    assert "no difference larger than the margin" in sq.decisions(d, population, 0.01)
    assert all(v != "no difference larger than the margin" for v in sq.decisions(d, population, 0.0))


def test_the_summary_reports_the_first_decision():
    population = 1632
    d = list(np.random.default_rng(10).permutation(_population(population, 11, -0.01)))[:400]
    steps = sq.decisions(d, population, 0.005)
    first = next(i for i, v in enumerate(steps) if v is not None) + 1
    s = sq.summarize(d, population, 0.005, baseline="base")
    assert (s["decided"], s["verdict"], s["prompts_used"], s["prompts_seen"]) == (True, "worse", first, 400)
    assert s["mean_delta"] == pytest.approx(np.mean(d[:first]), abs=1e-12)
    assert s["mean_delta_ci"] == pytest.approx(list(sq.interval(d[:first], population)), abs=1e-12)
    assert s["mean_delta_ci"][1] < -0.005 and s["library_prompts"] == population and s["baseline"] == "base"
    undecided = sq.summarize(d[:30], population, 0.005)
    assert (undecided["decided"], undecided["verdict"], undecided["prompts_used"]) == (False, "undecided", 30)


def test_the_finite_library_narrows_the_asymptotic_sequence_as_it_runs_out():
    """Sampling without replacement: as the library runs out the sequence is narrower than the
    closed form for an endless population with the same deltas and tuning (the martingale's A_t
    outgrows t), and closes at the end."""
    population = 1000
    d = np.array(np.random.default_rng(12).permutation(_population(population, 13, 0.0)))
    rho2 = (-2 * math.log(0.05) + math.log(-2 * math.log(0.05) + 1)) / (population / 2)
    for share, factor in ((0.5, 0.8), (0.9, 0.5), (0.99, 0.3)):
        n = int(share * population)
        low, high = sq.asymptotic_bounds(d[:n], population)
        endless = 2 * d[:n].std(ddof=1) * math.sqrt(2 * (n * rho2 + 1) / (n * n * rho2) * math.log(math.sqrt(n * rho2 + 1) / 0.05))
        assert high[-1] - low[-1] < factor * endless
        assert low[-1] <= d.mean() <= high[-1]


@pytest.mark.parametrize("method", sq.METHODS)
def test_at_exactly_the_margin_any_decision_is_rare(method):
    """A true delta of exactly -M: 'worse' (below -M) and 'no difference' (inside) are both wrong, as is
    'better'. Near the end of a library the values drawn rule out candidate means on one side only;
    reading that as a rejection on both sides once made the betting sequence say 'better' every time."""
    population, margin = 400, 0.005
    rng = np.random.default_rng(14)
    spread = (DELTAS - DELTAS.mean()) * 0.02 / DELTAS.std(ddof=1)
    wrong = 0
    for _ in range(100):
        library = rng.choice(spread, population)
        library = library - library.mean() - margin
        wrong += any(v is not None for v in sq.decisions(list(rng.permutation(library)), population, margin, sq.Rule(method)))
    assert wrong / 100 <= sq.ALPHA


@pytest.mark.parametrize("population, shift, margin, seed, verdict, alpha, spread", [
    (300, -0.012, 0.005, 20, "worse", sq.ALPHA, None),
    (300, 0.012, 0.005, 21, "better", sq.ALPHA, None),
    (300, 0.0, 0.02, 22, "no difference larger than the margin", sq.ALPHA, None),
    (300, -0.012, 0.005, 24, "worse", 0.2, None),  # another level
    (200, -0.05, 0.02, 25, "worse", 0.2, 0.1),  # deltas spread wide enough that the bets themselves count
    (200, 0.05, 0.02, 26, "better", 0.2, 0.1),
    (8, -0.24, 0.005, 23, "worse", sq.ALPHA, 0.003),  # a tiny library of large drops
])
def test_each_betting_decision_is_the_verdict_of_the_interval_so_far(population, shift, margin, seed, verdict, alpha,
                                                                     spread):
    """decisions() reads four one-sided tests at exactly ±margin; interval() bisects the same tests
    over every candidate mean. After every prefix both give the same verdict."""
    rng = np.random.default_rng(seed)
    if spread:
        d = list(np.clip(shift + spread * rng.standard_normal(population), -0.25, 0.25))
    else:
        d = list(rng.permutation(_population(population, seed, shift)))
    rule = sq.Rule(alpha=alpha)
    got = sq.decisions(d, population, margin, rule)
    expected = []
    for n in range(1, population + 1):
        low, high = sq.interval(d[:n], population, rule)
        v = ("worse" if high < -margin else "better" if low > margin else
             "no difference larger than the margin" if low > -margin and high < margin else None)
        expected.append(None if n == population else v)
    assert got == expected
    assert next((v for v in got if v), None) == verdict


@pytest.mark.parametrize("method, shift", [("asymptotic", -0.006), ("betting", -0.012)])
def test_the_summary_is_exactly_the_documented_record(method, shift):
    """Every key, for both methods at a level other than the default, cut right after the decision
    (the verdict is that prompt's), and for no prompt at all."""
    population, alpha = 300, 0.1
    d = list(np.random.default_rng(30).permutation(_population(population, 30, shift)))
    rule = sq.Rule(method, alpha)
    steps = sq.decisions(d, population, 0.005, rule)
    first = next(i for i, v in enumerate(steps) if v is not None) + 1
    assert steps != sq.decisions(d, population, 0.005, sq.Rule(method))  # the level matters to this data
    assert sq.summarize(d[:first + 3], population, 0.005, rule=rule, baseline="b", scorer="clip", generated=first + 7) == {
        "method": method,
        "rule": rule.record(),
        "description": rule.description,
        "order": sq.ORDER,
        "alpha": alpha,
        "margin": 0.005,
        "scorer": "clip",
        "baseline": "b",
        "library_prompts": population,
        "prompts_seen": first + 3,
        "prompts_generated": first + 7,
        "prompts_saved": population - first - 7,
        "decided": True,
        "prompts_used": first,
        "verdict": "worse",
        "mean_delta_ci": list(sq.interval(d[:first], population, rule)),
        "mean_delta": pytest.approx(float(np.mean(d[:first])), abs=1e-15),
        "unpaired_prompts": 0,
        "bound_exceeded_at": None,
    }
    assert rule.record()["alpha"] == alpha and rule.record()["method"] == method
    low, high = sq.summarize(d[:first], population, 0.005, rule=rule)["mean_delta_ci"]
    assert (low, high) != sq.interval(d[:first], population, sq.Rule(method))
    empty = sq.summarize([], population, 0.005, rule=rule)
    assert (empty["prompts_used"], empty["verdict"], empty["mean_delta"], empty["mean_delta_ci"]) == (0, "undecided", None, [-2.0, 2.0])
