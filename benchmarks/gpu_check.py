"""The checks and figures that need a GPU, in one process, each section guarded so one failure
does not lose the others, and each skipped when the time left (``--budget``) cannot hold it.
Run by benchmarks/gpu_check.sh on a lent H100/H200; ``--tiny`` runs the same code on tiny
models on the CPU to check the script itself.

0. the card: name, versions, a measured fp16 matrix-product rate, the datasheet dense peak;
1. SD 1.5 size (512², 20 steps, CFG 7.5, random fp16 weights):
   - FLOPs per image counted by torch's FlopCounterMode (UNet x steps x 2 for CFG, text, VAE);
   - the UNet and VAE alone (CUDA events), with and without clipeval's speed-ups;
   - ``--batch-size auto``: the size it settles on;
   - >= 3 alternating repeats of: a plain diffusers loop as its users write it, ``clipeval run``
     at batch 8, the same with fused QKV + channels-last (the usual advice; measured slower on an
     H200, so not clipeval's default), and at the size auto found; images/s, MFU
     (achieved FLOP/s over the card's dense peak), GPU busy (NVML), largest pixel difference;
2. CLIP ViT-L/14-336 scoring from 512² PNGs: clipeval fp16 and fp32 against torchmetrics'
   CLIPScore with its defaults (fp32, its default processor), each timed with its model load,
   warmed up, >= 3 alternating repeats; fp16 - fp32 score difference on L/14-336 and B/32;
3. SDXL size (1024², 20 steps, CFG) and 4. a Flux-size transformer (1024², 28 steps): FLOPs,
   the denoiser and VAE alone, MFU and the images/s they bound;
5. ``--compile`` against the uncompiled runs of section 1 (same invocation, same batch);
6. host memory of ``clipeval run`` at 100 and 1632 prompts on the SD 1.5-size pipeline;
7. what is left open, on the parts: the VAE decode on a side stream beside the UNet, compile modes;
8. VQAScore on a 7B-size vision-language model (random bf16 weights: Qwen2.5-VL-7B's language model
   and vision-tower sizes in the SmolVLM architecture, 448² images, 256 image tokens; see
   bench_vqa.SIZES) beside CLIP ViT-L/14-336 fp16: img/s at batches 8 and 32, FLOPs per image
   (FlopCounterMode), MFU, against the same model called the plain way (processor +
   ``generate(max_new_tokens=1)`` per image), >= 3 alternating repeats, largest score difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_score  # noqa: E402
import bench_score_process  # noqa: E402
import bench_vqa  # noqa: E402

RESULTS: dict = {}
OUT_DIR: Path | None = None
DEADLINE = float("inf")
DENSE_PEAK = {"H100": 989.4e12, "H200": 989.4e12}  # fp16/bf16 dense, SXM datasheets


def section(name, cost_s: float):
    """Run the section if ``cost_s`` (its expected seconds) fits before the deadline."""
    def wrap(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            print(f"\n=== {name}", flush=True)
            if time.monotonic() + cost_s > DEADLINE:
                RESULTS[name] = {"skipped": f"needs ~{cost_s:.0f} s, {DEADLINE - time.monotonic():.0f} s left"}
            else:
                try:
                    RESULTS[name] = fn(*args, **kwargs)
                except Exception as err:  # keep going: the other sections still tell something
                    traceback.print_exc()
                    RESULTS[name] = {"error": f"{type(err).__name__}: {err}"}
            RESULTS[name]["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(RESULTS[name], indent=1, default=str), flush=True)
            save()
        return run
    return wrap


def save() -> None:
    if OUT_DIR is not None:  # after every section: a timeout later loses nothing
        (OUT_DIR / "gpu_results.json").write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")


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


def sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` (CUDA events on the GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if str(device).startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "all": [round(v, 3) for v in values]}


def peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in DENSE_PEAK.items() if k in name), None)


# ---------------------------------------------------------------------------------------------
@section("0 the card", 20)
def card(device: str) -> dict:
    import torch

    out = {"name": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "diffusers": __import__("diffusers").__version__,
           "cpu_count": os.cpu_count(), "datasheet_dense_fp16_tflops": (peak_flops() or 0) / 1e12}
    if device == "cuda":
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.float16)
        b = torch.randn(n, n, device=device, dtype=torch.float16)
        seconds = timed(lambda: a @ b, device, repeats=10, warmup=3)
        out["measured_fp16_matmul_tflops"] = round(2 * n**3 / seconds / 1e12, 1)
        out["memory_gb"] = round(torch.cuda.mem_get_info()[1] / 2**30, 1)
    return out


SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, sample_size=64, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


def speed_up(pipe, *, device_types: tuple[str, ...] = ("cuda",)) -> list[str]:
    """Fused QKV projections where diffusers offers them (one matmul instead of three) and
    channels-last UNet and VAE convolutions: the usual advice, measured here. On the H200 in
    fp16 without compile they made the UNet and VAE slower (results/gpu-2026-11-28-h200.json),
    so clipeval does not apply them; --compile keeps channels-last."""
    import torch

    applied: list[str] = []
    if str(pipe.device).split(":")[0] not in device_types:
        return applied
    for name in ("unet", "transformer", "vae"):
        module = getattr(pipe, name, None)
        if module is None or not callable(getattr(module, "fuse_qkv_projections", None)):
            continue
        try:
            module.fuse_qkv_projections()
            applied.append(f"{name}: fused qkv")
        except (ValueError, NotImplementedError, AttributeError):  # added KV projections, custom processors
            pass
    for name in ("unet", "vae"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module) and any(isinstance(m, torch.nn.Conv2d) for m in module.modules()):
            module.to(memory_format=torch.channels_last)
            applied.append(f"{name}: channels-last")
    return applied


def _sped_up(pipe):
    speed_up(pipe, device_types=("cuda", "cpu"))
    return pipe


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
        vae = AutoencoderKL(**VAE).half()
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


def unet_inputs(unet, batch: int, latent: int, context: int, device, dtype, xl: bool = False):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    inputs = dict(sample=torch.randn(batch, unet.config.in_channels, latent, latent, generator=g).to(device, dtype),
                  timestep=torch.tensor(500, device=device),
                  encoder_hidden_states=torch.randn(batch, 77, context, generator=g).to(device, dtype))
    if xl:
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=g).to(device, dtype),
                                       "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch).to(device, dtype)}
    return inputs


def denoiser_figures(unet, vae, *, batch: int, latent: int, context: int, steps: int, device, dtype, xl=False) -> dict:
    """FLOPs per image (CFG doubles the UNet batch) and the UNet/VAE times at ``batch`` images."""
    import torch

    with torch.inference_mode():
        one = unet_inputs(unet, 2, latent, context, device, dtype, xl)
        unet_flops = flops(lambda: unet(**one))
        z1 = torch.randn(1, vae.config.latent_channels, latent, latent, device=device, dtype=dtype)
        vae_flops = flops(lambda: vae.decode(z1))
        many = unet_inputs(unet, 2 * batch, latent, context, device, dtype, xl)
        unet_s = timed(lambda: unet(**many), device)
        z = torch.randn(batch, vae.config.latent_channels, latent, latent, device=device, dtype=dtype)
        vae_s = timed(lambda: vae.decode(z), device, repeats=3, warmup=1)
    per_image = steps * unet_flops + vae_flops
    seconds_per_image = (steps * unet_s + vae_s) / batch
    peak = peak_flops()
    return {"batch": batch, "unet_tflop_per_cfg_step": round(unet_flops / 1e12, 3), "vae_decode_tflop": round(vae_flops / 1e12, 3),
            "tflop_per_image": round(per_image / 1e12, 2), "unet_ms": round(unet_s * 1e3, 2), "vae_ms": round(vae_s * 1e3, 2),
            "vae_share": round(vae_s / (steps * unet_s + vae_s), 3),
            "bound_img_s": round(1 / seconds_per_image, 2),
            "mfu": round(per_image / seconds_per_image / peak, 3) if peak else None}


def bare_loop(pipe_dir: Path, clip_dir: Path, prompts: list[str], seeds: list[int], *, batch: int, steps: int,
              size: int, device: str, dtype, out: Path) -> tuple[float, list[float]]:
    """What a user would write: the pipeline, PIL images saved as PNG, CLIP scores via the default processor."""
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
    sync(device)
    start = time.perf_counter()
    scores = []
    for i in range(0, len(prompts), batch):
        scores += one_batch(i)
    sync(device)
    return time.perf_counter() - start, scores


def pixels(folder: Path):
    import numpy as np
    from PIL import Image

    return np.stack([np.asarray(Image.open(f)) for f in sorted(folder.glob("*.png"))]).astype(np.int16)


@section("1 SD 1.5 size: MFU, speed-ups, batch growth, clipeval vs a plain loop", 240)
def sd15(work: Path, device: str, tiny: bool, images: int, repeats: int) -> dict:
    import torch

    from clipeval import pipelines
    from clipeval.generate import image_seed
    from clipeval.runner import RunConfig, run

    steps, size = (2, 64) if tiny else (20, 512)
    dtype = torch.float32 if device == "cpu" else torch.float16
    pipe_dir = build_sd15(work / "sd15", tiny)
    clip_dir = bench_score.build_clip("tiny" if tiny else "l14-336", work / "clip-l")
    out: dict = {"steps": steps, "size": size, "images_per_run": images, "dtype": str(dtype)}

    # Components alone: FLOPs, and the UNet/VAE time with and without the speed-ups.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, torch_dtype=dtype).to(device)
    latent, context = size // 8, pipe.unet.config.cross_attention_dim
    for batch in (8, 32):
        out[f"components_b{batch}"] = denoiser_figures(pipe.unet, pipe.vae, batch=batch, latent=latent, context=context,
                                                       steps=steps, device=device, dtype=dtype)
    out["speed_ups_applied"] = speed_up(pipe, device_types=("cuda", "cpu"))
    for batch in (8, 32):
        out[f"components_b{batch}_sped_up"] = denoiser_figures(pipe.unet, pipe.vae, batch=batch, latent=latent,
                                                               context=context, steps=steps, device=device, dtype=dtype)
    per_image = out["components_b8"]["tflop_per_image"] * 1e12
    del pipe
    torch.cuda.empty_cache() if device == "cuda" else None

    library = work / "prompts.txt"
    texts = bench_score.prompts(max(images, 160))
    library.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n", encoding="utf-8")
    common = dict(checkpoint=str(pipe_dir), clip_model=str(clip_dir), prompt_library=str(library), device=device,
                  steps=steps, height=size, width=size, guidance_scale=7.5, progress=False)

    # --batch-size auto, on enough images to grow: what does it settle on?
    result = run(RunConfig(out=work / "auto", limit=160, batch_size="auto", **common))
    chosen = result.manifest["timings"]["images_per_generation_call"]
    out["auto"] = {"settled_on": chosen, "img_s_160_including_growth": round(160 / result.manifest["timings"]["generate_and_score_s"], 3)}

    seeds = [image_seed(0, i, 0) for i in range(images)]
    variants = {
        "plain_loop_b8": None,
        "clipeval_b8": dict(batch_size=8, speed_up=False),
        "clipeval_b8_fused_channels_last": dict(batch_size=8, speed_up=True),
        f"clipeval_b{chosen}_auto": dict(batch_size=chosen, speed_up=False),
    }
    # (The auto run above was the warm-up, like the plain loop's first batch.)
    img_s: dict[str, list[float]] = {k: [] for k in variants}
    busy: dict[str, list[float]] = {k: [] for k in variants}
    folders: dict[str, Path] = {}
    for r in range(repeats):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            spec = variants[name]
            folder = work / f"{name}-{r}"
            folders[name] = folder
            with BusySampler() as sampler:
                if spec is None:
                    seconds, _ = bare_loop(pipe_dir, clip_dir, texts[:images], seeds, batch=8, steps=steps, size=size,
                                           device=device, dtype=dtype, out=folder / "images")
                else:
                    load = pipelines.load_pipeline
                    if spec["speed_up"]:
                        pipelines.load_pipeline = lambda *a, **k: _sped_up(load(*a, **k))
                    try:
                        res = run(RunConfig(out=folder, limit=images, batch_size=spec["batch_size"], **common))
                    finally:
                        pipelines.load_pipeline = load
                    seconds = res.manifest["timings"]["generate_and_score_s"]
            img_s[name].append(images / seconds)
            if sampler.busy is not None:
                busy[name].append(sampler.busy)
            print(f"  {name}: {images / seconds:.2f} img/s, busy {sampler.busy}", flush=True)
    peak = peak_flops()
    out["runs"] = {name: {"img_s": spread(v), "gpu_busy": spread(busy[name]) if busy[name] else None,
                          "mfu": round(statistics.median(v) * per_image / peak, 3) if peak else None}
                   for name, v in img_s.items()}
    base = statistics.median(img_s["plain_loop_b8"])
    out["ratio_to_plain_loop"] = {name: round(statistics.median(v) / base, 3) for name, v in img_s.items()}
    reference = pixels(folders["clipeval_b8"] / "images")
    diffs = {name: abs(pixels(folders[name] / "images") - reference) for name in variants if name != "clipeval_b8"}
    out["max_pixel_diff_vs_clipeval_b8"] = {name: int(d.max()) for name, d in diffs.items()}
    out["mean_pixel_diff_vs_clipeval_b8"] = {name: round(float(d.mean()), 4) for name, d in diffs.items()}
    RESULTS["_sd15"] = {"img_s_b8": statistics.median(img_s["clipeval_b8"]), "tflop_per_image": per_image / 1e12}
    return out


TORCHMETRICS = r"""
import json, sys, time
import numpy as np, torch
from PIL import Image
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor
from pathlib import Path

