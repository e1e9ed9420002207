"""Tiny SD3 and Flux pipelines (transformer denoisers, flow matching, a T5 text encoder for Flux),
saved with save_pretrained, so `clipeval run` loads them through diffusers' own auto-loading as
it loads real SD3 and Flux checkpoints."""

from __future__ import annotations

from pathlib import Path


def _t5(seed: int, d_model: int):
    """A one-layer T5 encoder with a word-level fast tokenizer (no download)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "cat", "dog", "the", "on", "red", "blue"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=512)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(words), d_model=d_model, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config), tokenizer


def _vae(seed: int, latent_channels: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=32,
                         shift_factor=0.0609, scaling_factor=1.5035)


def build_flux(path: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from clipeval.demo import _text_config, make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    t5, t5_tokenizer = _t5(seed + 1, d_model=16)
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 2, 2))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(seed + 3, latent_channels=1),
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
                        transformer=transformer)
    pipe.save_pretrained(path)
    return path


def build_sd3(path: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from clipeval.demo import _text_config, make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    clip_l = CLIPTextModelWithProjection(_text_config(tokenizer))
    clip_g = CLIPTextModelWithProjection(_text_config(tokenizer))
    t5, t5_tokenizer = _t5(seed + 1, d_model=64)
    torch.manual_seed(seed + 2)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=64, pooled_projection_dim=64, out_channels=4)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_vae(seed + 3, latent_channels=4), text_encoder=clip_l, tokenizer=tokenizer,
                                    text_encoder_2=clip_g, tokenizer_2=make_tokenizer(), text_encoder_3=t5,
                                    tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(path)
    return path
