"""The checks and figures that need a GPU, in one process, each section guarded so one failure
does not lose the others. Run by benchmarks/gpu_check.sh on a lent H100/H200; ``--tiny`` runs the
same code on tiny models on the CPU to check the script itself.

1. correctness on CUDA: ``clipeval run`` on the demo (auto dtype → float16), re-scored bit for bit;
2. real-size random SD 1.5 (fp16, 512 px, 20 steps, batch 8): ``clipeval run`` against a plain
   loop (same pipeline, prompts, seeds, batch size, CLIP model; PNGs saved; scored as a user would),
   images/s of each, the ratio, and the GPU busy fraction sampled through NVML;
3. CLIP ViT-L/14-336 scoring: clipeval fp32 and fp16 against torchmetrics, images/s and the
   largest fp16-fp32 score difference on the same images;
4. ``--compile`` on the run of section 2: the cost of compiling, and images/s once compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_score  # noqa: E402

RESULTS: dict = {}
OUT_DIR: Path | None = None
BASELINE_IMG_S: float | None = None


def section(name):
    def wrap(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            print(f"\n=== {name}", flush=True)
            try:
                RESULTS[name] = fn(*args, **kwargs)
            except Exception as err:  # keep going: the other sections still tell something
                traceback.print_exc()
                RESULTS[name] = {"error": f"{type(err).__name__}: {err}"}
            RESULTS[name]["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(RESULTS[name], indent=1), flush=True)
            if OUT_DIR is not None:  # after every section: a timeout later loses nothing
                (OUT_DIR / "gpu_results.json").write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")
        return run
    return wrap


class BusySampler:
    """Mean GPU utilisation (NVML, what nvidia-smi shows) while the block runs."""

    def __init__(self, device_index: int = 0):
        self.samples: list[int] = []
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self.nvml = pynvml
        except Exception:
            pass

    def __enter__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.handle is not None and not self.stop.is_set():
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def busy(self) -> float | None:
        return round(sum(self.samples) / len(self.samples) / 100, 3) if self.samples else None


@section("1 correctness on the device")
def correctness(work: Path, device: str) -> dict:
    from clipeval.rescore import ScoreConfig, score
    from clipeval.runner import RunConfig, run

    out = work / "demo"
    result = run(RunConfig(checkpoint="demo", clip_model="demo", prompt_library="smoke", out=out, device=device,
                           images_per_prompt=2, batch_size=4, progress=False))
    again = score(ScoreConfig(source=out, out=work / "demo-rescored", clip_models=("demo",), device=device, progress=False))
    other = run(RunConfig(checkpoint="demo", clip_model="demo", prompt_library="smoke", out=work / "demo-b1",
                          device=device, images_per_prompt=2, batch_size=1, progress=False))
    diff = (result.scores.clip_score - other.scores.clip_score).abs()
    from PIL import Image
    import numpy as np

    black = sum(int(np.asarray(Image.open(out / p)).max() == 0) for p in result.scores.image)
    return {
        "black_images": black,
        "dtype": result.manifest["settings"]["dtype"],
        "hardware": result.manifest["device"]["hardware"],
        "clip/mean": result.summary["clip/mean"],
        "rescore_identical": bool((again.scores.clip_score == result.scores.clip_score).all()),
        "batch1_vs_batch4_max_abs_score_diff": float(diff.max()),
        "processor": type(__import__("clipeval.score", fromlist=["x"]).ClipScorer("demo", device=device).processor).__name__,
    }


SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, sample_size=64, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def build_sd15(path: Path, tiny: bool) -> Path:
    """SD 1.5's architecture with random weights, saved in float16 (or the tiny demo recipe)."""
    import torch

    from clipeval import demo

    if tiny:
        return demo.build_sd(path)
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = demo.make_tokenizer()
    with torch.device("cuda"):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET).half()
        vae = AutoencoderKL(**SD15_VAE).half()
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77,
                                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id)).half()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(path)
    del unet, vae, text
    torch.cuda.empty_cache()
    return path


