"""Whole-process scoring benchmark: `clipeval score` (float32 and bfloat16) against torchmetrics'
CLIPScore, each a fresh process timed from start to exit (imports, model load, decoding, scoring),
warmed up once, then >= 3 alternating repeats; median and spread reported, every ratio from this
one invocation. Also the accuracy of half precision against float32 on the same images, and on a
ViT-L/14-336-size model (in-process, fewer images: it is slow on a CPU).

torchmetrics is used as its users use it: CLIPScore built once with its default processor
(``CLIPProcessor.from_pretrained(model)``; with transformers 5 a callable returning (model,
processor) is the only way it takes a local model), batched ``update`` calls, ``compute``.

    python benchmarks/bench_score_process.py --model b32 --prompts 96 --images-per-prompt 4 --json out.json
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

POOLED = r"""class Pooled(torch.nn.Module):  # transformers 5 returns outputs; torchmetrics wants tensors
    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config
    def get_image_features(self, pixel_values):
        return self.inner.get_image_features(pixel_values=pixel_values).pooler_output
    def get_text_features(self, input_ids, attention_mask=None):
        return self.inner.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
"""

TORCHMETRICS = r"""
import json, sys
import numpy as np, torch
from PIL import Image
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

images, library, model_path, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = CLIPModel.from_pretrained(model_path).eval()
processor = CLIPProcessor.from_pretrained(model_path)  # its default processor

POOLED

from pathlib import Path
texts = [json.loads(line)["prompt"] for line in Path(library).read_text(encoding="utf-8").splitlines()]
files = sorted(Path(images).glob("*.png"))
pairs = [(f, texts[int(f.stem.split("_")[0])]) for f in files]
metric = CLIPScore(model_name_or_path=lambda: (Pooled(model), processor))
with torch.inference_mode():
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        imgs = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f, _ in chunk]
        metric.update(imgs, [t for _, t in chunk])
    print(float(metric.compute()))
""".replace("POOLED\n", POOLED)


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{done.stderr[-2000:]}")
    return elapsed


def accuracy(model: Path, images: list, prompts: list[str]) -> dict[str, float]:
    import numpy as np

    from clipeval.score import ClipScorer

    reference, _ = ClipScorer(str(model), dtype="float32").score(images, prompts)
    out = {}
    for dtype in ("bfloat16",):
        scores, _ = ClipScorer(str(model), dtype=dtype).score(images, prompts)
        out[f"max_abs_{dtype}_minus_float32"] = float(np.abs(np.array(scores) - np.array(reference)).max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="b32")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--l14-images", type=int, default=16, help="images for the ViT-L/14-336 accuracy check (0: skip)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import numpy as np
    import pandas as pd
    import torch
    import torchmetrics
    import transformers

    import bench_score
    from clipeval.hub import quiet_hf

    quiet_hf(with_diffusers=False)
    work = Path(tempfile.mkdtemp(prefix="bench-score-process-"))
    model = bench_score.build_clip(args.model, work / "clip")
    texts = bench_score.prompts(args.prompts)
    library = bench_score.write_images(work / "images", texts, args.images_per_prompt, args.size)
    n = len(texts) * args.images_per_prompt
    script = work / "torchmetrics_score.py"
    script.write_text(TORCHMETRICS)
    clipeval = [sys.executable, "-m", "clipeval", "score", str(work / "images"), "--prompts", str(library),
                "--clip-model", str(model), "--batch-size", str(args.batch), "--quiet", "--overwrite"]
    tools = {
        "torchmetrics": [sys.executable, str(script), str(work / "images"), str(library), str(model), str(args.batch)],
        "clipeval_float32": [*clipeval, "--clip-dtype", "float32", "--out", str(work / "fp32")],
        "clipeval_bfloat16": [*clipeval, "--clip-dtype", "bfloat16", "--out", str(work / "bf16")],
    }
    for cmd in tools.values():  # warm-up: page cache, first-run compilation of kernels
        timed(cmd)
    times: dict[str, list[float]] = {name: [] for name in tools}
    for repeat in range(args.repeats):
        names = list(tools) if repeat % 2 == 0 else list(reversed(tools))  # alternate the order
        for name in names:
            times[name].append(timed(tools[name]))
    median = {name: statistics.median(t) for name, t in times.items()}
    fp32 = pd.read_csv(work / "fp32" / "scores.csv")["clip_score"].to_numpy()
    bf16 = pd.read_csv(work / "bf16" / "scores.csv")["clip_score"].to_numpy()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or ''}".rstrip(", "),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "torchmetrics": torchmetrics.__version__},
        "command": " ".join(["python", *sys.argv]),
        "model": args.model, "images": n, "prompts": len(texts), "size": args.size, "batch": args.batch,
        "repeats": args.repeats,
        "seconds": {name: {"median": round(median[name], 2), "min": round(min(t), 2), "max": round(max(t), 2),
                           "all": [round(x, 2) for x in t]} for name, t in times.items()},
        "ratio_vs_torchmetrics": {name: round(median["torchmetrics"] / median[name], 3)
                                  for name in tools if name != "torchmetrics"},
        f"{args.model}_max_abs_bfloat16_minus_float32": float(np.abs(bf16 - fp32).max()),
    }
    if args.l14_images:
        from PIL import Image

        large = bench_score.build_clip("l14-336", work / "l14")
        files = sorted((work / "images").glob("*.png"))[: args.l14_images]
        images = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]
        prompts = [texts[int(f.stem.split("_")[0])] for f in files]
        result["l14-336"] = accuracy(large, images, prompts)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
