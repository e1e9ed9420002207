"""`clipeval run --dtype bfloat16` against float32 on a CPU: what half-precision generation gives a
CI smoke run. Whole processes (imports and model load included), one warm-up each, then >= 3
alternating repeats in this one invocation; median and spread; and how far the images and
scores move.

    python benchmarks/bench_dtype.py --json results/cpu-dtype-DATE.json

Two workloads: the demo (the tiny built-in pipeline on the smoke library: what the README's first
command runs) and bench_run.py's small SD-style pipeline (UNet 64-128-256, 128², 10 steps, 24 prompts),
where the UNet's arithmetic dominates as it does at real sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:6]))} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def differences(a: Path, b: Path) -> dict:
    import numpy as np
    import pandas as pd
    from PIL import Image

    sa, sb = pd.read_csv(a / "scores.csv"), pd.read_csv(b / "scores.csv")
    pixels = [np.abs(np.asarray(Image.open(a / n), int) - np.asarray(Image.open(b / n), int)) for n in sa["image"]]
    return {"max_pixel_levels": int(max(p.max() for p in pixels)), "mean_pixel_levels": round(float(np.mean([p.mean() for p in pixels])), 3),
            "max_abs_score": float((sa.clip_score - sb.clip_score).abs().max()),
            "clip_mean": {"float32": float(sa.clip_score.mean()), "bfloat16": float(sb.clip_score.mean())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    import bench_run

    work = Path(tempfile.mkdtemp(prefix="bench-dtype-"))
    small = bench_run.small_sd(work / "small-sd")
    library = work / "prompts.txt"
    import bench_score

    library.write_text("\n".join(t.replace("\n", " ") for t in bench_score.prompts(24)) + "\n", encoding="utf-8")
    base = [sys.executable, "-m", "clipeval", "run", "--clip-model", "demo", "--quiet", "--overwrite"]
    workloads = {
        "demo_smoke": [*base, "--checkpoint", "demo", "--prompt-library", "smoke"],
        "small_sd_128px_10_steps": [*base, "--checkpoint", str(small), "--prompt-library", str(library), "--steps", "10",
                                    "--height", "128", "--width", "128"],
    }
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or ''}".rstrip(", "),
                    "versions": {"python": platform.python_version(), "torch": torch.__version__},
                    "command": " ".join(["python", *sys.argv]), "repeats": args.repeats}
    for name, cmd in workloads.items():
        runs = {dtype: [*cmd, "--dtype", dtype, "--out", str(work / f"{name}-{dtype}")] for dtype in ("float32", "bfloat16")}
        for run in runs.values():
            timed(run)  # warm-up
        times: dict[str, list[float]] = {d: [] for d in runs}
        for r in range(args.repeats):
            for dtype in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                times[dtype].append(timed(runs[dtype]))
        median = {d: statistics.median(t) for d, t in times.items()}
        result[name] = {"seconds": {d: {"median": round(median[d], 2), "min": round(min(t), 2), "max": round(max(t), 2)}
                                    for d, t in times.items()},
                        "bfloat16_speedup": round(median["float32"] / median["bfloat16"], 3),
                        **differences(work / f"{name}-float32", work / f"{name}-bfloat16")}
        print(name, json.dumps(result[name]), flush=True)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
