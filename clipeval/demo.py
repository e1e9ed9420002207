"""Tiny random models that load through the real diffusers/transformers code paths.

They serve two purposes: ``--checkpoint demo --clip-model demo`` (the whole job on any machine in
seconds; the scores mean nothing) and the test suite's fixtures. Everything is built offline: the
tokenizer is a hand-made byte-level BPE vocabulary, so no download is ever needed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_VERSION = "v1"  # bump when a recipe changes, so stale cached demos are rebuilt


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte-to-unicode table: every byte gets a printable symbol."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(extra))]
    order = printable + extra
    return [chr(c) for _, c in sorted(zip(order, codes))]


def make_tokenizer():
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = [("a", "t</w>"), ("c", "at</w>"), ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # model_max_length must be set: it defaults to 1e30 and diffusers would pad to it.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _text_config(tokenizer, *, hidden: int = 32, layers: int = 2, projection: int = 32, positions: int = 77):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=positions,
        # eos must be the tokenizer's: the value 2 switches CLIP to its legacy argmax pooling.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection,
    )


def build_clip(path: Path, *, seed: int = 0, image_size: int = 32, text_positions: int = 77) -> Path:
    """A 60k-parameter CLIPModel with tokenizer and image processor, saved as a model folder.
    ``text_positions=248`` makes a LongCLIP-shaped model (its tokenizer still says 77)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        projection_dim=32,
    )
    config = CLIPConfig(
        text_config=_text_config(tokenizer, positions=text_positions).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=32,
    )
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(path)
    return path


def _vae(seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def _unet(seed: int, **family):
    """The tiny two-level UNet both pipeline families share; ``family`` adds what differs."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        **family,
    )


def build_sd(path: Path, *, seed: int = 0) -> Path:
    """A 4.7 MB StableDiffusionPipeline (64×64 images by default)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = make_tokenizer()
    unet = _unet(seed, cross_attention_dim=32, attention_head_dim=4)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=_vae(seed + 2),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def build_sdxl(path: Path, *, seed: int = 0) -> Path:
    """A tiny StableDiffusionXLPipeline: two text encoders, the text_time added conditioning."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = make_tokenizer()
    unet = _unet(
        seed,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 time ids × 8 + the pooled 32
        cross_attention_dim=64,  # the two encoders' 32 + 32
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(seed + 3),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=make_tokenizer(),
        scheduler=scheduler,
    )
    pipe.save_pretrained(path)
    return path


def _build_once(target: Path, builder) -> Path:
    """Build into a temporary sibling and rename, so a killed build never leaves a half model."""
    if target.is_dir():
        return target
    from clipeval.hub import quiet_hf

    quiet_hf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        builder(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():  # a concurrent builder did not win the race either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_pipeline_dir() -> Path:
    from clipeval.fetch import cache_dir

    return _build_once(cache_dir() / "demo" / DEMO_VERSION / "pipeline", build_sd)


def demo_clip_dir() -> Path:
    from clipeval.fetch import cache_dir

    return _build_once(cache_dir() / "demo" / DEMO_VERSION / "clip", build_clip)


def build_siglip(path: Path, *, seed: int = 0, image_size: int = 32, text_positions: int = 16) -> Path:
    """A tiny random SiglipModel with its processor (a word-level fast tokenizer that pads to the
    text length, as SigLIP's own does), saved as a model folder: the SigLIP family in tests."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel,
                              SiglipProcessor, SiglipTextConfig, SiglipVisionConfig)

    words = ["<pad>", "</s>", "<unk>", *sorted({w for p in SMOKE_WORDS for w in p.split()})]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=text_positions,
                                        model_input_names=["input_ids"])  # as SigLIP's own tokenizer: no mask
    torch.manual_seed(seed)
    config = SiglipConfig(
        text_config=SiglipTextConfig(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=text_positions,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=1).to_dict(),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=image_size, patch_size=8).to_dict(),
    )
    SiglipModel(config).save_pretrained(path)
    SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": image_size, "width": image_size}),
                    tokenizer=tokenizer).save_pretrained(path)
    return path


# Words of everyday prompts, so the tiny word-level tokenizer knows some of them (the rest are <unk>).
SMOKE_WORDS = [
    "a photo of a cat sitting on a windowsill", "a red car on a road", "a dog playing in the snow",
    "a bowl of fruit on a wooden table", "a painting of a mountain lake at sunset", "the city at night",
]
