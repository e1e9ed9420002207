"""Scorers of the CLIP family behind one interface: SigLIP, a CLIP folder without processor files
(+ --clip-processor), short names. Each checked against the model's own transformers classes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_user_error
from PIL import Image

from clipeval.scorers import make_scorer

PROMPTS = ["a photo of a cat", "a red car on a road", "the city at night " * 6, "un café à Paris 🐱"]


@pytest.fixture(scope="session")
def siglip(tmp_path_factory):
    from clipeval.demo import build_siglip

    return build_siglip(tmp_path_factory.mktemp("siglip") / "siglip")


@pytest.fixture(scope="session")
def naflex(siglip, tmp_path_factory):
    """A tiny random SigLIP 2 NaFlex model (Siglip2Model: each image resized to its own grid of at
    most 16 patches of 8 pixels, whatever its aspect), with the tiny SigLIP's tokenizer."""
    from transformers import (AutoTokenizer, Siglip2Config, Siglip2Model, Siglip2Processor, Siglip2TextConfig,
                              Siglip2VisionConfig)

    try:
        from transformers import Siglip2ImageProcessorPil as ImageProcessor
    except ImportError:  # transformers before the PIL/torchvision split
        from transformers import Siglip2ImageProcessor as ImageProcessor
    folder = tmp_path_factory.mktemp("naflex") / "siglip2"
    tokenizer = AutoTokenizer.from_pretrained(siglip)
    torch.manual_seed(0)
    config = Siglip2Config(
        text_config=Siglip2TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=1).to_dict(),
        vision_config=Siglip2VisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                          num_patches=16, patch_size=8).to_dict(),
    )
    Siglip2Model(config).save_pretrained(folder)
    Siglip2Processor(image_processor=ImageProcessor(patch_size=8, max_num_patches=16),
                     tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bare_clip(models, tmp_path_factory):
    """The tiny CLIP's weights and config only, as PickScore's repository ships them."""
    folder = tmp_path_factory.mktemp("bare") / "clip"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(models.clip / name, folder / name)
    return folder


def _images(n: int, size=(48, 40)) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (n, 3, *size), dtype=np.uint8))


def siglip_reference(folder, images: torch.Tensor, prompts: list[str]) -> np.ndarray:
    """SigLIP's own classes, as its model card uses them: the processor pads text to max_length."""
    from transformers import AutoProcessor, SiglipModel

    model = SiglipModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
    inputs = processor(text=prompts, images=pil, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        t = model.get_text_features(input_ids=inputs["input_ids"]).pooler_output
        i = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    t, i = t / t.norm(dim=-1, keepdim=True), i / i.norm(dim=-1, keepdim=True)
    return (t * i).sum(-1).numpy()


def test_siglip_scores_equal_its_own_classes(siglip):
    images = _images(len(PROMPTS))
    reference = siglip_reference(siglip, images, PROMPTS)
    exact = make_scorer(str(siglip), preprocess="exact")
    fast = make_scorer(str(siglip), preprocess="fast")
    assert exact.model_class == "SiglipModel" and exact.max_length == 16 and exact.pad_to_max_length
    assert fast.transform is not None and fast.transform.crop is None and fast.transform.size == (32, 32)
    cos_exact, truncated = exact.score(images, PROMPTS)
    cos_fast, _ = fast.score(images, PROMPTS)
    assert np.abs(np.array(cos_exact) - reference).max() < 1e-6
    assert np.abs(np.array(cos_fast) - reference).max() < 1e-4  # the fast path's bound, as for CLIP
    assert truncated == [False, False, True, False]  # 24 words > 16 positions


def naflex_reference(folder, images: list[torch.Tensor], prompts: list[str]) -> np.ndarray:
    """SigLIP 2's own classes on the whole list at once: its processor pads every image to the
    same number of patches and says which are real."""
    from transformers import AutoProcessor, Siglip2Model

    model = Siglip2Model.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
    # Its image processor and tokenizer, each called on its own: Siglip2Processor's call would
    # impose the real models' defaults (16-pixel patches, 256 of them; 64 tokens) on this tiny one.
    inputs = {**processor.image_processor(images=pil, return_tensors="pt"),
              **processor.tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")}
    with torch.no_grad():
        t = model.get_text_features(input_ids=inputs["input_ids"]).pooler_output
        i = model.get_image_features(pixel_values=inputs["pixel_values"], spatial_shapes=inputs["spatial_shapes"],
                                     pixel_attention_mask=inputs["pixel_attention_mask"]).pooler_output
    t, i = t / t.norm(dim=-1, keepdim=True), i / i.norm(dim=-1, keepdim=True)
    return (t * i).sum(-1).numpy()


def test_siglip2_naflex_scores_equal_its_own_classes(naflex):
    """A NaFlex tower takes patches, their mask and each image's grid, which only its processor
    makes: --preprocess fast falls back to exact, with a note, and images of other aspects (here
    a wide one, scored beside a tall one) each get their own grid."""
    notes = []
    scorer = make_scorer(str(naflex), preprocess="fast", log=notes.append)
    assert scorer.model_class == "Siglip2Model" and scorer.preprocess == "exact" and scorer.transform is None
    assert len(notes) == 1 and "NaFlex" in notes[0] and "--preprocess exact" in notes[0]
    images = [*_images(2), *_images(2, size=(24, 72))]
    reference = naflex_reference(naflex, images, PROMPTS)
    cosines, _ = scorer.score(images, PROMPTS)
    assert np.abs(np.array(cosines) - reference).max() < 1e-6
    # Each image's score is its own: alone, or beside others, the same.
    alone = [scorer.score([img], [p])[0][0] for img, p in zip(images, PROMPTS)]
    assert np.abs(np.array(alone) - np.array(cosines)).max() < 1e-6


def test_a_run_scored_by_siglip2_naflex_end_to_end(run_tiny, cli, naflex, tmp_path):
    out = tmp_path / "run"
    result = run_tiny(out, "--limit", "3", "--clip-model", naflex)
    assert result.exit_code == 0, result.stderr
    assert "NaFlex" in result.stderr
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    images = [torch.from_numpy(np.asarray(Image.open(out / p).convert("RGB"))).permute(2, 0, 1) for p in scores["image"]]
    assert np.abs(scores["clip_score"].to_numpy() - naflex_reference(naflex, images, scores["prompt"].tolist())).max() < 1e-6
    assert json.loads((out / "manifest.json").read_text())["clip"]["class"] == "Siglip2Model"
    again = tmp_path / "again"
    assert cli("score", out, "--clip-model", naflex, "--out", again, "--quiet").exit_code == 0
    assert (again / "scores.csv").read_bytes() == (out / "scores.csv").read_bytes()


def test_a_run_scored_by_siglip_end_to_end(run_tiny, cli, siglip, models, tmp_path):
    out = tmp_path / "run"
    result = run_tiny(out, "--limit", "4", "--clip-model", siglip, "--preprocess", "exact")
    assert result.exit_code == 0, result.stderr
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(out / p).convert("RGB"))).permute(2, 0, 1)
                          for p in scores["image"]])
    reference = siglip_reference(siglip, images, scores["prompt"].tolist())
    assert np.abs(scores["clip_score"].to_numpy() - reference).max() < 1e-6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["clip"]["class"] == "SiglipModel" and manifest["clip"]["max_text_tokens"] == 16
    # Re-scored with CLIP and SigLIP together: one column each, each equal to its own run.
    both = tmp_path / "both"
    assert cli("score", out, "--clip-model", models.clip, "--clip-model", siglip, "--preprocess", "exact",
               "--out", both, "--quiet").exit_code == 0
    table = pd.read_csv(both / "scores.csv")
    assert (table["score:siglip"].to_numpy() == scores["clip_score"].to_numpy()).all()
    clip_run = tmp_path / "clip"
    assert run_tiny(clip_run, "--limit", "4", "--preprocess", "exact").exit_code == 0
    assert np.abs(table["clip_score"] - pd.read_csv(clip_run / "scores.csv")["clip_score"]).max() < 1e-6


