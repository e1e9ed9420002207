"""VQAScore throughput on this CPU: clipeval's scorer (one left-padded batched forward, last
position's logits only) against the same model called the plain way, as t2v_metrics-style code and
most users do it: the processor on one image and question, then
``generate(max_new_tokens=1, output_scores=True)``, softmax at "Yes".

The model is SmolVLM-256M-size with random weights (SmolLM2-135M text model: 30 layers, width 576;
SigLIP-B/16 vision tower at 512 px; pixel shuffle 4, so 64 image tokens), saved and loaded through
``from_pretrained``; the tokenizer is word-level with the real vocabulary size (49,280). Images are
512 x 512 without splitting (the processor's own resize). Both paths are warmed up once, then timed
over >= 3 alternating repeats in this one process; median and spread, and the largest score
difference between the two.

    python benchmarks/bench_vqa.py --images 16 --batch 8 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
VOCAB = 49_280


# Sizes of the Idefics3 (SmolVLM) architecture built here: (text model, vision tower, image side,
# patch, pixel-shuffle factor). "7b": the language model of Qwen2.5-VL-7B (Qwen2-7B's widths, depth
# and 152,064-word vocabulary) and a vision tower of its ViT's size (32 layers, width 1280) on
# 448 px in 14-px patches: 1,024 patches, 256 image tokens, as Qwen2.5-VL-7B sees a 448² image.
# Qwen2.5-VL's own processor needs torchvision, which the CPU machines here cannot install.
SIZES = {
    "256m": (dict(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, tie_word_embeddings=True),
             dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12), 512, 16, 4),
    "7b": (dict(vocab_size=152_064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, tie_word_embeddings=False),
           dict(hidden_size=1280, intermediate_size=3420, num_hidden_layers=32, num_attention_heads=16), 448, 14, 2),
    "tiny": (dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False),
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4), 64, 16, 2),
}


def build(path: Path, size: str = "256m", device: str = "cpu") -> Path:
    """A SmolVLM-architecture model of ``size`` (``SIZES``) with random weights, saved with its
    processor; ``device``: where the weights are initialised (a 7B model on a GPU, in bfloat16)."""
    import torch
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor,
                              Idefics3VisionConfig, LlamaConfig)

    import tiny_vlms

    torch.manual_seed(0)
    text_size, vision_size, side, patch, shuffle = SIZES[size]
    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer = tiny_vlms.word_tokenizer(["<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>", *grid])
    if size == "256m":  # the real vocabulary in the tokenizer too (the 7B model's rows beyond it are never read)
        tokenizer.add_tokens([f"<filler_{i}>" for i in range(VOCAB - len(tokenizer))])
    text = LlamaConfig(**text_size, max_position_embeddings=8192, rms_norm_eps=1e-5, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = Idefics3VisionConfig(**vision_size, image_size=side, patch_size=patch)
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=shuffle,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Idefics3ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": side}, max_image_size={"longest_edge": side})
    tokens = (side // patch) ** 2 // shuffle**2
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=tokens,
                                  chat_template=tiny_vlms.SMOLVLM_TEMPLATE)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def plain(path: Path, device: str = "cpu", dtype: str = "float32"):
    """The model called the plain way, loaded once like clipeval's."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from clipeval.vqa import QUESTION

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).eval().to(device)
    processor = AutoProcessor.from_pretrained(path)
    yes = processor.tokenizer.convert_tokens_to_ids("Yes")

    def score(images, prompts):
        out = []
        for image, prompt in zip(images, prompts):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION.format(prompt)}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(text=[text], images=[[image.permute(1, 2, 0).cpu().numpy()]], return_tensors="pt")
            inputs = {k: v.to(device, getattr(torch, dtype)) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
            with torch.inference_mode():
                result = model.generate(**inputs, max_new_tokens=1, output_scores=True, return_dict_in_generate=True,
                                        do_sample=False)
            out.append(float(result.scores[0][0].float().softmax(-1)[yes]))
        return out

    return score


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    from clipeval.vqa import VqaScorer

    path = build(Path(tempfile.mkdtemp()) / "smolvlm-256m-size")
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(args.images, 3, 512, 512, generator=g) * 255).to(torch.uint8)
    words = "a photo of a red cube on the table with a cat and a dog at night in the city".split()
    prompts = [" ".join(words[: 3 + i % 12]) for i in range(args.images)]
    ours = VqaScorer(str(path))

    def clipeval_scores():
        out = []
        for i in range(0, args.images, args.batch):
            out += ours.score(images[i : i + args.batch], prompts[i : i + args.batch])[0]
        return out

    baseline = plain(path)
    runs = {"clipeval": clipeval_scores, "plain generate": lambda: baseline(images, prompts)}
    results = {name: fn() for name, fn in runs.items()}  # warm-up, and the scores compared
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.repeats):  # alternating: a drift of the machine falls on both
        for name, fn in (list(runs.items()) if r % 2 == 0 else list(reversed(runs.items()))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rate = {name: args.images / statistics.median(t) for name, t in times.items()}
    from bench_run import machine

    report = {
        **machine(),
        "cpu_flags": sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in ("avx512f", "avx512_bf16", "amx_tile", "avx2")}),
        "threads": torch.get_num_threads(),
        "images": args.images,
        "batch": args.batch,
        "seconds": times,
        "images_per_second": rate,
        "speedup": rate["clipeval"] / rate["plain generate"],
        "max_abs_difference": max(abs(a - b) for a, b in zip(results["clipeval"], results["plain generate"])),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
