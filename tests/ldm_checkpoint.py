"""Write a diffusers Stable Diffusion pipeline as one original-layout (LDM) .safetensors file.

diffusers can read such single-file checkpoints but has no writer, so the tests carry this key
mapping: the inverse of diffusers' ``convert_ldm_*_checkpoint`` for SD 1.x-style UNets, VAEs and
CLIP text encoders. ``tests/test_single_file.py`` checks it round-trips through diffusers' own
converters before any run relies on it.
"""

from __future__ import annotations

import re
from pathlib import Path

UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _rename(rest: str, pairs) -> str:
    for new, old in pairs:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_ldm(state: dict, config: dict) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    per = config["layers_per_block"] + 1
    attention_blocks = {i for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t}
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        if m:
            side, block, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if side == "down":
                if kind == "downsamplers":
                    new = f"input_blocks.{(block + 1) * per}.0.op.{rest.removeprefix('conv.')}"
                else:
                    index = 1 + block * per + j
                    new = f"input_blocks.{index}.{0 if kind == 'resnets' else 1}.{_rename(rest, UNET_RESNET) if kind == 'resnets' else rest}"
            else:
                if kind == "upsamplers":
                    slot = 2 if block in attention_blocks else 1
                    new = f"output_blocks.{block * per + per - 1}.{slot}.{rest}"
                else:
                    index = block * per + j
                    new = f"output_blocks.{index}.{0 if kind == 'resnets' else 1}.{_rename(rest, UNET_RESNET) if kind == 'resnets' else rest}"
            out[new] = value
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m:
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            index = 2 * j if kind == "resnets" else 1
            out[f"middle_block.{index}.{_rename(rest, UNET_RESNET) if kind == 'resnets' else rest}"] = value
            continue
        raise KeyError(f"no LDM name for UNet key {key}")
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


def vae_to_ldm(state: dict, config: dict) -> dict:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        new = key
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", new)
        if ".mid_block.attentions.0." in new:
            head, rest = new.split(".mid_block.attentions.0.")
            new = f"{head}.mid.attn_1.{_rename(rest, VAE_ATTENTION)}"
            if value.ndim == 2:  # LDM stores these as 1×1 convolutions
                value = value[:, :, None, None]
        new = new.replace("conv_shortcut", "nin_shortcut")
        if new == key:
            raise KeyError(f"no LDM name for VAE key {key}")
        out[new] = value
    return {f"first_stage_model.{k}": v for k, v in out.items()}


def text_encoder_to_ldm(state: dict) -> dict:
    return {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v for k, v in state.items()}


def write_single_file(pipeline_dir: Path, target: Path) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")
    text = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
    tensors = {
        **unet_to_ldm(unet.state_dict(), dict(unet.config)),
        **vae_to_ldm(vae.state_dict(), dict(vae.config)),
        **text_encoder_to_ldm(text.state_dict()),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target))
    return target