def bare_loop(pipe_dir: Path, clip_dir: Path, prompts: list[str], seeds: list[int], *, batch: int, steps: int,
              size: int, device: str, dtype, out: Path) -> tuple[float, list[float]]:
    """What a user would write: the pipeline, PIL images saved as PNG, CLIP scores via the processor."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPProcessor

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    clip = CLIPModel.from_pretrained(clip_dir).to(device).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    out.mkdir(parents=True, exist_ok=True)

    def one_batch(i):
        ps, ss = prompts[i : i + batch], seeds[i : i + batch]
        gens = [torch.Generator("cpu").manual_seed(s) for s in ss]
        images = pipe(ps, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, generator=gens).images
        for j, image in enumerate(images):
            image.save(out / f"{i + j:05d}.png")
        inputs = processor(text=ps, images=images, return_tensors="pt", padding=True, truncation=True).to(device)
        with torch.no_grad():
            logits = clip(**inputs).logits_per_image
        return (logits.diagonal() / clip.logit_scale.exp()).tolist()

    one_batch(0)  # warm-up
    _sync(device)
    start = time.perf_counter()
    scores = []
    for i in range(0, len(prompts), batch):
        scores += one_batch(i)
    _sync(device)
    return time.perf_counter() - start, scores


def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


@section("2 clipeval run vs a plain loop, SD 1.5 size")
def run_vs_bare(work: Path, device: str, tiny: bool, images: int) -> dict:
    import torch

    from clipeval.generate import image_seed
    from clipeval.runner import RunConfig, run

    steps, size, batch = (2, 64, 8) if tiny else (20, 512, 8)
    pipe_dir = build_sd15(work / "sd15", tiny)
    clip_dir = bench_score.build_clip("tiny" if tiny else "l14-336", work / "clip-l")
    library = work / "prompts.txt"
    texts = bench_score.prompts(images)
    library.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n", encoding="utf-8")
    seeds = [image_seed(0, i, 0) for i in range(len(texts))]
    dtype = torch.float32 if device == "cpu" else torch.float16
    with BusySampler() as bare_busy:
        bare_s, bare_scores = bare_loop(pipe_dir, clip_dir, texts, seeds, batch=batch, steps=steps, size=size,
                                        device=device, dtype=dtype, out=work / "bare")
    common = dict(checkpoint=str(pipe_dir), clip_model=str(clip_dir), prompt_library=str(library), device=device,
                  batch_size=batch, steps=steps, height=size, width=size, guidance_scale=7.5, progress=False)
    run(RunConfig(out=work / "warm", limit=batch, **common))  # warm-up, like the plain loop's first batch
    with BusySampler() as ours_busy:
        result = run(RunConfig(out=work / "clipeval", **common))
    loop_s = result.manifest["timings"]["generate_and_score_s"]
    n = len(texts)
    return {
        "images": n, "steps": steps, "size": size, "batch": batch, "dtype": str(dtype),
        "bare_img_s": round(n / bare_s, 3),
        "clipeval_img_s": round(n / loop_s, 3),
        "clipeval_over_bare_time": round(loop_s / bare_s, 3),
        "clipeval_load_s": result.manifest["timings"]["load_s"],
        "clipeval_write_s": result.manifest["timings"]["write_s"],
        "gpu_busy_bare": bare_busy.busy,
        "gpu_busy_clipeval": ours_busy.busy,
        "max_abs_score_diff_vs_bare": max(abs(a - b) for a, b in zip(result.scores.clip_score, bare_scores)),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
    }


@section("3 CLIP ViT-L/14-336 scoring")
def scoring(work: Path, device: str, tiny: bool, prompts: int) -> dict:
    model = work / "clip-l"  # built by section 2; built here if that section failed early
    if not (model / "config.json").is_file():
        bench_score.build_clip("tiny" if tiny else "l14-336", model)
    texts = bench_score.prompts(prompts)
    library = bench_score.write_images(work / "score-images", texts, 4, 512)
    n = len(texts) * 4
    out = {"images": n}
    scores = {}
    for dtype in ("float32", "float16") if device != "cpu" else ("float32", "bfloat16"):
        bench_score.run_clipeval(work / "score-images", library, model, work / f"warm-{dtype}", device=device,
                                 dtype=dtype, preprocess="fast", batch=64)
        seconds, frame = bench_score.run_clipeval(work / "score-images", library, model, work / f"s-{dtype}",
                                                  device=device, dtype=dtype, preprocess="fast", batch=64)
        out[f"clipeval_{dtype}_img_s"] = round(n / seconds, 2)
        scores[dtype] = frame.clip_score
        tm_s, _, per_image = bench_score.run_torchmetrics(work / "score-images", library, model, device=device,
                                                          dtype=dtype, batch=64)
        out[f"torchmetrics_{dtype}_img_s"] = round(n / tm_s, 2)
        out[f"ratio_{dtype}"] = round(tm_s / seconds, 2)
    half = "float16" if device != "cpu" else "bfloat16"
    out["max_abs_half_minus_fp32"] = float((scores[half] - scores["float32"]).abs().max())
    out["mean_abs_half_minus_fp32"] = float((scores[half] - scores["float32"]).abs().mean())
    return out


@section("4 --compile on SD 1.5 size")
def compiled(work: Path, device: str, tiny: bool, images: int) -> dict:
    """The same run as section 2 with --compile: the first run pays the compilation, the timed
    one reuses inductor's cache; compare its loop with section 2's."""
    from clipeval.runner import RunConfig, run

    steps, size, batch = (2, 64, 8) if tiny else (20, 512, 8)
    common = dict(checkpoint=str(work / "sd15"), clip_model=str(work / "clip-l"), prompt_library=str(work / "prompts.txt"),
                  device=device, batch_size=batch, steps=steps, height=size, width=size, guidance_scale=7.5,
                  progress=False, compile=True)
    start = time.perf_counter()
    run(RunConfig(out=work / "compile-warm", limit=batch, **common))
    first = time.perf_counter() - start
    result = run(RunConfig(out=work / "compiled", **common))
    loop_s = result.manifest["timings"]["generate_and_score_s"]
    n = len(result.scores)
    baseline = RESULTS.get("2 clipeval run vs a plain loop, SD 1.5 size", {}).get("clipeval_img_s") or BASELINE_IMG_S
    return {"first_run_with_compilation_s": round(first, 1), "compiled_img_s": round(n / loop_s, 3),
            "uncompiled_img_s_section_2": baseline,
            "speedup": round(n / loop_s / baseline, 3) if baseline else None,
            "load_s_second_run": result.manifest["timings"]["load_s"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: checks the script")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--score-prompts", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true", help="skip section 4 (compilation takes minutes)")
    parser.add_argument("--only-compile", type=float, metavar="IMG_S",
                        help="run section 4 alone, against this uncompiled images/s from an earlier section 2")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    global OUT_DIR
    OUT_DIR = args.out
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    import torch

    from clipeval.pipelines import quiet_hf

    quiet_hf()
    device = "cpu" if args.tiny else "cuda"
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    RESULTS["device"] = {"name": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__,
                         "diffusers": __import__("diffusers").__version__}
    print(RESULTS["device"], flush=True)
    if args.only_compile:
        global BASELINE_IMG_S
        BASELINE_IMG_S = args.only_compile
        build_sd15(work / "sd15", args.tiny)
        bench_score.build_clip("tiny" if args.tiny else "l14-336", work / "clip-l")
        (work / "prompts.txt").write_text("\n".join(t.replace("\n", " ") for t in bench_score.prompts(args.images)) + "\n")
        compiled(work, device, args.tiny, args.images)
    else:
        correctness(work, device)
        run_vs_bare(work, device, args.tiny, args.images)
        scoring(work, device, args.tiny, args.score_prompts)
        if not args.no_compile:
            compiled(work, device, args.tiny, args.images)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_results.json").write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")
    print("\n" + json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
