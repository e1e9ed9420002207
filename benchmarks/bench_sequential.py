"""How many prompts --until-decided spends, and how often it is wrong, by simulation.

Libraries of 1,632 prompts (Parti's size) are drawn from the per-prompt paired deltas of two real
demo runs (tests/data/demo_deltas.csv), recentred to a chosen true mean delta; each is visited in a
random order, the confidence sequence looked at after every prompt and stopped at its first
decision, exactly as ``clipeval run --until-decided`` does. Reported per case: the share of
libraries decided wrongly, and the prompts used (median, 10th and 90th percentile), against the
whole library a fixed-size evaluation generates.

    python benchmarks/bench_sequential.py --libraries 2000 --out benchmarks/results/sequential-DATE.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from clipeval import sequential

HERE = Path(__file__).resolve().parent
DELTAS = pd.read_csv(HERE.parent / "tests" / "data" / "demo_deltas.csv", comment="#")["delta"].to_numpy()


def simulate(shift: float, margin: float, method: str, libraries: int, population: int, seed: int,
             deltas: np.ndarray = DELTAS) -> dict:
    rng = np.random.default_rng(seed)
    stops, verdicts = [], []
    for _ in range(libraries):
        library = rng.choice(deltas, population)
        library = library - library.mean() + shift
        steps = sequential.decisions(rng.permutation(library), population, margin, method=method)
        k = next((i + 1 for i, v in enumerate(steps) if v is not None), population)
        stops.append(k)
        verdicts.append(steps[k - 1] or "undecided")
    truth = "worse" if shift < -margin else "better" if shift > margin else (
        "no difference larger than the margin" if margin > 0 and abs(shift) < margin else None)
    wrong = [v for v in verdicts if v != "undecided" and v != truth]
    stops = np.array(stops)
    return {
        "method": method, "true_delta": shift, "margin": margin, "libraries": libraries,
        "wrong": len(wrong) / libraries, "wrongly_worse": sum(v == "worse" for v in wrong) / libraries,
        "undecided": verdicts.count("undecided") / libraries,
        "prompts_median": float(np.median(stops)), "prompts_p10": float(np.quantile(stops, 0.1)),
        "prompts_p90": float(np.quantile(stops, 0.9)), "share_median": float(np.median(stops)) / population,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--libraries", type=int, default=2000)
    parser.add_argument("--population", type=int, default=1632)
    parser.add_argument("--sd", type=float, help="Rescale the demo deltas to this spread (their shape kept): the tiny "
                        "models' deltas are far narrower than a real model's")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    deltas = DELTAS if args.sd is None else (DELTAS - DELTAS.mean()) * args.sd / DELTAS.std(ddof=1)
    sd = float(deltas.std(ddof=1))
    mde = (norm.ppf(0.975) + norm.ppf(0.8)) * sd / math.sqrt(args.population)
    cases = [(0.0, 0.0), (-mde, 0.0), (-2 * mde, 0.0), (-4 * mde, 0.0), (0.0, 0.005), (-0.005, 0.005), (-0.01, 0.005),
             (-0.02, 0.005)]
    started = time.perf_counter()
    rows = []
    for method, libraries in (("asymptotic", args.libraries), ("betting", max(200, args.libraries // 10))):
        for i, (shift, margin) in enumerate(cases):
            rows.append(simulate(shift, margin, method, libraries, args.population, seed=i, deltas=deltas))
            r = rows[-1]
            print(f"{method:10s} delta {shift:+.5f} ({shift / mde:+.1f} MDE) margin {margin}: wrong {r['wrong']:.3f} "
                  f"(worse {r['wrongly_worse']:.3f}), undecided {r['undecided']:.2f}, prompts median {r['prompts_median']:.0f} "
                  f"({r['share_median']:.0%}), p10 {r['prompts_p10']:.0f}, p90 {r['prompts_p90']:.0f}", flush=True)
    result = {"population": args.population, "delta_sd": sd, "rescaled": args.sd is not None, "mde": mde, "alpha": sequential.ALPHA,
              "burn_in": sequential.BURN_IN, "rows": rows, "seconds": time.perf_counter() - started,
              "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "numpy": np.__version__}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
