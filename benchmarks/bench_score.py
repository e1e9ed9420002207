"""Scoring throughput: clipeval's scorer against torchmetrics' CLIPScore, same images, same model.

Real-size CLIP architectures with random weights (no download): their cost is the real models'
cost. Images are 512x512 PNGs on disk, K per prompt; prompts are Parti's (their real length
distribution) when ../shared/data is there, else synthetic. Both sides decode the PNGs.

- clipeval fast / exact: ``clipeval.rescore.score`` end to end (decode on threads, one text
  forward per prompt, preprocessing on the device, or the transformers processor).
- torchmetrics: ``CLIPScore`` built once with a callable returning (model, processor) (the only
  way it accepts a local model with transformers 5), its default ``CLIPProcessor``, then ``update``
  per batch, as its docs show; timed with its model load, like clipeval's ``score``.

Also reports the largest per-image differences: clipeval exact vs torchmetrics/100 (same
preprocessing: should be float noise) and fast vs exact.

    python benchmarks/bench_score.py --model b32 --prompts 32            # the CPU figure
    python benchmarks/bench_score.py --model l14-336 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

ARCHS = {
    # name: (vision hidden, layers, heads, mlp, patch, image), (text hidden, layers, heads, mlp), projection
    "b32": ((768, 12, 12, 3072, 32, 224), (512, 12, 8, 2048), 512),
    "l14-336": ((1024, 24, 16, 4096, 14, 336), (768, 12, 12, 3072), 768),
    "tiny": ((32, 2, 4, 37, 8, 32), (32, 2, 4, 37), 32),
    "small": ((256, 4, 4, 1024, 16, 64), (256, 4, 4, 1024), 256),  # the half-precision test's model
}


def build_clip(arch: str, path: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from clipeval.demo import make_tokenizer

    (vh, vl, vheads, vmlp, patch, size), (th, tl, theads, tmlp), proj = ARCHS[arch]
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=th, num_hidden_layers=tl, num_attention_heads=theads,
                          intermediate_size=tmlp, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=proj)
    vision = CLIPVisionConfig(hidden_size=vh, num_hidden_layers=vl, num_attention_heads=vheads, intermediate_size=vmlp,
                              patch_size=patch, image_size=size, projection_dim=proj)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=proj)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(path)
    return path


def prompts(n: int) -> list[str]:
    if (SHARED / "PartiPrompts.tsv").is_file():
        os.environ["CLIPEVAL_LIBRARY_MIRROR"] = str(SHARED)
        from clipeval.prompts import load_library

        return [p.prompt for p in load_library("parti").prompts[:n]]
    return [f"a photo of object number {i} on a table, studio lighting" for i in range(n)]


def write_images(folder: Path, texts: list[str], k: int, size: int) -> Path:
    """K smooth random PNGs per prompt (the same pixels on every machine), encoded on every core."""
    import concurrent.futures

    import torch
    from PIL import Image

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    jobs = []
    for p in range(len(texts)):
        coarse = torch.rand(k, 3, size // 16, size // 16, generator=g)
        imgs = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear") + 0.1 * torch.rand(k, 3, size, size, generator=g)
        for s, img in enumerate((imgs.clamp(0, 1) * 255).round().to(torch.uint8)):
            jobs.append((img.permute(1, 2, 0).numpy(), folder / f"{p:05d}_{s:02d}.png"))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(lambda job: Image.fromarray(job[0]).save(job[1]), jobs))
    library = folder.parent / "prompts.jsonl"
    library.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts), encoding="utf-8")
    return library


def run_clipeval(images, library, model, out, *, device, dtype, preprocess, batch):
    from clipeval.rescore import ScoreConfig, score

    start = time.perf_counter()
    result = score(ScoreConfig(source=images, out=out, prompts=str(library), clip_models=(str(model),), device=device,
                               clip_dtype=dtype, preprocess=preprocess, batch_size=batch, progress=False))
    _sync(device)
    return time.perf_counter() - start, result.scores


def run_torchmetrics(images, library, model, *, device, dtype, batch):
    """CLIPScore used well: built once, batched updates. Also returns per-image 100·cos from the
    same model and processor (torchmetrics' own update function) for the equality check."""
    import numpy as np
    import torch
    from PIL import Image
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    from clipeval.pipelines import torch_dtype

    start = time.perf_counter()  # timed with its model load, as clipeval's score() is
    clip = CLIPModel.from_pretrained(model, dtype=torch_dtype(dtype)).eval().to(device)
    processor = CLIPProcessor.from_pretrained(model)  # its default processor, as its users get it

    class Pooled(torch.nn.Module):  # transformers 5 returns outputs; torchmetrics wants tensors
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_image_features(self, pixel_values):
            return self.inner.get_image_features(pixel_values=pixel_values.to(self.inner.dtype)).pooler_output.float()

        def get_text_features(self, input_ids, attention_mask=None):
            return self.inner.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output.float()

    texts = [json.loads(line)["prompt"] for line in library.read_text(encoding="utf-8").splitlines()]
    files = sorted(images.glob("*.png"))
    pairs = [(f, texts[int(f.stem.split("_")[0])]) for f in files]
    pooled = Pooled(clip)
    metric = CLIPScore(model_name_or_path=lambda: (pooled, processor)).to(device)
    per_image = []
    with torch.inference_mode():
        for i in range(0, len(pairs), batch):
            chunk = pairs[i : i + batch]
            imgs = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1).to(device) for f, _ in chunk]
            metric.update(imgs, [t for _, t in chunk])
            if len(per_image) < 64:  # the per-image check, outside the timed update path's result
                t0 = time.perf_counter()
                scores, _ = _clip_score_update(imgs, [t for _, t in chunk], pooled, processor)
                per_image += (scores / 100).tolist()
                start += time.perf_counter() - t0  # not counted
        value = float(metric.compute())
    _sync(device)
    return time.perf_counter() - start, value, per_image


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(ARCHS), default="b32")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-torchmetrics", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch
    import torchmetrics
    import transformers

    from clipeval.pipelines import quiet_hf

    quiet_hf(with_diffusers=False)
    work = Path(tempfile.mkdtemp(prefix="bench-score-"))
    model = build_clip(args.model, work / "clip")
    texts = prompts(args.prompts)
    library = write_images(work / "images", texts, args.images_per_prompt, args.size)
    n = len(texts) * args.images_per_prompt
    common = dict(device=args.device, dtype=args.dtype, batch=args.batch)

    run_clipeval(work / "images", library, model, work / "warm", preprocess="fast", **common)  # warm-up
    fast_s, fast = run_clipeval(work / "images", library, model, work / "fast", preprocess="fast", **common)
    exact_s, exact = run_clipeval(work / "images", library, model, work / "exact", preprocess="exact", **common)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "torchmetrics": torchmetrics.__version__},
        "command": " ".join(["python", *sys.argv]),
        "model": args.model, "device": args.device, "dtype": args.dtype, "images": n, "prompts": len(texts),
        "size": args.size, "batch": args.batch,
        "clipeval_fast_img_s": n / fast_s,
        "clipeval_exact_img_s": n / exact_s,
        "max_abs_fast_minus_exact": float((fast.clip_score - exact.clip_score).abs().max()),
        "mean_abs_fast_minus_exact": float((fast.clip_score - exact.clip_score).abs().mean()),
    }
    if not args.skip_torchmetrics:
        tm_s, tm_value, tm_per_image = run_torchmetrics(work / "images", library, model, **common)
        ours = exact.clip_score.tolist()[: len(tm_per_image)]
        result.update({
            "torchmetrics_img_s": n / tm_s,
            "ratio_fast_vs_torchmetrics": tm_s / fast_s,
            "ratio_exact_vs_torchmetrics": tm_s / exact_s,
            "torchmetrics_value": tm_value,
            "clipeval_100x_clamped_mean": max(100 * float(exact.clip_score.mean()), 0.0),
            "max_abs_exact_minus_torchmetrics_over_100": max(abs(a - b) for a, b in zip(ours, tm_per_image)),
        })
    for key, value in result.items():
        print(f"{key:40s} {value:.6g}" if isinstance(value, float) else f"{key:40s} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
