"""How often --until-decided is wrong, and how many prompts it spends, by simulation.

Each library is a finite set of per-prompt paired deltas of a known shape (below), recentred to a
chosen true mean delta; it is read in many random orders, each through ``clipeval.sequential``'s own
``first_decisions`` (the verdict at the first prompt where the rule decides, as ``Decider.should_stop``
stops the run there). Per cell (shape, library size, true delta, margin, rule): the share of orders
that end in a verdict the truth contradicts, its standard error, and the prompts used (median and
90th percentile) against the whole library, which a fixed-size evaluation always generates.

    python benchmarks/bench_sequential.py --orders 1000 --out benchmarks/results/sequential-DATE.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from clipeval import sequential

HERE = Path(__file__).resolve().parent
DEMO = pd.read_csv(HERE.parent / "tests" / "data" / "demo_deltas.csv", comment="#")["delta"].to_numpy()
SIZES = (100, 200, 1632)  # the smallest built-in library with a decision worth having, a typical one, Parti
MARGINS = (0.0, 0.005)
M = 0.005  # the default margin: the true deltas are placed around it
Z = 2.8015852  # norm.ppf(0.975) + norm.ppf(0.8): the fixed-size MDE is Z * sd / sqrt(N)
RULES = {
    "asymptotic": sequential.Rule("asymptotic"),
    "betting ±2": sequential.Rule("betting", bound=sequential.FULL_RANGE),
    f"betting ±{sequential.DELTA_BOUND['clip']:g} (default)": sequential.Rule(),
}
CODES = {0: "undecided", **{i + 1: v for i, v in enumerate(sequential.VERDICTS)}}


def _mixture(rng, n: int, share: float, centre: float, spread: float, rest_spread: float) -> np.ndarray:
    few = rng.random(n) < share
    return np.where(few, rng.normal(centre, spread, n), rng.normal(0, rest_spread, n))


SHAPES = {
    "normal sd 0.01": lambda rng, n: rng.normal(0, 0.01, n),
    "normal sd 0.02": lambda rng, n: rng.normal(0, 0.02, n),
    "normal sd 0.04": lambda rng, n: rng.normal(0, 0.04, n),
    # sd 0.02; each of the ten is its own library, drawn from a seed of its name
    **{f"student-t(3) #{k}": lambda rng, n: rng.standard_t(3, n) * 0.02 / math.sqrt(3) for k in range(10)},
    "bimodal ±0.02": lambda rng, n: rng.choice([-0.02, 0.02], n) + rng.normal(0, 0.005, n),
    "skewed: 10% near -0.1": lambda rng, n: _mixture(rng, n, 0.10, -0.1, 0.02, 0.005),
    "skewed: 10% near +0.1": lambda rng, n: _mixture(rng, n, 0.10, 0.1, 0.02, 0.005),
    "sparse: 5% drops of 0.1": lambda rng, n: np.where(rng.random(n) < 0.05, -0.1, 0.0),
    # beyond the default bound: the rule falls back to the whole range once it meets one of them
    "1% drops of 0.7, beyond the bound": lambda rng, n: np.where(rng.random(n) < 0.01, -0.7, rng.normal(0, 0.02, n)),
    "demo deltas, sd 0.02": lambda rng, n: rng.choice((DEMO - DEMO.mean()) * 0.02 / DEMO.std(ddof=1), n),
}


def library(shape: str, size: int) -> np.ndarray:
    """One library of the shape, drawn from a seed of its name and size (so every rule sees it)."""
    seed = int.from_bytes(f"{shape}:{size}".encode(), "little") % 2**32
    return SHAPES[shape](np.random.default_rng(seed), size)


def true_deltas(lib: np.ndarray) -> dict[str, float]:
    mde = Z * lib.std(ddof=1) / math.sqrt(len(lib))
    return {"0": 0.0, "-M/2": -M / 2, "-M": -M, "-1.5M": -1.5 * M, "-2 MDE": -2 * mde, "-4 MDE": -4 * mde, "+M": M}


def truth(delta: float, margin: float) -> int:
    """The verdict code the truth supports; -1 where every verdict is wrong (at a margin's edge)."""
    if delta < -margin:
        return 1
    if delta > margin:
        return 2
    return 3 if margin > 0 and abs(delta) < margin else -1


@dataclass
class Cell:
    shape: str
    size: int
    true: str
    true_delta: float
    margin: float
    rule: str
    orders: int
    wrong: float
    wrong_se: float
    undecided: float
    prompts_median: float
    prompts_p90: float
    share_median: float
    bound_exceeded: float  # the share of orders in which a delta left the declared bound


def cell(lib: np.ndarray, delta: float, margin: float, rule: sequential.Rule, orders: int, seed: int,
         shape: str = "", true: str = "", name: str = "") -> Cell:
    rng = np.random.default_rng(seed)
    shifted = lib - lib.mean() + delta
    read = rng.permuted(np.tile(shifted, (orders, 1)), axis=1)
    stops, verdicts = sequential.first_decisions(read, len(lib), margin, rule)
    want = truth(delta, margin)
    wrong = float(np.mean((verdicts != 0) & (verdicts != want)))
    outside = np.abs(read) > rule.bound
    exceeded = float(np.mean(np.any(outside & (np.arange(len(lib)) < stops[:, None]), axis=1))) \
        if rule.method == "betting" else 0.0
    return Cell(shape, len(lib), true, float(delta), margin, name, orders, wrong,
                math.sqrt(max(wrong * (1 - wrong), 1e-12) / orders), float(np.mean(verdicts == 0)),
                float(np.median(stops)), float(np.quantile(stops, 0.9)), float(np.median(stops)) / len(lib), exceeded)


def simulate(orders: int, shapes=SHAPES, sizes=SIZES, rules=RULES, say=print) -> list[Cell]:
    out = []
    for shape in shapes:
        for size in sizes:
            lib = library(shape, size)
            for i, (true, delta) in enumerate(true_deltas(lib).items()):
                for margin in MARGINS:
                    for name, rule in rules.items():
                        out.append(cell(lib, delta, margin, rule, orders, seed=1000 * i + int(1e4 * margin),
                                        shape=shape, true=true, name=name))
                        c = out[-1]
                        say(f"{shape:26s} N {size:5d} {true:7s} ({delta:+.5f}) margin {margin:g} {name:24s} wrong "
                            f"{c.wrong:.3f} ± {c.wrong_se:.3f}  prompts {c.prompts_median:.0f} ({c.share_median:.0%}), "
                            f"p90 {c.prompts_p90:.0f}")
    return out


def worst_table(cells: list[Cell]) -> str:
    """Per shape and size (the ten Student-t libraries as one row, their worst), per rule: the
    largest wrong share of any cell (true delta and margin) with its standard error."""
    frame = pd.DataFrame([asdict(c) for c in cells])
    frame["family"] = frame["shape"].str.replace(r" #\d+$", " (10 libraries)", regex=True)
    rows = ["| shape | N | " + " | ".join(f"{r}: worst wrong (± SE)" for r in RULES) + " |",
            "|---|---|" + "---|" * len(RULES)]
    for (family, size), group in frame.groupby(["family", "size"], sort=False):
        entries = []
        for rule in RULES:
            g = group[group["rule"] == rule]
            worst = g.loc[g["wrong"].idxmax()]
            entries.append(f"{worst['wrong']:.1%} (± {worst['wrong_se']:.1%})")
        rows.append(f"| {family} | {size} | " + " | ".join(entries) + " |")
    return "\n".join(rows)


def savings_table(cells: list[Cell], shape: str = "demo deltas, sd 0.02", size: int = 1632) -> str:
    frame = pd.DataFrame([asdict(c) for c in cells])
    frame = frame[(frame["shape"] == shape) & (frame["size"] == size)]
    rows = ["| true delta | margin | " + " | ".join(f"{r}: prompts, median (p90)" for r in RULES) + " |",
            "|---|---|" + "---|" * len(RULES)]
    for (true, margin), group in frame.groupby(["true", "margin"], sort=False):
        entries = [f"{g['prompts_median']:.0f} ({g['share_median']:.0%}; p90 {g['prompts_p90']:.0f})"
                   for _, g in group.set_index("rule").loc[list(RULES)].iterrows()]
        rows.append(f"| {true} | {margin:g} | " + " | ".join(entries) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    cells = simulate(args.orders)
    seconds = time.perf_counter() - started
    print(worst_table(cells), savings_table(cells), sep="\n\n")
    if args.out:
        args.out.write_text(json.dumps({
            "orders": args.orders, "alpha": sequential.ALPHA, "seconds": seconds,
            "rules": {name: r.record() for name, r in RULES.items()},
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "numpy": np.__version__, "cells": [asdict(c) for c in cells]}) + "\n")
        args.out.with_suffix(".md").write_text(worst_table(cells) + "\n\n" + savings_table(cells) + "\n")


if __name__ == "__main__":
    main()