def test_a_model_without_processor_files_needs_clip_processor(run_tiny, cli, bare_clip, models, tmp_path):
    assert_user_error(run_tiny(tmp_path / "r1", "--limit", "2", "--clip-model", bare_clip),
                      "--clip-processor", "no image processor and no tokenizer")
    result = run_tiny(tmp_path / "r2", "--limit", "2", "--clip-model", bare_clip, "--clip-processor", models.clip)
    assert result.exit_code == 0, result.stderr
    assert run_tiny(tmp_path / "r3", "--limit", "2").exit_code == 0
    # The same weights with the same processor: the same scores, bit for bit.
    assert (tmp_path / "r2" / "scores.csv").read_bytes() == (tmp_path / "r3" / "scores.csv").read_bytes()
    assert json.loads((tmp_path / "r2" / "manifest.json").read_text())["clip"]["processor"] == str(models.clip)
    scored = tmp_path / "s"
    assert cli("score", tmp_path / "r3", "--clip-model", bare_clip, "--clip-processor", models.clip,
               "--out", scored, "--quiet").exit_code == 0
    assert (scored / "scores.csv").read_bytes() == (tmp_path / "r3" / "scores.csv").read_bytes()


def test_scorers_lists_short_names_and_they_resolve(cli, run_tiny, tmp_path):
    listing = cli("scorers")
    assert listing.exit_code == 0
    assert "pickscore\tclip\tyuvalkirstain/PickScore_v1 (processor: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)" in listing.stdout
    assert "clip-l336\tclip\topenai/clip-vit-large-patch14-336" in listing.stdout and "siglip-so400m" in listing.stdout
    assert "vqa-qwen2.5-vl-7b\tvqa\tQwen/Qwen2.5-VL-7B-Instruct" in listing.stdout
    # Offline here, so the name resolves to its hub id and fails to download it, saying which.
    result = run_tiny(tmp_path / "r", "--limit", "1", "--clip-model", "pickscore")
    assert_user_error(result, "yuvalkirstain/PickScore_v1")
    typo = run_tiny(tmp_path / "t", "--limit", "1", "--clip-model", "pickscor")
    assert_user_error(typo, "did you mean pickscore?")


def test_a_model_that_is_not_a_dual_encoder_is_one_line(run_tiny, models, tmp_path):
    folder = tmp_path / "text-only"
    from transformers import CLIPTextModel

    CLIPTextModel.from_pretrained(models.clip).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        if (models.clip / name).exists():
            shutil.copy(models.clip / name, folder / name)
    assert_user_error(run_tiny(tmp_path / "r", "--limit", "1", "--clip-model", folder), "neither a dual encoder")
