"""The CLIP score against independent references on the same model and images:
transformers' ``logits_per_image / logit_scale.exp()`` and torchmetrics' ``clip_score / 100``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from clipeval.score import TEXT_BUCKET, ClipScorer

PROMPTS = ["a red cube on a table", "a photo of a cat", "东京の夜景 🌃", 'a sign saying "stop"']


def smooth_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 images with structure at several scales (pure noise is an unrealistic worst case)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(height // 8, 2), max(width // 8, 2), generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    x = x + 0.15 * torch.rand(n, 3, height, width, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]


@pytest.fixture(scope="module")
def exact(models) -> ClipScorer:
    return ClipScorer(str(models.clip), preprocess="exact")


@pytest.fixture(scope="module")
def fast(models) -> ClipScorer:
    return ClipScorer(str(models.clip))


def test_equals_transformers_logits_per_image(exact):
    images = smooth_images(4, 48, 40)
    ours, _ = exact.score(images, PROMPTS)
    inputs = exact.processor(images=to_pil(images), return_tensors="pt")
    text = exact.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = exact.model(pixel_values=inputs["pixel_values"], **text)
    reference = (out.logits_per_image / exact.model.logit_scale.exp()).diagonal()
    assert torch.allclose(torch.tensor(ours), reference, atol=1e-6, rtol=0)


class _PooledCLIP(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns outputs."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return self.inner.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask=None):
        return self.inner.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def _torchmetrics_scores(scorer: ClipScorer, images, prompts) -> list[float]:
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPProcessor

    processor = CLIPProcessor(image_processor=scorer.processor, tokenizer=scorer.tokenizer)
    loader = lambda: (_PooledCLIP(scorer.model), processor)  # noqa: E731
    return [float(clip_score(img, text, model_name_or_path=loader).detach()) / 100 for img, text in zip(images, prompts)]


def test_equals_torchmetrics_clip_score_over_100(exact):
    images = smooth_images(4, 64, 64, seed=1)
    ours, _ = exact.score(images, PROMPTS)
    reference = _torchmetrics_scores(exact, images, PROMPTS)
    assert all(r > 0 for r in reference)  # positive, so torchmetrics' clamp does not apply
    assert ours == pytest.approx(reference, abs=1e-6)


def test_negative_cosines_are_reported_not_clamped(models):
    images = smooth_images(4, 32, 32, seed=2)
    scorer = ClipScorer(str(models.clip), preprocess="exact")
    before, _ = scorer.score(images, PROMPTS)
    with torch.no_grad():
        scorer.model.text_projection.weight.neg_()  # flips every text embedding: cos → -cos
    scorer.prepare([])  # drop the cached text embeddings
    after, _ = scorer.score(images, PROMPTS)
    assert after == pytest.approx([-b for b in before], abs=1e-7)
    assert all(a < 0 for a in after)
    assert _torchmetrics_scores(scorer, images, PROMPTS) == [0.0] * 4  # max(100·cos, 0)


def test_long_prompt_is_truncated_keeping_the_end_of_text_token(exact):
    long = "a very long prompt " + " ".join(f"w{i}" for i in range(150))
    emb = exact.embed_texts([long])[0]
    assert emb.truncated
    ids = exact.tokenizer(long)["input_ids"]
    assert len(ids) > 77
    kept = ids[:76] + [exact.tokenizer.eos_token_id]  # what a correct truncation feeds CLIP
    sliced = ids[:77]  # torchmetrics' slicing: the end-of-text token is lost
    with torch.no_grad():
        def embed(tokens):
            v = exact.model.get_text_features(input_ids=torch.tensor([tokens])).pooler_output[0]
            return v / v.norm()

        assert torch.allclose(emb.vector, embed(kept), atol=1e-6)
        assert not torch.allclose(emb.vector, embed(sliced), atol=1e-3)


def test_truncation_flag_boundary(exact):
    # The hand-made vocabulary encodes "x" as one token: BOS + n·"x" + EOS is n + 2 tokens.
    assert not exact.embed_texts(["x " * 75])[0].truncated
    assert exact.embed_texts(["x " * 76])[0].truncated


def test_longer_text_positions_are_used_whole(tmp_path):
    """LongCLIP-style models (248 positions) truncate at their own length, not the tokenizer's 77."""
    from clipeval.demo import build_clip

    scorer = ClipScorer(str(build_clip(tmp_path / "long", text_positions=248)))
    assert scorer.max_length == 248 and scorer.tokenizer.model_max_length == 77
    assert not scorer.embed_texts(["x " * 200])[0].truncated  # 202 tokens fit in 248
    long = "x " * 300
    assert scorer.embed_texts([long])[0].truncated
    ids = scorer.tokenizer(long)["input_ids"][:247] + [scorer.tokenizer.eos_token_id]
    with torch.no_grad():
        v = scorer.model.get_text_features(input_ids=torch.tensor([ids])).pooler_output[0]
    assert torch.allclose(scorer.embed_texts([long])[0].vector, v / v.norm(), atol=1e-6)


