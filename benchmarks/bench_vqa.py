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


def build(path: Path) -> Path:
    import torch
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor,
                              Idefics3VisionConfig, LlamaConfig)

    import tiny_vlms

    torch.manual_seed(0)
    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer = tiny_vlms.word_tokenizer(["<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>", *grid])
    tokenizer.add_tokens([f"<filler_{i}>" for i in range(VOCAB - len(tokenizer))])
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    vision = Idefics3VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                  image_size=512, patch_size=16)
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=4,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id)
    model = Idefics3ForConditionalGeneration(config).eval()
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 512}, max_image_size={"longest_edge": 512})
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=64,
                                  chat_template=tiny_vlms.SMOLVLM_TEMPLATE)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def plain(path: Path):
    """The model called the plain way, loaded once like clipeval's."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from clipeval.vqa import QUESTION

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    yes = processor.tokenizer.convert_tokens_to_ids("Yes")

    def score(images, prompts):
        out = []
        for image, prompt in zip(images, prompts):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION.format(prompt)}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(text=[text], images=[[image.permute(1, 2, 0).numpy()]], return_tensors="pt")
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
    for _ in range(args.repeats):
        for name, fn in runs.items():
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
