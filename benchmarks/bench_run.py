"""`clipeval run` costs on the CPU, each against a baseline measured in the same invocation.

    python benchmarks/bench_run.py overhead   # clipeval run vs a plain loop, same model/prompts/seeds/batch
    python benchmarks/bench_run.py scaling    # 2 processes (torchrun, gloo) vs 1 process, same run
    python benchmarks/bench_run.py memory     # peak RSS at 100 vs 1632 prompts (Parti)
    python benchmarks/bench_run.py startup    # `clipeval --help` vs `python -c pass`

The model is a small random SD-style pipeline (UNet 64-128-256 channels, 128x128 images) where,
as on real hardware, generation dominates; CLIP is the tiny test model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def small_sd(path: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from clipeval.demo import make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(64, 128, 256), layers_per_block=2, sample_size=32,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 64, 128), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(path)
    return path


def machine() -> dict:
    import diffusers
    import torch
    import transformers

    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or ''}".strip(", "),
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def library(work: Path, n: int) -> Path:
    from bench_score import prompts

    path = work / "prompts.txt"
    path.write_text("\n".join(p.replace("\n", " ") for p in prompts(n)) + "\n", encoding="utf-8")
    return path


def overhead(work: Path, images: int, steps: int, batch: int, repeats: int) -> dict:
    import torch

    from clipeval.demo import build_clip
    from clipeval.generate import image_seed
    from clipeval.runner import RunConfig, run
    from gpu_check import bare_loop

    model, clip = small_sd(work / "sd"), build_clip(work / "clip")
    lib = library(work, images)
    texts = lib.read_text(encoding="utf-8").splitlines()
    seeds = [image_seed(0, i, 0) for i in range(len(texts))]
    common = dict(checkpoint=str(model), clip_model=str(clip), prompt_library=str(lib), device="cpu",
                  batch_size=batch, steps=steps, height=128, width=128, guidance_scale=7.5, progress=False)
    run(RunConfig(out=work / "warm", limit=batch, **common))
    bare_times, ours = [], []
    for r in range(repeats):  # interleaved, so drift in the machine hits both alike
        seconds, _ = bare_loop(model, clip, texts, seeds, batch=batch, steps=steps, size=128, device="cpu",
                               dtype=torch.float32, out=work / f"bare{r}")
        bare_times.append(seconds)
        result = run(RunConfig(out=work / f"ours{r}", **common))
        ours.append(result.manifest["timings"]["generate_and_score_s"])
    bare, mine = statistics.median(bare_times), statistics.median(ours)
    return {"images": len(texts), "steps": steps, "batch": batch, "size": 128, "repeats": repeats,
            "bare_loop_s": round(bare, 3), "clipeval_loop_s": round(mine, 3),
            "bare_img_s": round(len(texts) / bare, 3), "clipeval_img_s": round(len(texts) / mine, 3),
            "ratio_clipeval_over_bare": round(mine / bare, 3),
            "all_bare_s": [round(t, 3) for t in bare_times], "all_clipeval_s": [round(t, 3) for t in ours]}


def _clipeval_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "clipeval", *map(str, args)]


def _wall(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def scaling(work: Path, images: int, steps: int, batch: int) -> dict:
    from clipeval.demo import build_clip

    model, clip = small_sd(work / "sd"), build_clip(work / "clip")
    lib = library(work, images)
    args = ["run", "--checkpoint", model, "--clip-model", clip, "--prompt-library", lib, "--steps", steps,
            "--height", 128, "--width", 128, "--batch-size", batch, "--quiet"]
    one = _wall(_clipeval_cmd(*args, "--out", work / "one"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "clipeval"]
    two = _wall(torchrun + [str(a) for a in args] + ["--out", str(work / "two")])
    return {"images": images, "steps": steps, "batch": batch, "one_process_s": round(one, 2),
            "two_processes_s": round(two, 2), "speedup": round(one / two, 3),
            "note": "wall time of the whole command, model loading included; 1 process uses both cores through "
                    "torch's intra-op threads, the 2 processes one thread each"}


def memory(work: Path) -> dict:
    shared = HERE.parent.parent / "shared" / "data"
    env = {"CLIPEVAL_LIBRARY_MIRROR": str(shared)} if shared.is_dir() else {}
    out = {}
    for limit in (100, 1632):
        probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
                 "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        cmd = [sys.executable, "-c", probe, *_clipeval_cmd(
            "run", "--checkpoint", "demo", "--clip-model", "demo", "--prompt-library", "parti", "--limit", limit,
            "--steps", 1, "--batch-size", 16, "--quiet", "--out", work / f"mem{limit}")]
        start = time.perf_counter()
        rss_kb = int(subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **env}).stdout)
        out[f"peak_rss_mb_{limit}_prompts"] = round(rss_kb / 1024, 1)
        out[f"wall_s_{limit}_prompts"] = round(time.perf_counter() - start, 1)
    out["ratio_1632_over_100"] = round(out["peak_rss_mb_1632_prompts"] / out["peak_rss_mb_100_prompts"], 3)
    return out


def startup(repeats: int) -> dict:
    def best(cmd):
        times = [_wall(cmd) for _ in range(repeats)]
        return min(times), statistics.median(times)

    python = best([sys.executable, "-c", "pass"])
    help_ = best([shutil.which("clipeval") or "clipeval", "--help"])
    libraries = best([shutil.which("clipeval") or "clipeval", "libraries"])
    return {"python_c_pass_s": [round(t, 3) for t in python], "clipeval_help_s": [round(t, 3) for t in help_],
            "clipeval_libraries_s": [round(t, 3) for t in libraries],
            "help_over_python_median": round(help_[1] / python[1], 2), "fields": "[best, median] of %d runs" % repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["overhead", "scaling", "memory", "startup", "all"])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from clipeval.pipelines import quiet_hf

    quiet_hf()
    work = Path(tempfile.mkdtemp(prefix="bench-run-"))
    os.environ.setdefault("CLIPEVAL_CACHE_DIR", str(work / "cache"))
    results = {"command": " ".join(["python", *sys.argv]), **machine()}
    todo = ["overhead", "scaling", "memory", "startup"] if args.what == "all" else [args.what]
    for what in todo:
        print(f"== {what}", flush=True)
        if what == "overhead":
            results[what] = overhead(work / what, args.images, args.steps, args.batch, args.repeats)
        elif what == "scaling":
            results[what] = scaling(work / what, args.images, args.steps, args.batch)
        elif what == "memory":
            results[what] = memory(work / what)
        else:
            results[what] = startup(max(args.repeats, 5))
        print(json.dumps(results[what], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