def test_each_distinct_prompt_is_embedded_once(models):
    scorer = ClipScorer(str(models.clip))
    calls = []
    original = scorer.model.get_text_features

    def counting(**kwargs):
        calls.append({tuple(row) for row in kwargs["input_ids"].tolist()})
        return original(**kwargs)

    scorer.model.get_text_features = counting
    images = smooth_images(8, 32, 32)
    scorer.score(images[:4], ["a", "a", "a", "b"])
    scorer.score(images[4:], ["b", "b", "c", "c"])
    eos = scorer.tokenizer.eos_token_id
    ids = {t: tuple(scorer.tokenizer(t)["input_ids"]) for t in "abc"}
    padded = {t: v + (eos,) * (TEXT_BUCKET - len(v)) for t, v in ids.items()}  # end padding to the bucket
    # a and b share a shape: one forward (of text_group rows, the rest copies); b is cached.
    assert calls == [{padded["a"], padded["b"]}, {padded["c"]}]


def test_end_padding_to_the_bucket_changes_no_embedding(models):
    """CLIP's causal text tower never sees the end-of-text padding after a token, and pools the
    first end-of-text token: the padded forward is the unpadded one, up to float rounding."""
    scorer = ClipScorer(str(models.clip))
    prompts = ["a", "a cat", "a red cat on a mat", "x " * 5, "x " * 6, "x " * 7, "x " * 9, "x " * 74]
    lengths = [len(scorer.tokenizer(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == len(prompts) and max(lengths) == 76  # every length alone; 76 → 77, the cap
    embedded = scorer.embed_texts(prompts)
    with torch.no_grad():
        for prompt, got in zip(prompts, embedded):
            v = scorer.model.get_text_features(input_ids=torch.tensor([scorer.tokenizer(prompt)["input_ids"]]))
            v = v.pooler_output[0]
            assert torch.allclose(got.vector, v / v.norm(), atol=1e-6), prompt


def test_other_towers_keep_their_exact_length(models, tmp_path):
    """End padding is for CLIP's tower only: a tiny MetaCLIP 2 (another model type, loaded through
    the same AutoModel path) runs each prompt at its own token length."""
    import shutil

    from transformers import CLIPConfig, MetaClip2Config, MetaClip2Model

    clip = CLIPConfig.from_pretrained(models.clip)
    torch.manual_seed(0)
    MetaClip2Model(MetaClip2Config(text_config=clip.text_config.to_dict(), vision_config=clip.vision_config.to_dict(),
                                   projection_dim=clip.projection_dim)).save_pretrained(tmp_path / "meta")
    for f in models.clip.glob("*"):  # its tokenizer and image processor
        if f.suffix in (".json", ".txt") and f.name != "config.json":
            shutil.copy(f, tmp_path / "meta" / f.name)
    scorer = ClipScorer(str(tmp_path / "meta"))
    assert scorer.model_class == "MetaClip2Model"
    seen = []
    original = scorer.model.get_text_features
    scorer.model.get_text_features = lambda **kw: seen.append(tuple(kw["input_ids"].shape)) or original(**kw)
    scorer.embed_texts(["a", "a cat"])
    assert seen == [(scorer.text_group, 3), (scorer.text_group, 4)]


def test_a_text_embedding_does_not_depend_on_the_other_prompts(models):
    first, second = ClipScorer(str(models.clip)), ClipScorer(str(models.clip))
    short, long = "a cat", "a much longer prompt about a dog on a red sofa"
    alone = first.embed_texts([short])[0].vector
    together = second.embed_texts([long, short, long])[1].vector
    assert torch.equal(alone, together)


SHAPES = [(64, 64), (100, 60), (60, 100), (20, 30), (32, 32), (513, 512)]


@pytest.mark.parametrize("height, width", SHAPES)
def test_fast_preprocessing_on_the_cpu_is_the_processors(fast, exact, height, width):
    """On the CPU the fast path resizes with PIL as the processor does: the same pixels."""
    images = smooth_images(4, height, width, seed=height + width)
    pixels_fast, pixels_exact = fast.pixel_values(images), exact.pixel_values(images)
    assert pixels_fast.shape == pixels_exact.shape == (4, 3, 32, 32)
    assert (pixels_fast - pixels_exact).abs().max() < 1e-6  # float rounding of the normalisation
    fast_scores, _ = fast.score(list(images), PROMPTS)  # a list, as decoded files arrive
    exact_scores, _ = exact.score(images, PROMPTS)
    assert fast_scores == pytest.approx(exact_scores, abs=1e-6)


@pytest.mark.parametrize("height, width", SHAPES)
def test_the_accelerators_resize_is_within_a_level_of_pils(fast, exact, height, width):
    """A float batch takes the path an accelerator takes (torch's resize, PIL's kernel in PIL's
    two rounded passes), so it is checked here on the CPU."""
    images = smooth_images(4, height, width, seed=height + width)
    pixels_torch, pixels_exact = fast.transform(images.float()), exact.pixel_values(images)
    assert pixels_torch.shape == pixels_exact.shape == (4, 3, 32, 32)
    # A pixel is at most one uint8 level off (PIL's fixed-point coefficients), and almost none are.
    levels = (pixels_torch - pixels_exact).abs() * torch.tensor(exact.processor.image_std).view(1, 3, 1, 1) * 255
    assert levels.max() <= 1.0 + 1e-3
    assert (levels > 0.5).float().mean() < 0.01
    if (height, width) == (32, 32):  # the model's own size: no resize, so no rounding to differ in
        assert levels.max() < 1e-3
    else:
        assert (levels > 0.5).any()  # the two paths really differ, so the bounds above mean something
    # The README's promise for this path: every score within 1e-4 of the exact path's (6.2e-5 at worst here).
    scores, _ = fast.score(images.float(), PROMPTS)
    reference, _ = exact.score(images, PROMPTS)
    assert scores == pytest.approx(reference, abs=1e-4, rel=0)


def test_half_precision_model_still_compares_in_float32(models, fast):
    half = ClipScorer(str(models.clip), dtype="bfloat16")
    assert half.model.dtype == torch.float32  # mixed precision: float32 weights, half matmuls
    images = smooth_images(4, 64, 64, seed=3)
    embeddings = half.embed_images(images)
    assert embeddings.dtype == torch.float32
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(4))
    # How close the scores stay is the README's 1e-3 bound, proved below on a model wide enough for
    # rounding to average out as in a real CLIP; this 32-wide one only shows half precision ran.
    ours, _ = half.score(images, PROMPTS)
    reference, _ = fast.score(images, PROMPTS)
    assert ours != reference
    # float16 is float16, not autocast's default for the device (bfloat16 on a CPU).
    assert ClipScorer(str(models.clip), dtype="float16").score(images, PROMPTS)[0] != ours


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    """A random CLIP 256 wide and 4 deep: the 32-wide test model is too narrow for rounding errors to
    average out as they do in every real CLIP (its bf16 error reaches 1.6e-3); this one is still
    built in a second."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_score

    return bench_score.build_clip("small", tmp_path_factory.mktemp("small") / "clip")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stays_within_1e_3_of_float32(small_clip, dtype):
    """--clip-dtype bfloat16/float16 is mixed precision (float32 weights, the image tower's matmuls
    in half under autocast, the text tower in float32): every score within 1e-3 of float32 (real
    sizes: benchmarks/bench_score_process.py and gpu_check.py)."""
    import numpy as np

    full = ClipScorer(str(small_clip), dtype="float32")
    half = ClipScorer(str(small_clip), dtype=dtype)
    assert half.model.dtype == torch.float32  # weights stay float32
    for seed in range(3):
        images = smooth_images(len(PROMPTS), 96, 96, seed=seed)
        reference, _ = full.score(images, PROMPTS)
        scores, _ = half.score(images, PROMPTS)
        difference = np.abs(np.array(scores) - np.array(reference))
        assert 0 < difference.max() < 1e-3  # half precision really ran, and stayed within the bound
    # The text tower stays float32 (once per prompt; most of the half-precision error was there).
    assert all(torch.equal(a.vector, b.vector) for a, b in zip(half.embed_texts(PROMPTS), full.embed_texts(PROMPTS)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prompts_of_one_shape_share_a_forward_without_changing_a_bit(small_clip, dtype):
    """Prompts of one shape (token length rounded up to the bucket) run together, in fixed-shape
    groups filled with copies; each embedding is still bit-identical to the prompt's own:
    whichever neighbours, whichever position, more or fewer than one group."""
    candidates = [f"a photo of {c} {a}" * k for c in ("red", "blue", "green", "black", "white", "pink")
                  for a in ("cat", "dog", "car", "cup", "hat") for k in (1, 2)]
    scorer = ClipScorer(str(small_clip), dtype=dtype)
    shapes: dict[int, list[str]] = {}
    for text in candidates:
        shapes.setdefault(-(-len(scorer.tokenizer(text)["input_ids"]) // TEXT_BUCKET), []).append(text)
    same = max(shapes.values(), key=len)[:11]
    assert len(same) > 2 * scorer.text_group  # more than two groups of one shape
    assert len({len(scorer.tokenizer(t)["input_ids"]) for t in same}) > 1  # of several lengths
    alone = {t: ClipScorer(str(small_clip), dtype=dtype).embed_texts([t])[0].vector for t in same[:3]}
    for order in (same, same[::-1], same[1:] + same[:1]):
        fresh = ClipScorer(str(small_clip), dtype=dtype)
        vectors = {t: e.vector for t, e in zip(order, fresh.embed_texts(order))}
        for text, vector in alone.items():
            assert torch.equal(vectors[text], vector), text


def test_ahead_prepares_the_coming_prompts_a_window_at_a_time():
    from clipeval.scorers import Ahead

    class Recording:
        def __init__(self):
            self.prepared, self.scored = [], []

        def prepare(self, prompts):
            self.prepared.append(list(prompts))

        def score(self, images, prompts):
            self.scored.append(list(prompts))
            return [0.0] * len(prompts), [False] * len(prompts)

    order = [f"p{i}" for i in range(10) for _ in range(3)]  # three images a prompt
    batches = [order[i : i + 5] for i in range(0, len(order), 5)]
    inner = Recording()
    ahead = Ahead(inner, order, window=4)
    for batch in batches:
        ahead.score(None, batch)
    assert inner.scored == batches
    # A batch that needs a prompt past the window starts the next one and keeps its own prompts.
    assert inner.prepared == [["p0", "p1", "p2", "p3"], ["p3", "p4", "p5", "p6", "p7"], ["p6", "p7", "p8", "p9"]]
    # A prompt the plan did not announce is prepared with the batch that asks for it.
    ahead.score(None, ["new"])
    assert inner.prepared[-1] == ["new"]


def test_clip_dtype_reaches_the_scorer_from_the_cli(run_tiny, cli, models, tmp_path):
    """--clip-dtype bfloat16 really scores in mixed precision: other numbers than float32, within the
    README's 1e-3 (a CLI that dropped the option would give float32's bit for bit)."""
    import pandas as pd

    full, half = tmp_path / "f32", tmp_path / "bf16"
    assert run_tiny(full, "--limit", "4").exit_code == 0
    assert run_tiny(half, "--limit", "4", "--clip-dtype", "bfloat16").exit_code == 0
    a, b = pd.read_csv(full / "scores.csv"), pd.read_csv(half / "scores.csv")
    assert (a["clip_score"] != b["clip_score"]).any()
    assert (a["clip_score"] - b["clip_score"]).abs().max() < 1e-3
    rescored = tmp_path / "rescored"
    assert cli("score", full, "--clip-model", models.clip, "--clip-dtype", "bfloat16", "--out", rescored, "--quiet").exit_code == 0
    assert pd.read_csv(rescored / "scores.csv")["clip_score"].tolist() == b["clip_score"].tolist()


# -- loading: what a user can get wrong, one line each, and what the loaded scorer holds -------------

def test_a_loaded_scorer_holds_the_models_own_settings(models):
    fast, exact = ClipScorer(str(models.clip), name="mine"), ClipScorer(str(models.clip), preprocess="exact")
    assert (fast.name, exact.name) == ("mine", str(models.clip))
    assert fast.model_class == "CLIPModel" and fast.processor_name is None
    assert fast.max_length == fast.model.config.text_config.max_position_embeddings == 77
    assert (fast.preprocess, exact.preprocess) == ("fast", "exact")
    assert fast.transform is not None and exact.transform is None
    assert (fast.device, fast.dtype, fast.text_group) == ("cpu", "float32", 4)
    assert not fast.pad_to_max_length and fast.end_pad == fast.tokenizer.eos_token_id is not None
    assert not fast.model.training
    assert (fast.metric, fast.scale, fast.describe()) == ("clip", "cosine", {"preprocess": "fast"})
    assert ClipScorer(str(models.clip), device="meta").text_group == 32  # any accelerator: full forwards


def test_a_resampling_the_fast_path_cannot_reproduce_falls_back_to_exact_and_says_so(models, tmp_path):
    import json
    import shutil

    folder = tmp_path / "nearest"
    shutil.copytree(models.clip, folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["resample"] = 0  # nearest
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    said = []
    scorer = ClipScorer(str(folder), name="nearest", log=said.append)
    assert scorer.preprocess == "exact" and scorer.transform is None
    assert said == ["nearest: the fast path cannot reproduce PIL resample mode 0; using --preprocess exact"]
    images = smooth_images(2, 40, 48)
    assert scorer.score(images, PROMPTS[:2])[0] == ClipScorer(str(folder), preprocess="exact").score(images, PROMPTS[:2])[0]


def test_loading_mistakes_are_one_line_each(models, tmp_path):
    import shutil

    from clipeval.errors import ClipevalError
    from clipeval.hub import PICKLE_HINT

    def error(*args, **kwargs) -> str:
        with pytest.raises(ClipevalError) as err:
            ClipScorer(*args, **kwargs)
        return str(err.value)

    assert error(str(models.clip), preprocess="quick") == "--preprocess quick: use one of fast, exact"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error(str(empty)) == f"--clip-model {empty}: not a transformers model folder (no config.json)"
    assert error(str(models.clip), revision="main") == f"--clip-revision applies to hub ids; {models.clip} is local"
    pickled = tmp_path / "pickled"
    shutil.copytree(models.clip, pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    assert error(str(pickled)) == f"--clip-model {pickled} holds only pickle weights: {PICKLE_HINT}"
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(models.clip / name, bare / name)
    way_out = ("pass --clip-processor with the folder or hub id of the model it was trained from "
               "(PickScore: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    assert error(str(bare)) == f"--clip-model {bare} has no image processor and no tokenizer files: {way_out}"
    shutil.copy(models.clip / "preprocessor_config.json", bare / "preprocessor_config.json")
    assert error(str(bare)) == f"--clip-model {bare} has no tokenizer files: {way_out}"
    processor_only = tmp_path / "processor-only"  # a tokenizer and image processor, no model: no config.json needed
    processor_only.mkdir()
    for name in models.clip.iterdir():
        if name.suffix != ".safetensors" and name.name != "config.json":
            shutil.copy(name, processor_only / name.name)
    with_processor = ClipScorer(str(bare), processor=str(processor_only))  # the processor from elsewhere
    assert with_processor.processor_name == str(processor_only)
    assert with_processor.score(smooth_images(1, 32, 32), ["a cat"]) == ClipScorer(str(models.clip)).score(
        smooth_images(1, 32, 32), ["a cat"])
    broken = tmp_path / "broken"
    shutil.copytree(models.clip, broken)
    (broken / "config.json").write_text("{ not json")
    assert error(str(broken), name="short").startswith(f"could not load CLIP model short ({broken}): ")
    assert error(str(broken)).endswith(" (OSError)") and "None" not in error(str(broken))
    assert error(str(broken)).startswith(f"could not load CLIP model {broken}: ")


def _processor_files(folder: Path) -> tuple[str, ...]:
    return tuple(f.name for f in folder.iterdir() if f.suffix in (".json", ".txt") and f.name != "config.json")


def test_a_hub_model_is_read_at_its_revision_with_that_revisions_tokenizer_and_processor(models):
    """main holds other weights and no tokenizer or processor, so a loader that reads any of the
    three at main instead of the revision asked for fails or scores differently; a separate
    --clip-processor is read at its own main."""
    from conftest import cache_repo

    cache_repo("clipeval-tests/clip-revs", models.clip2, "c" * 40, skip=_processor_files(models.clip2))
    v2 = cache_repo("clipeval-tests/clip-revs", models.clip, "d" * 40, ref="v2")
    cache_repo("clipeval-tests/clip-processor", models.clip, "e" * 40, skip=("model.safetensors", "config.json"))
    images = smooth_images(2, 40, 48, seed=5)
    local = ClipScorer(str(models.clip)).score(images, PROMPTS[:2])
    assert ClipScorer("clipeval-tests/clip-revs", revision="v2").score(images, PROMPTS[:2]) == local
    assert ClipScorer("clipeval-tests/clip-revs", revision=v2).score(images, PROMPTS[:2]) == local
    separate = ClipScorer("clipeval-tests/clip-revs", revision="v2", processor="clipeval-tests/clip-processor")
    assert separate.score(images, PROMPTS[:2]) == local


def test_pickle_weights_load_only_with_allow_pickle_from_a_folder_or_the_hub(models, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from clipeval.errors import ClipevalError
    from clipeval.hub import PICKLE_HINT
    from conftest import cache_repo

    pickled = tmp_path / "pickled"
    shutil.copytree(models.clip, pickled, ignore=lambda _, names: ["model.safetensors"])
    torch.save(load_file(models.clip / "model.safetensors"), pickled / "pytorch_model.bin")
    cache_repo("clipeval-tests/clip-pickle", pickled)
    images = smooth_images(2, 32, 32, seed=6)
    reference = ClipScorer(str(models.clip)).score(images, PROMPTS[:2])[0]
    for spec in (str(pickled), "clipeval-tests/clip-pickle"):
        with pytest.raises(ClipevalError) as refused:
            ClipScorer(spec)
        assert str(refused.value) in (f"--clip-model {spec} holds only pickle weights: {PICKLE_HINT}",
                                      f"could not load CLIP model {spec}: it has only pickle weights: {PICKLE_HINT}")
        assert ClipScorer(spec, allow_pickle=True).score(images, PROMPTS[:2])[0] == pytest.approx(reference, abs=1e-6)
    # safetensors weights beside a pickle that is not a model (HF Trainer's training_args.bin) load as they are.
    trained = tmp_path / "trained"
    shutil.copytree(models.clip, trained)
    torch.save({"learning_rate": 1e-5}, trained / "training_args.bin")
    assert ClipScorer(str(trained)).score(images, PROMPTS[:2])[0] == reference
    # A processor is only its tokenizer and image configuration: its folder's pickle weights are never read.
    bare = tmp_path / "bare"
    shutil.copytree(models.clip, bare, ignore=lambda _, names: [n for n in names if n in _processor_files(models.clip)])
    assert ClipScorer(str(bare), processor=str(pickled)).score(images, PROMPTS[:2])[0] == reference


def test_half_precision_weights_are_loaded_in_float32(models, tmp_path):
    """A scorer saved in float16 (as many are on the hub) runs in float32 unless --clip-dtype asks
    otherwise: its scores are those of transformers' own model loaded in float32."""
    from transformers import CLIPModel

    half = tmp_path / "half"
    CLIPModel.from_pretrained(models.clip).half().save_pretrained(half)
    for name in _processor_files(models.clip):
        (half / name).write_bytes((models.clip / name).read_bytes())
    scorer = ClipScorer(str(half), preprocess="exact")
    reference = CLIPModel.from_pretrained(half, dtype=torch.float32)
    images = smooth_images(2, 32, 32, seed=8)
    inputs = scorer.tokenizer(PROMPTS[:2], padding=True, return_tensors="pt")
    pixels = scorer.processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = reference(**inputs, pixel_values=pixels)
    expected = (out.logits_per_image / reference.logit_scale.exp()).diagonal().tolist()
    assert scorer.score(images, PROMPTS[:2])[0] == pytest.approx(expected, abs=1e-5)


def test_siglip_pads_every_prompt_to_its_fixed_length(tmp_path):
    """SigLIP was trained on text padded to 64 tokens with no attention mask: a prompt's embedding
    is the tower's output for the padded ids, which differs from the unpadded one."""
    from clipeval.demo import build_siglip

    scorer = ClipScorer(str(build_siglip(tmp_path / "siglip")))
    model, tokenizer = scorer.model, scorer.tokenizer
    for prompt in ("a cat", PROMPTS[2]):
        got = scorer.embed_texts([prompt])[0].vector
        with torch.no_grad():
            padded = model.get_text_features(**tokenizer([prompt], padding="max_length", max_length=scorer.max_length,
                                                         return_tensors="pt")).pooler_output[0]
            alone = model.get_text_features(**tokenizer([prompt], return_tensors="pt")).pooler_output[0]
        assert torch.allclose(got, padded / padded.norm(), atol=1e-6)
        assert not torch.allclose(got, alone / alone.norm(), atol=1e-3)
    # Beyond its 16 positions a prompt is cut to them (padding to max_length alone would not cut it) and flagged.
    long = "a red cat on a table at night " * 4
    cut = tokenizer([long], padding="max_length", truncation=True, max_length=scorer.max_length, return_tensors="pt")
    assert cut["input_ids"].shape == (1, 16)
    with torch.no_grad():
        expected = model.get_text_features(input_ids=cut["input_ids"]).pooler_output[0]
    (embedding,) = scorer.embed_texts([long])
    assert embedding.truncated and torch.allclose(embedding.vector, expected / expected.norm(), atol=1e-6)


def test_images_of_different_sizes_score_as_each_would_alone(fast, exact):
    """A list of images of several sizes (a folder of images to re-score) takes each image through
    the fast path on its own; a list of one size is one batch. Either way, the scores of each alone."""
    small, square = smooth_images(1, 40, 56, seed=9)[0], smooth_images(1, 48, 48, seed=10)[0]
    for scorer in (fast, exact):
        alone = [scorer.score(img[None], [p])[0][0] for img, p in ((small, PROMPTS[0]), (square, PROMPTS[1]))]
        assert scorer.score([small, square], PROMPTS[:2])[0] == pytest.approx(alone, abs=1e-6)
        same = scorer.score([square, square], PROMPTS[:2])[0]
        assert same == pytest.approx(scorer.score(torch.stack([square, square]), PROMPTS[:2])[0], abs=1e-6)
    with pytest.raises(ValueError, match=r"^2 images for 1 prompts$"):
        fast.score([small, square], PROMPTS[:1])


def test_the_scorer_computes_on_its_own_device(models):
    """On the meta device any CPU tensor mixed into a forward is an error: the model, the pixels
    and the token ids all go to the scorer's device."""
    scorer = ClipScorer(str(models.clip), device="meta")
    images = smooth_images(2, 40, 40)
    assert scorer.image_inputs(images)["pixel_values"].device.type == "meta"  # preprocessed there, no host copy
    mixed = [images[0], smooth_images(1, 48, 40)[0]]  # images of several sizes, each preprocessed there too
    assert scorer.image_inputs(mixed)["pixel_values"].device.type == "meta"
    # A list of one size (decoded PNGs) is stacked for the accelerator, not as the CPU's channels-last batch.
    same = scorer.image_inputs(list(images))["pixel_values"]
    assert same.device.type == "meta" and tuple(same.shape) == (2, 3, 32, 32)
    assert scorer.embed_images(images).device.type == "meta"
    # The meta device lets an embedding look up CPU token ids (an accelerator does not): so the ids
    # the text tower receives are checked where they arrive.
    received = []
    forward = scorer.model.get_text_features
    scorer.model.get_text_features = lambda input_ids: received.append(input_ids.device.type) or forward(input_ids=input_ids)
    assert scorer.embed_texts(["a cat"])[0].vector.device.type == "meta"
    assert received == ["meta"]
    assert ClipScorer(str(models.clip), device="meta", preprocess="exact").embed_images(images).device.type == "meta"


def test_scoring_never_imports_diffusers(models, monkeypatch):
    """`clipeval score` and a training loop's scorer skip diffusers' import (about 5 s): with it made
    unimportable, a scorer still loads and scores."""
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises
    scores, truncated = ClipScorer(str(models.clip)).score(smooth_images(1, 32, 32), ["a cat"])
    assert len(scores) == 1 and -1 <= scores[0] <= 1 and truncated == [False]


def test_demo_is_the_embedded_demo_scorer(models):
    from clipeval import demo

    images = smooth_images(1, 32, 32, seed=11)
    assert ClipScorer("demo").score(images, ["a cat"]) == ClipScorer(str(demo.demo_clip_dir())).score(images, ["a cat"])


def test_a_model_that_is_not_a_dual_encoder_is_refused_by_its_class(models, tmp_path):
    from transformers import BertConfig, BertModel

    from clipeval.errors import ClipevalError

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8)).save_pretrained(folder)
    for name in _processor_files(models.clip):
        (folder / name).write_bytes((models.clip / name).read_bytes())
    with pytest.raises(ClipevalError) as err:
        ClipScorer(str(folder), name="bert")
    assert str(err.value) == ("--clip-model bert is a BertModel, neither a dual encoder with image and text features "
                              "(CLIP, SigLIP, ...) nor a vision-language model (LLaVA, SmolVLM, Qwen2.5-VL, ...)")