images, library, model_path, batch, device = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
texts = [json.loads(line)["prompt"] for line in Path(library).read_text(encoding="utf-8").splitlines()]
files = sorted(Path(images).glob("*.png"))
pairs = [(f, texts[int(f.stem.split("_")[0])]) for f in files]

POOLED

def once():
    model = CLIPModel.from_pretrained(model_path).eval()  # its defaults: float32, its default processor
    processor = CLIPProcessor.from_pretrained(model_path)
    metric = CLIPScore(model_name_or_path=lambda: (Pooled(model), processor)).to(device)
    with torch.inference_mode():
        for i in range(0, len(pairs), batch):
            chunk = pairs[i:i + batch]
            imgs = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1).to(device) for f, _ in chunk]
            metric.update(imgs, [t for _, t in chunk])
        value = float(metric.compute())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return value

once()  # warm-up, like clipeval's
for line in sys.stdin:  # one timed call per line: the ratio's repeats alternate with clipeval's
    start = time.perf_counter()
    once()
    print(time.perf_counter() - start, flush=True)
""".replace("POOLED\n", bench_score_process.POOLED)


@section("2 CLIP ViT-L/14-336 scoring from PNGs", 80)
def scoring(work: Path, device: str, tiny: bool, prompts: int, repeats: int) -> dict:
    import torch

    from clipeval.rescore import ScoreConfig, score

    model = work / "clip-l"
    if not (model / "config.json").is_file():
        bench_score.build_clip("tiny" if tiny else "l14-336", model)
    texts = bench_score.prompts(prompts)
    library = bench_score.write_images(work / "score-images", texts, 4, 512)
    n = len(texts) * 4
    half = "float16" if device != "cpu" else "bfloat16"

    def clipeval(dtype, name, model=model):
        start = time.perf_counter()
        result = score(ScoreConfig(source=work / "score-images", out=work / name, prompts=str(library),
                                   clip_models=(str(model),), device=device, clip_dtype=dtype, batch_size=64,
                                   progress=False, overwrite=True))
        sync(device)
        return time.perf_counter() - start, result.scores.clip_score

    script = work / "tm.py"
    script.write_text(TORCHMETRICS)
    tm = subprocess.Popen([sys.executable, str(script), str(work / "score-images"), str(library), str(model), "64", device],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    clipeval(half, "warm")
    times: dict[str, list[float]] = {"torchmetrics_defaults": [], f"clipeval_{half}": [], "clipeval_float32": []}
    scores = {}
    for r in range(repeats):
        for name in (list(times) if r % 2 == 0 else list(reversed(times))):
            if name == "torchmetrics_defaults":  # its process is warm; it times one call per request
                tm.stdin.write("go\n")
                tm.stdin.flush()
                times[name].append(float(tm.stdout.readline()))
            else:
                dtype = name.split("_")[1]
                seconds, scores[dtype] = clipeval(dtype, name)
                times[name].append(seconds)
    tm.stdin.close()
    tm.wait()
    out = {"images": n, "prompts": len(texts), "timed_with_model_load": True,
           "img_s": {k: spread([n / t for t in v]) for k, v in times.items()},
           "ratio_to_torchmetrics": {k: round(statistics.median(times["torchmetrics_defaults"]) / statistics.median(v), 2)
                                     for k, v in times.items() if k != "torchmetrics_defaults"}}
    # The scorer alone, model loaded: what the loop does per image.
    from clipeval.score import ClipScorer
    import numpy as np
    from PIL import Image

    scorer = ClipScorer(str(model), device=device, dtype=half)
    files = sorted((work / "score-images").glob("*.png"))
    imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(f))).permute(2, 0, 1) for f in files[:64]]).to(device)
    out["model_only_img_s_b64"] = round(64 / timed(lambda: scorer.embed_images(imgs), device), 1)
    t0 = time.perf_counter()
    scorer.prepare(texts)
    sync(device)
    out["text_prompts_per_s"] = round(len(texts) / (time.perf_counter() - t0), 1)
    t0 = time.perf_counter()
    from clipeval.decode import load_rgb
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(load_rgb, files))
    out["png_decode_img_s_all_threads"] = round(len(files) / (time.perf_counter() - t0), 1)
    out[f"max_abs_{half}_minus_fp32_l14"] = float((scores[half] - scores["float32"]).abs().max())
    b32 = bench_score.build_clip("tiny" if tiny else "b32", work / "clip-b32")
    _, b32_half = clipeval(half, "b32-half", model=b32)
    _, b32_full = clipeval("float32", "b32-full", model=b32)
    out[f"max_abs_{half}_minus_fp32_b32"] = float((b32_half - b32_full).abs().max())
    return out


@section("3 SDXL size: MFU of the UNet and VAE", 40)
def sdxl(device: str, tiny: bool) -> dict:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    dtype = torch.float32 if tiny else torch.float16
    unet_config, vae_config, latent = SDXL_UNET, {**VAE, "sample_size": 1024}, 128
    if tiny:  # the same code on a small model
        unet_config = {**SDXL_UNET, "block_out_channels": (32, 64, 64), "transformer_layers_per_block": (1, 1, 2),
                       "attention_head_dim": (2, 4, 4), "norm_num_groups": 16}
        vae_config, latent = {**VAE, "block_out_channels": (16, 16, 32, 32), "norm_num_groups": 8}, 16
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_config).to(dtype).eval()
        vae = AutoencoderKL(**vae_config).to(dtype).eval()
    out = {"params_unet_b": round(sum(p.numel() for p in unet.parameters()) / 1e9, 2), "steps": 20, "size": latent * 8}
    out["b4"] = denoiser_figures(unet, vae, batch=4, latent=latent, context=2048, steps=20, device=device, dtype=dtype, xl=True)

    class Holder:
        pass

    holder = Holder()
    holder.unet, holder.vae, holder.device = unet, vae, torch.device(device)
    out["speed_ups_applied"] = speed_up(holder)
    out["b4_sped_up"] = denoiser_figures(unet, vae, batch=4, latent=latent, context=2048, steps=20, device=device, dtype=dtype,
                                         xl=True)
    del unet, vae
    torch.cuda.empty_cache() if device == "cuda" else None
    return out


@section("4 Flux-size transformer: MFU", 40)
def flux(device: str, tiny: bool) -> dict:
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    dtype = torch.bfloat16
    config, vae_config, side, text, width = {}, {**VAE, "latent_channels": 16, "sample_size": 1024}, 128, 512, 4096
    if tiny:  # the same code on a small model
        config = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                      pooled_projection_dim=768, axes_dims_rope=(4, 6, 6))
        vae_config, side, text, width = {**vae_config, "block_out_channels": (16, 16, 32, 32), "norm_num_groups": 8}, 16, 16, 32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16: 12B parameters, 24 GB
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = FluxTransformer2DModel(guidance_embeds=True, **config).eval()
            vae = AutoencoderKL(**vae_config).eval()
    finally:
        torch.set_default_dtype(previous)
    steps, tokens = 28, (side // 2) ** 2
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, tokens, 64, generator=g).to(device, dtype),
                  encoder_hidden_states=torch.randn(1, text, width, generator=g).to(device, dtype),
                  pooled_projections=torch.randn(1, 768, generator=g).to(device, dtype),
                  timestep=torch.tensor([0.5], device=device, dtype=dtype),
                  img_ids=torch.zeros(tokens, 3, device=device, dtype=dtype),
                  txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
                  guidance=torch.tensor([3.5], device=device, dtype=dtype), return_dict=False)
    out = {"params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 2), "steps": steps, "size": side * 8, "batch": 1}
    with torch.inference_mode():
        step_flops = flops(lambda: model(**inputs))
        step_s = timed(lambda: model(**inputs), device, repeats=3, warmup=1)
        z = torch.randn(1, 16, side, side, device=device, dtype=dtype)
        vae_flops = flops(lambda: vae.decode(z))
        vae_s = timed(lambda: vae.decode(z), device, repeats=3, warmup=1)
    peak = peak_flops()
    per_image, seconds = steps * step_flops + vae_flops, steps * step_s + vae_s
    out.update(tflop_per_step=round(step_flops / 1e12, 2), step_ms=round(step_s * 1e3, 1), vae_ms=round(vae_s * 1e3, 1),
               transformer_mfu=round(step_flops / step_s / peak, 3) if peak else None,
               mfu=round(per_image / seconds / peak, 3) if peak else None, bound_img_s=round(1 / seconds, 3))
    del model, vae
    torch.cuda.empty_cache() if device == "cuda" else None
    return out


@section("5 --compile against uncompiled, same invocation", 100)
def compiled(work: Path, device: str, tiny: bool, images: int) -> dict:
    from clipeval.runner import RunConfig, run

    steps, size = (2, 64) if tiny else (20, 512)
    common = dict(checkpoint=str(work / "sd15"), clip_model=str(work / "clip-l"), prompt_library=str(work / "prompts.txt"),
                  device=device, batch_size=8, steps=steps, height=size, width=size, guidance_scale=7.5,
                  progress=False, compile=True)
    start = time.perf_counter()
    run(RunConfig(out=work / "compile-warm", limit=8, **common))
    first = time.perf_counter() - start
    result = run(RunConfig(out=work / "compiled", limit=images, **common))
    loop_s = result.manifest["timings"]["generate_and_score_s"]
    baseline = RESULTS.get("_sd15", {}).get("img_s_b8")
    return {"first_run_with_compilation_s": round(first, 1), "compiled_img_s": round(images / loop_s, 3),
            "uncompiled_img_s_same_invocation": round(baseline, 3) if baseline else None,
            "speedup": round(images / loop_s / baseline, 3) if baseline else None,
            "mfu": round(images / loop_s * RESULTS["_sd15"]["tflop_per_image"] * 1e12 / peak_flops(), 3)
            if baseline and peak_flops() else None}


@section("6 host memory at 100 and 1632 prompts, SD 1.5-size pipeline", 80)
def memory(work: Path, device: str, tiny: bool) -> dict:
    import psutil

    library = work / "many.txt"
    library.write_text("".join(f"a photo of object number {i} on a table, studio lighting\n" for i in range(1632)))
    # Tiny (a CPU check of this script): the same runs, smaller, or 1,632 images take an hour.
    small, large, size, batch = (20, 80, 64, 4) if tiny else (100, 1632, 256, 16)
    out = {"steps": 1, "size": size, "batch": batch, "prompts": [small, large]}
    for count in (small, large):
        cmd = [sys.executable, "-m", "clipeval", "run", "--checkpoint", str(work / "sd15"), "--clip-model", str(work / "clip-l"),
               "--prompt-library", str(library), "--limit", str(count), "--steps", "1", "--height", str(size),
               "--width", str(size), "--batch-size", str(batch), "--device", device, "--out", str(work / f"mem-{count}"),
               "--quiet"]
        start = time.perf_counter()
        child = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        peak = 0
        while child.poll() is None:
            try:
                peak = max(peak, child.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
        if child.returncode != 0:
            raise RuntimeError(child.stderr.read().decode()[-1500:])
        out[f"peak_rss_mb_{count}"] = round(peak / 2**20, 1)
        out[f"seconds_{count}"] = round(time.perf_counter() - start, 1)
    out["ratio"] = round(out[f"peak_rss_mb_{large}"] / out[f"peak_rss_mb_{small}"], 3)
    return out


@section("7 next steps, parts only: VAE decode beside the UNet; compile modes", 150)
def next_steps(work: Path, device: str, tiny: bool) -> dict:
    """What the 2026-11-28 run left open, measured on the SD 1.5-size UNet and VAE alone:
    - would decoding batch i on a side stream while the UNet denoises batch i+1 pay? (20 UNet steps
      then a decode, in sequence, against the decode on a second stream during the steps);
    - torch.compile modes on the UNet: compile time and ms per step (default,
      max-autotune-no-cudagraphs, reduce-overhead = CUDA graphs)."""
    import torch
    from diffusers import StableDiffusionPipeline

    steps, size, batch = (2, 64, 8) if tiny else (20, 512, 8)
    dtype = torch.float32 if device == "cpu" else torch.float16
    if not (work / "sd15" / "model_index.json").is_file():
        build_sd15(work / "sd15", tiny)
    pipe = StableDiffusionPipeline.from_pretrained(work / "sd15", torch_dtype=dtype).to(device)
    unet, vae = pipe.unet, pipe.vae
    latent, context = size // 8, unet.config.cross_attention_dim
    inputs = unet_inputs(unet, 2 * batch, latent, context, device, dtype)
    z = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
    out: dict = {"batch": batch}
    with torch.inference_mode():
        def sequential():
            for _ in range(steps):
                unet(**inputs)
            vae.decode(z)

        def overlapped():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                vae.decode(z)  # the previous batch's decode
            for _ in range(steps):
                unet(**inputs)
            torch.cuda.current_stream().wait_stream(side)

        out["sequential_ms"] = round(timed(sequential, device, repeats=3, warmup=1) * 1e3, 1)
        if device == "cuda":
            out["vae_on_side_stream_ms"] = round(timed(overlapped, device, repeats=3, warmup=1) * 1e3, 1)
            out["overlap_gain"] = round(out["sequential_ms"] / out["vae_on_side_stream_ms"], 3)
        eager = timed(lambda: unet(**inputs), device)
        out["unet_eager_ms"] = round(eager * 1e3, 2)
        for mode in ("default", "max-autotune-no-cudagraphs", "reduce-overhead"):
            if time.monotonic() + 60 > DEADLINE:
                out[mode] = "skipped: time"
                continue
            torch._dynamo.reset()
            # Tiny (a CPU check of this script): the eager backend, seconds instead of minutes.
            kwargs = {"backend": "eager"} if tiny else {"mode": None if mode == "default" else mode}
            compiled = torch.compile(unet, **kwargs)
            start = time.perf_counter()
            compiled(**inputs)
            sync(device)
            first = time.perf_counter() - start
            ms = timed(lambda: compiled(**inputs), device) * 1e3
            out[mode] = {"compile_s": round(first, 1), "unet_ms": round(ms, 2), "speedup": round(eager * 1e3 / ms, 3)}
    return out


@section("8 VQAScore: a 7B-size VLM beside CLIP ViT-L/14-336", 300)
def vqa(work: Path, device: str, tiny: bool, repeats: int) -> dict:
    import torch

    from clipeval.score import ClipScorer
    from clipeval.vqa import VqaScorer

    half = "bfloat16" if device != "cpu" else "float32"
    t0 = time.perf_counter()
    path = bench_vqa.build(work / "vlm", "tiny" if tiny else "7b", device=device)
    built_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scorer = VqaScorer(str(path), device=device, dtype=half)
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(32, 3, 512, 512, generator=g) * 255).to(torch.uint8).to(device)
    words = "a photo of a red cube on the table with a cat and a dog at night in the city".split()
    prompts = [" ".join(words[: 3 + i % 12]) for i in range(32)]
    peak = peak_flops()
    per_image = flops(lambda: scorer.score(images[:1], prompts[:1]))
    out = {"model": "Idefics3 architecture, Qwen2.5-VL-7B sizes (bench_vqa.SIZES['7b'])" if not tiny else "tiny",
           "dtype": half, "build_s": round(built_s, 1), "load_s": round(load_s, 1), "flops_per_image": per_image,
           "parameters": sum(p.numel() for p in scorer.model.parameters())}
    for batch in (8, 32):
        seconds = timed(lambda: scorer.score(images[:batch], prompts[:batch]), device, repeats=max(3, repeats), warmup=1)
        out[f"clipeval_img_s_b{batch}"] = round(batch / seconds, 2)
        if peak:
            out[f"clipeval_mfu_b{batch}"] = round(per_image * batch / seconds / peak, 4)
    # The plain way, alternating with clipeval at batch 8 over the same 16 images.
    baseline = bench_vqa.plain(path, device=device, dtype=half)
    runs = {"clipeval_b8": lambda: [v for i in range(0, 16, 8) for v in scorer.score(images[i:i + 8], prompts[i:i + 8])[0]],
            "plain_generate": lambda: baseline(images[:16], prompts[:16])}
    scores = {name: fn() for name, fn in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(max(3, repeats)):
        for name, fn in (list(runs.items()) if r % 2 == 0 else list(reversed(runs.items()))):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    out["alternating_16_images_img_s"] = {k: spread([16 / t for t in v]) for k, v in times.items()}
    out["ratio_to_plain"] = round(statistics.median(times["plain_generate"]) / statistics.median(times["clipeval_b8"]), 2)
    out["max_abs_score_difference"] = max(abs(a - b) for a, b in zip(scores["clipeval_b8"], scores["plain_generate"]))
    del baseline
    # CLIP ViT-L/14-336 on the same images, as run scores them (fp16 autocast).
    model = work / "clip-l"
    if not (model / "config.json").is_file():
        bench_score.build_clip("tiny" if tiny else "l14-336", model)
    clip = ClipScorer(str(model), device=device, dtype="float16" if device != "cpu" else "float32")
    clip_flops = flops(lambda: clip.embed_images(images[:1]))
    seconds = timed(lambda: clip.score(images, prompts), device, repeats=max(3, repeats), warmup=1)
    out["clip_l336_img_s_b32"] = round(32 / seconds, 1)
    out["clip_l336_flops_per_image"] = clip_flops
    if peak:
        out["clip_l336_mfu_b32"] = round(clip_flops * 32 / seconds / peak, 4)
    out["vqa_cost_in_clip_images"] = round(out["clip_l336_img_s_b32"] / out["clipeval_img_s_b32"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: checks the script")
    parser.add_argument("--images", type=int, default=64, help="images per timed generation run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--score-prompts", type=int, default=96)
    parser.add_argument("--budget", type=float, default=540, help="seconds; sections that would not fit are skipped")
    parser.add_argument("--sections", default="012345678", help="which sections to run, e.g. 17 (7 uses the models of 1)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    global OUT_DIR, DEADLINE
    DEADLINE = time.monotonic() + args.budget
    OUT_DIR = args.out
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    from clipeval.hub import quiet_hf

    quiet_hf()
    device = "cpu" if args.tiny else "cuda"
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    steps = {
        "0": lambda: card(device),
        "1": lambda: sd15(work, device, args.tiny, args.images, args.repeats),
        "2": lambda: scoring(work, device, args.tiny, args.score_prompts, args.repeats),
        "8": lambda: vqa(work, device, args.tiny, args.repeats),
        "5": lambda: compiled(work, device, args.tiny, args.images),
        "3": lambda: sdxl(device, args.tiny),
        "4": lambda: flux(device, args.tiny),
        "6": lambda: memory(work, device, args.tiny),
        "7": lambda: next_steps(work, device, args.tiny),
    }
    for key, step in steps.items():  # in this order: the most wanted first
        if key in args.sections:
            step()
    RESULTS.pop("_sd15", None)
    save()
    print("\n" + json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
