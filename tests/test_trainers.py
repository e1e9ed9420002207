"""What training tools write, evaluated as they wrote it: kohya's, ai-toolkit's and OneTrainer's
LoRA files, peft/diffusers LoRA files, LyCORIS (SimpleTuner), EMA weights, the steps in their names
and files, and sweeps over each trainer's layout.

LoRA files are written here by each trainer's naming rules from weights the test draws itself, and
the reference is a hand merge of those weights (W + scale·α/r·up·down, no peft), so a wrong
conversion, a module left out or a wrong scale shows in the pixels."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_user_error, files_of
from PIL import Image
from safetensors.torch import save_file

RANK, ALPHA = 4, 2.0
pytestmark = pytest.mark.xdist_group("trainers")  # its module fixtures are whole runs: built once

# What kohya's networks/lora.py targets: every Linear (and 1x1 conv) of the UNet's transformer
# blocks, and of the text encoder's attention and MLP.

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _targets(module, names):
    return {path: m for path, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(path.endswith(n) for n in names)}


def draw_lora(models, *, seed: int = 0, text: bool = True, base: Path | None = None) -> dict[str, dict[str, tuple]]:
    """{component: {module path: (down, up)}}: random rank-4 factors for the tiny SD's attention
    projections (and its text encoder's), big enough to move pixels."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base or models.sd)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for component, names in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS))[: 2 if text else 1]:
        for path, m in _targets(getattr(pipe, component), names).items():
            inner = m.in_features if isinstance(m, torch.nn.Linear) else m.in_channels
            outer = m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels
            shape = (1, 1) if isinstance(m, torch.nn.Conv2d) else ()
            down = (0.4 * torch.randn(RANK, inner, generator=g)).reshape(RANK, inner, *shape)
            up = (0.4 * torch.randn(outer, RANK, generator=g)).reshape(outer, RANK, *shape)
            out.setdefault(component, {})[path] = (down, up)
    return out


def kohya_file(lora, path: Path, *, metadata: dict | None = None, te_prefix: str = "lora_te_") -> Path:
    """kohya sd-scripts' naming: lora_unet_/lora_te_ + the module path with _ for ., lora_down/lora_up/alpha.
    kohya's text encoder paths start with text_model. (transformers 4's CLIPTextModel, which it pins)."""
    tensors = {}
    for component, modules in lora.items():
        prefix = "lora_unet_" if component == "unet" else te_prefix + "text_model_"
        for module, (down, up) in modules.items():
            key = prefix + module.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.lora_up.weight"] = up.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", **(metadata or {})})
    return path


def peft_file(lora, path: Path, *, prefix: dict[str, str] | None = None) -> Path:
    """diffusers' and peft's naming: unet.<module>.lora_A/lora_B (alpha = rank, so scale 1)."""
    prefix = prefix or {}
    tensors = {}
    for component, modules in lora.items():
        for module, (down, up) in modules.items():
            key = f"{prefix.get(component, component)}.{module}"
            tensors[f"{key}.lora_A.weight"] = down.contiguous()
            tensors[f"{key}.lora_B.weight"] = up.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def hand_merged(models, lora, target: Path, *, scale: float, alpha: float, base: Path | None = None) -> Path:
    """The tiny SD (or ``base``) with W + scale·alpha/rank·up·down merged by hand, saved as a pipeline folder."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base or models.sd)
    with torch.no_grad():
        for component, modules in lora.items():
            named = dict(getattr(pipe, component).named_modules())
            for module, (down, up) in modules.items():
                weight = named[module].weight
                delta = up.flatten(1) @ down.flatten(1)
                weight += (scale * alpha / RANK * delta).reshape(weight.shape)
    pipe.save_pretrained(target)
    return target


def pixels(run: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in sorted((run / "images").glob("*.png"))])


def assert_within_one_level(a: Path, b: Path) -> None:
    pa, pb = pixels(a), pixels(b)
    assert pa.shape == pb.shape and len(pa) > 0
    assert np.abs(pa - pb).max() <= 1


@pytest.fixture(scope="module")
def lora(models):
    return draw_lora(models)


@pytest.fixture(scope="module")
def base_run(models, tmp_path_factory):
    """The base model's images, made once: what scale 0 must equal and every LoRA must change."""
    from click.testing import CliRunner

    from clipeval.cli import main

    out = tmp_path_factory.mktemp("base") / "run"
    result = CliRunner().invoke(main, ["run", "--checkpoint", str(models.sd), "--clip-model", str(models.clip),
                                       "--prompt-library", "smoke", "--limit", "3", "--steps", "2", "--quiet",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


# -- LoRA files --------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_a_lora_file_equals_a_hand_merge_and_scale_zero_is_the_base(run_tiny, models, lora, base_run, tmp_path, layout):
    if layout == "kohya":  # kohya sd-scripts, ai-toolkit and OneTrainer (SD 1.5) write these keys
        file, alpha = kohya_file(lora, tmp_path / "out" / "my-lora-step00000300.safetensors"), ALPHA
    else:  # diffusers' scripts and OneTrainer's DIFFUSERS format
        file, alpha = peft_file(lora, tmp_path / "out" / "pytorch_lora_weights.safetensors"), RANK
    run = tmp_path / "lora"
    result = run_tiny(run, "--limit", "3", "--base-model", models.sd, "--lora-scale", "0.7", checkpoint=file)
    assert result.exit_code == 0, result.stderr
    reference = tmp_path / "ref"
    assert run_tiny(reference, "--limit", "3", checkpoint=hand_merged(models, lora, tmp_path / "merged", scale=0.7,
                                                                       alpha=alpha)).exit_code == 0
    assert_within_one_level(run, reference)
    assert np.abs(pixels(run) - pixels(base_run)).max() > 8  # the LoRA really moved them
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["checkpoint"]["kind"] == "lora" and manifest["settings"]["lora_scale"] == 0.7
    zero = tmp_path / "zero"
    assert run_tiny(zero, "--limit", "3", "--base-model", models.sd, "--lora-scale", "0", checkpoint=file).exit_code == 0
    assert files_of(zero) == files_of(base_run)


def test_a_flux_lora_in_peft_keys_as_ai_toolkit_writes_it(run_tiny, models, tmp_path):
    """ai-toolkit's and diffusers' Flux LoRAs: transformer.<module>.lora_A/lora_B."""
    from diffusers import FluxPipeline
    from tiny_transformers import build_flux

    flux = build_flux(tmp_path / "flux")
    pipe = FluxPipeline.from_pretrained(flux)
    g = torch.Generator().manual_seed(4)
    lora = {"transformer": {}}
    for path, m in _targets(pipe.transformer, ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out")).items():
        lora["transformer"][path] = (0.5 * torch.randn(RANK, m.in_features, generator=g),
                                     0.5 * torch.randn(m.out_features, RANK, generator=g))
    file = peft_file(lora, tmp_path / "output" / "flux_lora" / "flux_lora_000000250.safetensors")
    args = ("--limit", "2", "--height", "32", "--width", "32")
    run, base, ref = tmp_path / "run", tmp_path / "base", tmp_path / "ref"
    result = run_tiny(run, *args, "--base-model", flux, checkpoint=file)
    assert result.exit_code == 0, result.stderr
    assert run_tiny(base, *args, checkpoint=flux).exit_code == 0
    merged = hand_merged(models, lora, tmp_path / "merged", scale=1.0, alpha=RANK, base=flux)
    assert run_tiny(ref, *args, checkpoint=merged).exit_code == 0
    assert_within_one_level(run, ref)
    assert np.abs(pixels(run) - pixels(base)).max() > 8


def test_a_lora_that_misses_the_text_encoder_modules_is_refused(run_tiny, models, lora, tmp_path):
    """Half the file matching the base is not a LoRA applied: the text encoder's keys here name
    modules of SDXL's second text encoder, which an SD 1.5 pipeline does not have."""
    file = kohya_file(lora, tmp_path / "sdxl-like.safetensors", te_prefix="lora_te2_")
    result = run_tiny(tmp_path / "run", "--base-model", models.sd, checkpoint=file)
    assert_user_error(result, "sdxl-like.safetensors", "does not fit --base-model", "text_encoder_2")
    assert not (tmp_path / "run").exists()


def test_a_lora_diffusers_applies_only_in_part_is_refused(run_tiny, models, tmp_path):
    """diffusers 0.42 on transformers 5 reads kohya text-encoder attention keys only when the file
    also has out_proj; without it, it loads the MLP's alone. Part of a LoRA is not the LoRA."""
    lora = draw_lora(models)
    lora["text_encoder"] = {k: v for k, v in lora["text_encoder"].items() if k.endswith(("q_proj", "v_proj", "fc1"))}
    file = kohya_file(lora, tmp_path / "partial.safetensors")
    result = run_tiny(tmp_path / "run", "--base-model", models.sd, checkpoint=file)
    assert_user_error(result, "partial.safetensors", "names 6 modules of the text_encoder", "apply it to 2 of them")


def test_an_sdxl_lora_on_sd15_is_one_line(run_tiny, models, tmp_path):
    """Its UNet's attention widths differ: torch's list of size mismatches becomes one line."""
    file = kohya_file(draw_lora(models, base=models.sdxl, text=False), tmp_path / "sdxl-step00000010.safetensors")
    result = run_tiny(tmp_path / "run", "--base-model", models.sd, checkpoint=file)
    assert_user_error(result, "sdxl-step00000010.safetensors", "does not fit --base-model", "size mismatch")


def test_a_lora_for_another_family_is_one_line(run_tiny, models, lora, tmp_path):
    """A Flux-style file (transformer.… keys of modules the UNet does not have) on SD 1.5."""
    tensors = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 16),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, 4)}
    file = tmp_path / "flux_lora_000000250.safetensors"
    save_file(tensors, str(file))
    result = run_tiny(tmp_path / "run", "--base-model", models.sd, checkpoint=file)
    assert_user_error(result, "flux_lora_000000250.safetensors", "does not fit --base-model")
    assert "Adapter name" not in result.stderr


def test_a_truncated_or_growing_lora_file_is_refused_and_earlier_results_are_kept(run_tiny, models, lora, tmp_path):
    file = kohya_file(lora, tmp_path / "lora.safetensors")
    out = tmp_path / "run"
    assert run_tiny(out, "--limit", "2", "--base-model", models.sd, checkpoint=file).exit_code == 0
    before = files_of(out)
    file.write_bytes(file.read_bytes()[: file.stat().st_size - 100])
    assert_user_error(run_tiny(out, "--limit", "2", "--base-model", models.sd, checkpoint=file), "truncated")
    file.write_bytes(file.read_bytes()[:5])
    assert_user_error(run_tiny(out, "--limit", "2", "--base-model", models.sd, checkpoint=file), "not a safetensors file")
    assert files_of(out) == before


def test_a_lora_file_without_a_base_model_says_so(run_tiny, lora, tmp_path):
    file = kohya_file(lora, tmp_path / "lora.safetensors")
    assert_user_error(run_tiny(tmp_path / "run", checkpoint=file), "holds LoRA weights", "--base-model")


# -- LyCORIS -------------------------------------------------------------------------------------------

def lycoris_checkpoint(models, folder: Path, algo: str, seed: int = 1, prefix: str = "lycoris_") -> Path:
    """SimpleTuner's layout for lora_type lycoris: checkpoint-N/pytorch_lora_weights.safetensors in
    LyCORIS keys, written by the lycoris package's own save, and lycoris_config.json."""
    from diffusers import UNet2DConditionModel
    from lycoris import LycorisNetwork, create_lycoris

    unet = UNet2DConditionModel.from_pretrained(models.sd, subfolder="unet")
    network = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2, algo=algo, factor=4)
    network.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=g))
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "pytorch_lora_weights.safetensors"
    network.save_weights(str(file), torch.float32, None)
    if prefix != "lycoris_":  # kohya's LyCORIS network module: lora_unet_<module path>
        from safetensors.torch import load_file

        save_file({prefix + k.removeprefix("lycoris_"): v for k, v in load_file(str(file)).items()}, str(file))
    (folder / "lycoris_config.json").write_text(json.dumps({"algo": algo, "linear_dim": 4, "linear_alpha": 2}))
    network.restore()
    return folder


def lycoris_hand_merged(models, file: Path, target: Path, *, scale: float) -> Path:
    """The published formulas, merged by hand: LoHa ΔW = (w1a·w1b) ⊙ (w2a·w2b) · α/r; LoKr
    ΔW = w1 ⊗ (w2a·w2b) · α/r (w2 decomposed) or w1 ⊗ w2 (full matrices, scale 1). The adapter
    covers the UNet's linear and convolution layers, as lycoris' default preset does."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    weights = load_file(str(file))
    pipe = StableDiffusionPipeline.from_pretrained(models.sd)
    prefix = "lora_unet_" if any(k.startswith("lora_unet_") for k in weights) else "lycoris_"
    named = {prefix + n.replace(".", "_"): m for n, m in pipe.unet.named_modules()}
    modules = {k.split(".")[0] for k in weights}
    with torch.no_grad():
        for name in modules:
            w = {k.split(".", 1)[1]: v for k, v in weights.items() if k.split(".")[0] == name}
            alpha = float(w["alpha"]) if "alpha" in w else None
            if "diff" in w:  # full: the difference itself (and the bias's)
                delta = w["diff"]
                if "diff_b" in w:
                    named[name].bias += scale * w["diff_b"]
            elif "lora_down.weight" in w:  # LoCon: up·down · α/r
                down, up = w["lora_down.weight"], w["lora_up.weight"]
                delta = (up.flatten(1) @ down.flatten(1)) * alpha / down.shape[0]
            elif "hada_w1_a" in w:
                delta = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * alpha / w["hada_w1_b"].shape[0]
            else:
                w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
                if "lokr_w2" in w:  # a convolution's w2 holds the kernel: w1 ⊗ w2 over (out, in, 1, 1)
                    w2 = w["lokr_w2"]
                    delta = torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - 2)), w2)
                else:
                    delta = torch.kron(w1, w["lokr_w2_a"] @ w["lokr_w2_b"]) * alpha / w["lokr_w2_b"].shape[0]
            weight = named[name].weight
            weight += scale * delta.reshape(weight.shape)
    pipe.save_pretrained(target)
    return target


@pytest.mark.parametrize("algo, prefix", [("lokr", "lycoris_"), ("loha", "lycoris_"), ("locon", "lycoris_"),
                                          ("full", "lycoris_"), ("lokr", "lora_unet_")])
def test_lycoris_equals_a_hand_merge_of_the_published_formula(run_tiny, models, base_run, tmp_path, algo, prefix):
    """SimpleTuner's LyCORIS checkpoints (lycoris_ keys), and kohya's LyCORIS network module (lora_unet_ keys)."""
    from clipeval.layouts import read_header

    checkpoint = lycoris_checkpoint(models, tmp_path / "checkpoint-40", algo, prefix=prefix)
    file = checkpoint / "pytorch_lora_weights.safetensors"
    names = read_header(file).tensors
    marker = {"lokr": ".lokr_", "loha": ".hada_", "locon": ".lora_down", "full": ".diff"}[algo]
    assert all(k.startswith(prefix) for k in names) and any(marker in k for k in names)
    run = tmp_path / "run"
    result = run_tiny(run, "--limit", "3", "--base-model", models.sd, "--lora-scale", "0.8", checkpoint=checkpoint)
    assert result.exit_code == 0, result.stderr
    assert json.loads((run / "manifest.json").read_text())["checkpoint"]["kind"] == "lycoris"
    reference = tmp_path / "ref"
    assert run_tiny(reference, "--limit", "3", checkpoint=lycoris_hand_merged(models, file, tmp_path / "merged",
                                                                              scale=0.8)).exit_code == 0
    assert_within_one_level(run, reference)
    assert np.abs(pixels(run) - pixels(base_run)).max() > 8
    zero = tmp_path / "zero"
    assert run_tiny(zero, "--limit", "3", "--base-model", models.sd, "--lora-scale", "0", checkpoint=checkpoint).exit_code == 0
    assert files_of(zero) == files_of(base_run)


def test_lycoris_without_the_extra_names_it(run_tiny, models, tmp_path, monkeypatch):
    import sys

    checkpoint = lycoris_checkpoint(models, tmp_path / "checkpoint-40", "lokr")
    monkeypatch.setitem(sys.modules, "lycoris", None)  # as if not installed
    result = run_tiny(tmp_path / "run", "--base-model", models.sd, checkpoint=checkpoint)
    assert_user_error(result, "LyCORIS", "pip install 'clipeval[lycoris]'")


# -- EMA ------------------------------------------------------------------------------------------------

def _perturbed_unet(models, seed: int):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(models.sd, subfolder="unet")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=g))
    return unet


def ema_checkpoint(models, folder: Path) -> Path:
    """diffusers' train_text_to_image.py --use_ema: checkpoint-N/unet/ and checkpoint-N/unet_ema/
    (EMAModel.save_pretrained, whose config carries the EMA's own keys)."""
    from diffusers.training_utils import EMAModel

    _perturbed_unet(models, 5).save_pretrained(folder / "unet")
    averaged = _perturbed_unet(models, 6)
    EMAModel(averaged.parameters(), model_cls=type(averaged), model_config=averaged.config).save_pretrained(folder / "unet_ema")
    return folder


def _pipeline_with_unet(models, unet_folder: Path, target: Path) -> Path:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(models.sd)
    pipe.unet = UNet2DConditionModel.from_pretrained(unet_folder)
    pipe.save_pretrained(target)
    return target


def test_ema_weights_are_evaluated_by_default_and_no_ema_takes_the_raw_ones(run_tiny, models, tmp_path):
    checkpoint = ema_checkpoint(models, tmp_path / "train" / "checkpoint-8")
    ema, raw = tmp_path / "ema", tmp_path / "raw"
    assert run_tiny(ema, "--limit", "2", "--base-model", models.sd, checkpoint=checkpoint).exit_code == 0
    assert run_tiny(raw, "--limit", "2", "--base-model", models.sd, "--no-ema", checkpoint=checkpoint).exit_code == 0
    ref_ema, ref_raw = tmp_path / "ref-ema", tmp_path / "ref-raw"
    assert run_tiny(ref_ema, "--limit", "2", checkpoint=_pipeline_with_unet(models, checkpoint / "unet_ema", tmp_path / "p1")).exit_code == 0
    assert run_tiny(ref_raw, "--limit", "2", checkpoint=_pipeline_with_unet(models, checkpoint / "unet", tmp_path / "p2")).exit_code == 0
    assert files_of(ema) == files_of(ref_ema) and files_of(raw) == files_of(ref_raw)
    assert files_of(ema) != files_of(raw)
    assert json.loads((ema / "manifest.json").read_text())["checkpoint"]["weights"] == "ema"
    assert json.loads((raw / "manifest.json").read_text())["checkpoint"]["weights"] == "raw"
    # The choice is part of the run: resuming the EMA folder with --no-ema is refused, naming it.
    assert_user_error(run_tiny(ema, "--limit", "2", "--base-model", models.sd, "--no-ema", checkpoint=checkpoint),
                      "weights 'raw' (was 'ema')")


def test_simpletuners_ema_lora_is_chosen_the_same_way(run_tiny, models, lora, tmp_path):
    checkpoint = tmp_path / "checkpoint-12"
    peft_file(lora, checkpoint / "pytorch_lora_weights.safetensors")
    peft_file(draw_lora(models, seed=9), checkpoint / "ema" / "pytorch_lora_weights.safetensors")
    (checkpoint / "training_state.json").write_text(json.dumps({"global_step": 12}))
    ema, raw = tmp_path / "ema", tmp_path / "raw"
    assert run_tiny(ema, "--limit", "2", "--base-model", models.sd, checkpoint=checkpoint).exit_code == 0
    assert run_tiny(raw, "--limit", "2", "--base-model", models.sd, "--no-ema", checkpoint=checkpoint).exit_code == 0
    assert json.loads((ema / "manifest.json").read_text())["checkpoint"]["location"].endswith("ema/pytorch_lora_weights.safetensors")
    assert files_of(ema) != files_of(raw)


# -- steps ----------------------------------------------------------------------------------------------

def test_steps_from_what_each_trainer_writes(tmp_path, lora):
    from clipeval.layouts import training_step

    kohya = tmp_path / "kohya"
    assert training_step(kohya_file(lora, kohya / "cat-step00000300.safetensors")) == 300
    assert training_step(kohya_file(lora, kohya / "cat-000002.safetensors", metadata={"ss_steps": "64", "ss_epoch": "2"})) == 64
    epoch = kohya_file(lora, kohya / "dog-000003.safetensors")  # written with --no_metadata: the -state folder says
    (kohya / "dog-000003-state").mkdir()
    (kohya / "dog-000003-state" / "train_state.json").write_text(json.dumps({"current_epoch": 3, "current_step": 96}))
    assert training_step(epoch) == 96
    assert training_step(kohya_file(lora, kohya / "cat.safetensors", metadata={"ss_steps": "128"})) == 128
    assert training_step(kohya_file(lora, kohya / "plain.safetensors")) is None
    assert training_step(tmp_path / "output" / "my_job" / "my_job_000000250.safetensors") == 250  # ai-toolkit
    assert training_step(tmp_path / "my_job_000001000") == 1000  # ai-toolkit's full fine-tune folder
    assert training_step(tmp_path / "2026-12-01_20-17-02-save-30-7-2.safetensors") == 30  # OneTrainer
    backup = tmp_path / "backup" / "2026-12-01_20-17-02-backup-40-9-1"
    kohya_file(lora, backup / "lora" / "lora.safetensors")
    assert training_step(backup) == 40 and training_step(backup / "lora" / "lora.safetensors") == 40
    assert training_step(tmp_path / "checkpoint-1500") == 1500
    state = tmp_path / "final"
    state.mkdir()
    (state / "training_state.json").write_text(json.dumps({"global_step": 777}))
    assert training_step(state) == 777


def test_kohyas_final_file_comes_after_the_step_file_of_its_step(lora, tmp_path):
    from clipeval.layouts import find_checkpoints

    out = tmp_path / "out"
    kohya_file(lora, out / "cat-step00000010.safetensors")
    kohya_file(lora, out / "cat.safetensors", metadata={"ss_steps": "10"})
    kohya_file(lora, out / "dog.safetensors", metadata={"ss_steps": "5"})  # no siblings: not cat's final
    found = find_checkpoints(out)
    assert [(f.name, f.step, f.final) for f in found] == [("dog", 5, False), ("cat-step00000010", 10, False),
                                                         ("cat", 10, True)]


def test_run_with_report_to_and_no_step_says_so_and_step_overrides(run_tiny, models, lora, tmp_path):
    file = kohya_file(lora, tmp_path / "plain.safetensors")
    logs = tmp_path / "logs"
    result = run_tiny(tmp_path / "a", "--limit", "1", "--base-model", models.sd, "--report-to", "tensorboard",
                      "--logging-dir", logs, checkpoint=file)
    assert_user_error(result, "no training step", "--step")
    result = run_tiny(tmp_path / "a", "--limit", "1", "--base-model", models.sd, "--report-to", "tensorboard",
                      "--logging-dir", logs, "--step", "5", checkpoint=file)
    assert result.exit_code == 0 and "logged step 5" in result.stderr


# -- sweeps over each trainer's layout ---------------------------------------------------------------------

def sweep(cli, models, training, results, *extra):
    return cli("sweep", training, "--out", results, "--prompt-library", "smoke", "--limit", "1", "--steps", "2",
               "--base-model", models.sd, "--clip-model", models.clip, "--settle", "0", "--quiet", *extra)


def _history(results: Path) -> pd.DataFrame:
    return pd.read_csv(results / "history.csv", keep_default_na=False)


@pytest.mark.slow
def test_sweep_over_kohyas_output(cli, models, lora, tmp_path):
    out = tmp_path / "kohya-out"
    kohya_file(lora, out / "cat-step00000004.safetensors")
    kohya_file(draw_lora(models, seed=2), out / "cat-step00000008.safetensors")
    (out / "cat-step00000008-state").mkdir()  # --save_state: accelerate's state, never a checkpoint
    save_file({"w": torch.zeros(2)}, str(out / "cat-step00000008-state" / "model.safetensors"))
    (out / "cat-step00000008-state" / "train_state.json").write_text('{"current_epoch": 1, "current_step": 8}')
    kohya_file(draw_lora(models, seed=3), out / "cat-000001.safetensors", metadata={"ss_steps": "6"})
    kohya_file(draw_lora(models, seed=4), out / "cat.safetensors", metadata={"ss_steps": "10"})
    results = tmp_path / "results"
    first = sweep(cli, models, out, results)
    assert first.exit_code == 0, first.stderr
    history = _history(results)
    assert history["step"].tolist() == [4, 6, 8, 10]
    assert history["run"].tolist() == ["cat-step00000004", "cat-000001", "cat-step00000008", "cat"]
    assert "4 evaluated" in first.stdout
    again = sweep(cli, models, out, results)
    assert again.exit_code == 0 and "0 evaluated, 4 up to date" in again.stdout
    assert "evaluating" not in again.stderr


@pytest.mark.slow
def test_sweep_over_ai_toolkit_and_onetrainer_layouts(cli, models, lora, tmp_path):
    aitk = tmp_path / "output"
    kohya_file(lora, aitk / "my_job" / "my_job_000000250.safetensors")
    kohya_file(draw_lora(models, seed=2), aitk / "my_job" / "my_job_000000500.safetensors")
    (aitk / "my_job" / "samples").mkdir()
    (aitk / "my_job" / "config.yaml").write_text("job: extension\n")
    result = sweep(cli, models, aitk, tmp_path / "aitk-results")
    assert result.exit_code == 0, result.stderr
    assert _history(tmp_path / "aitk-results")["step"].tolist() == [250, 500]

    workspace = tmp_path / "workspace"
    kohya_file(lora, workspace / "save" / "2026-12-01_20-17-02-save-30-7-2.safetensors")
    peft_file(draw_lora(models, seed=2), workspace / "save" / "2026-12-01_20-19-40-save-60-14-4.safetensors")
    for step in (30, 45):  # a backup of step 30 duplicates the save; step 45 exists only as a backup
        backup = workspace / "backup" / f"2026-12-01_20-18-00-backup-{step}-7-2"
        kohya_file(draw_lora(models, seed=step), backup / "lora" / "lora.safetensors")
        (backup / "meta.json").write_text(json.dumps({"train_progress": {"global_step": step}}))
    result = sweep(cli, models, workspace, tmp_path / "ot-results")
    assert result.exit_code == 0, result.stderr
    history = _history(tmp_path / "ot-results")
    assert history["step"].tolist() == [30, 45, 60]
    assert history["run"].tolist()[0] == "save__2026-12-01_20-17-02-save-30-7-2"


@pytest.mark.slow
def test_sweep_over_diffusers_full_training_with_ema_evaluates_the_final_pipeline_last(cli, models, tmp_path):
    out = tmp_path / "sd-model-finetuned"
    for step in (2, 4):
        ema_checkpoint(models, out / f"checkpoint-{step}")
    _pipeline_with_unet(models, out / "checkpoint-4" / "unet_ema", out)  # the final pipeline holds the EMA UNet
    results = tmp_path / "results"
    result = sweep(cli, models, out, results)
    assert result.exit_code == 0, result.stderr
    history = _history(results)
    assert history["run"].tolist() == ["checkpoint-2", "checkpoint-4", "final"]
    assert history["step"].tolist() == ["2", "4", ""]
    assert history["weights"].tolist() == ["ema", "ema", ""]
    assert "final model" in result.stderr
    # The final pipeline is checkpoint-4's EMA: the same pixels.
    assert files_of(results / "final") == files_of(results / "checkpoint-4")
    raw = sweep(cli, models, out, tmp_path / "raw", "--no-ema")
    assert raw.exit_code == 0 and _history(tmp_path / "raw")["weights"].tolist() == ["raw", "raw", ""]


@pytest.mark.slow
def test_sweep_over_a_diffusers_lora_run_evaluates_the_root_lora(cli, models, lora, tmp_path):
    out = tmp_path / "lora-out"
    for step in (100, 200):
        peft_file(draw_lora(models, seed=step), out / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors")
        (out / f"checkpoint-{step}" / "optimizer.bin").write_bytes(b"\0" * 16)
    peft_file(lora, out / "pytorch_lora_weights.safetensors")
    result = sweep(cli, models, out, tmp_path / "results")
    assert result.exit_code == 0, result.stderr
    assert _history(tmp_path / "results")["run"].tolist() == ["checkpoint-100", "checkpoint-200", "final"]


def test_sweep_over_simpletuners_lycoris_run_with_its_final_pipeline(cli, models, tmp_path):
    out = tmp_path / "simpletuner-out"
    for step in (10, 20):
        checkpoint = lycoris_checkpoint(models, out / f"checkpoint-{step}", "lokr", seed=step)
        (checkpoint / "training_state.json").write_text(json.dumps({"global_step": step}))
    (out / "temporary-30").mkdir()  # a checkpoint being written, before SimpleTuner moves it into place
    shutil.copytree(models.sd, out / "pipeline")  # its final model
    results = tmp_path / "results"
    result = sweep(cli, models, out, results)
    assert result.exit_code == 0, result.stderr
    history = _history(results)
    assert history["run"].tolist() == ["checkpoint-10", "checkpoint-20", "pipeline"]
    assert history["step"].tolist() == ["10", "20", ""]
    assert "evaluating pipeline (the training folder's final model" in result.stderr
    assert json.loads((results / "checkpoint-10" / "manifest.json").read_text())["checkpoint"]["kind"] == "lycoris"


def test_a_sweep_that_finds_nothing_exits_2(cli, models, tmp_path):
    empty = tmp_path / "training"
    (empty / "logs").mkdir(parents=True)
    (empty / "unet").mkdir()
    result = sweep(cli, models, empty, tmp_path / "results")
    assert_user_error(result, "no checkpoint found", "kohya")


def test_a_sweep_waits_for_a_file_still_growing_or_cut_short(cli, models, lora, tmp_path):
    out = tmp_path / "kohya-out"
    done = kohya_file(lora, out / "cat-step00000004.safetensors")
    growing = kohya_file(lora, out / "cat-step00000008.safetensors")
    cut = kohya_file(lora, out / "cat-step00000012.safetensors")
    cut.write_bytes(cut.read_bytes()[:-64])
    old = done.stat().st_mtime - 600
    os.utime(done, (old, old))
    os.utime(cut, (old, old))
    result = sweep(cli, models, out, tmp_path / "results", "--settle", "60")
    assert result.exit_code == 0, result.stderr
    assert "1 evaluated, 0 up to date, 2 still being written" in result.stdout
    assert "cat-step00000012.safetensors is truncated" in result.stderr
    assert _history(tmp_path / "results")["step"].tolist() == [4]
    assert growing.exists()


# -- SimpleTuner's config, read as SimpleTuner reads it -------------------------------------------------

def _load(tmp_path, config: dict, name: str = "config.json"):
    from clipeval import simpletuner

    path = tmp_path / name
    path.write_text(json.dumps({"--evaluation_type": "clip", **config}))
    return simpletuner.load(path)


def test_simpletuners_validation_defaults_fill_what_the_config_leaves_out(tmp_path):
    options, notes = _load(tmp_path, {"--pretrained_model_name_or_path": "base", "--output_dir": str(tmp_path / "out")})
    assert options["steps"] == 30 and options["guidance_scale"] == 7.5 and options["images_per_prompt"] == 1
    assert (options["width"], options["height"]) == (256, 256)
    assert options["default_negative_prompt"] == "blurry, cropped, ugly" and "negative_prompt" not in options
    assert options["clip_model"] == "openai/clip-vit-large-patch14-336" and options["seed"] == 0
    assert options["report_to"] == "none" and options["project"] == "simpletuner"
    assert options["logging_dir"] == tmp_path / "out" / "logs"  # SimpleTuner joins it to output_dir
    assert "prompt_library" not in options and notes == []
    seeded, _ = _load(tmp_path, {"seed": 42})  # validation_seed or seed or 0, as SimpleTuner seeds its generator
    assert seeded["seed"] == 42
    assert _load(tmp_path, {"seed": 42, "validation_seed": 7})[0]["seed"] == 7
    none, _ = _load(tmp_path, {"validation_negative_prompt": "None"})
    assert "negative_prompt" not in none and "default_negative_prompt" not in none


@pytest.mark.parametrize("family, flavour, base, scheduler", [
    ("sd1x", None, "Lykon/dreamshaper-8", "ddim"),  # the family's default flavour
    ("sd1x", "1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5", "ddim"),
    ("sd2x", "2.1", "stabilityai/stable-diffusion-2-1", "euler"),
    ("sdxl", None, "stabilityai/stable-diffusion-xl-base-1.0", "ddim"),
    ("flux", "dev", "black-forest-labs/flux.1-dev", None),  # as SimpleTuner spells it
])
def test_model_family_and_flavour_name_the_base_model_simpletuner_uses(tmp_path, family, flavour, base, scheduler):
    config = {"model_family": family, **({"model_flavour": flavour} if flavour else {})}
    options, notes = _load(tmp_path, config)
    assert options["base_model"] == base and options.get("scheduler") == scheduler
    assert any(base in n for n in notes)
    assert _load(tmp_path, {**config, "pretrained_model_name_or_path": "mine"})[0]["base_model"] == "mine"


def test_report_to_lists_keywords_and_the_command_line_wins(cli, tmp_path, models):
    assert _load(tmp_path, {"report_to": "wandb,tensorboard"})[0]["report_to"] == "wandb,tensorboard"
    assert _load(tmp_path, {"report_to": ["tensorboard"]})[0]["report_to"] == "tensorboard"
    assert _load(tmp_path, {"report_to": "all"})[0]["report_to"] == "tensorboard,wandb"  # both installed here
    assert _load(tmp_path, {"report_to": "none"})[0]["report_to"] == "none"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"evaluation_type": "clip", "pretrained_model_name_or_path": str(models.sd),
                                  "output_dir": str(models.sd), "report_to": "comet_ml",
                                  "pretrained_evaluation_model_name_or_path": str(models.clip)}))
    assert_user_error(cli("run", "--config", config, "--out", tmp_path / "r"), "report_to 'comet_ml'")
    ok = cli("run", "--config", config, "--out", tmp_path / "r", "--report-to", "none", "--limit", "1", "--steps", "1",
             "--prompt-library", "smoke",
             "--width", "64", "--height", "64", "--quiet")
    assert ok.exit_code == 0, ok.stderr


@pytest.mark.parametrize("value", [True, "true", "yes", "on", "1", "default", "image", "images", ""])
def test_validation_prompt_library_spellings_select_the_builtin_library(tmp_path, value):
    options, _ = _load(tmp_path, {"validation_prompt_library": value})
    assert options["prompt_library"] == "simpletuner"


@pytest.mark.parametrize("value", [False, "false", "no", "0", "none", "off"])
def test_validation_prompt_library_spellings_that_turn_it_off(tmp_path, value):
    assert "prompt_library" not in _load(tmp_path, {"validation_prompt_library": value})[0]


def test_an_audio_prompt_library_is_refused(cli, tmp_path):
    from clipeval.errors import ClipevalError

    with pytest.raises(ClipevalError, match="validation_prompt_library 'audio'"):
        _load(tmp_path, {"validation_prompt_library": "audio"})


def test_builtin_and_user_libraries_and_validation_prompt_are_one_library_in_simpletuners_order(tmp_path, mirror):
    from clipeval.prompts import load_library

    user = tmp_path / "user.json"
    user.write_text(json.dumps({"cat": {"prompt": "a cat on a sofa", "adapter_strength": 0.5}, "dog": "a dog"}))
    options, _ = _load(tmp_path, {"validation_prompt_library": True, "user_prompt_library": user.name,
                                  "validation_prompt": "a red cube"})
    library = load_library(options["prompt_library"])
    names = [p.name for p in library.prompts]
    assert len(names) == 53 + 2 + 1 and names[0] == "alien_landscape"
    assert names[-3:] == ["cat", "dog", "validation"]
    assert [p.prompt for p in library.prompts][-3:] == ["a cat on a sofa", "a dog", "a red cube"]
    assert [p.prompt_id for p in library.prompts] == list(range(56))


def test_user_prompt_library_entries_must_be_prompts(cli, run_tiny, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"a": {"caption": "a caption"}, "b": {"tags": "red, cube"}, "c": "plain"}))
    out = tmp_path / "run"
    assert run_tiny(out, library=good).exit_code == 0
    assert pd.read_csv(out / "prompts.csv")["prompt"].tolist() == ["a caption", "red, cube", "plain"]
    for bad in ({"a": 1}, {"a": {"strength": 1}}, {"a": ["x"]}):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        assert_user_error(run_tiny(tmp_path / "r", library=path), "entry 'a'", "text values")


@pytest.mark.parametrize("value, size", [("1", 1024), ("1.0", 1024), ("2", 2000), (3, 3000), ("512", 512),
                                         ("128", 128), ("1024x768", (1024, 768))])
def test_validation_resolution_in_pixels_or_megapixels(tmp_path, value, size):
    options, _ = _load(tmp_path, {"validation_resolution": value})
    width, height = size if isinstance(size, tuple) else (size, size)
    assert (options["width"], options["height"]) == (width, height)


def test_fractional_megapixels_are_refused_with_what_simpletuner_would_do(tmp_path):
    from clipeval.errors import ClipevalError

    with pytest.raises(ClipevalError, match="0.5.*0 px"):
        _load(tmp_path, {"validation_resolution": "0.5"})


def test_env_placeholders_schedulers_images_and_unhonoured_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNS", str(tmp_path / "runs"))
    options, notes = _load(tmp_path, {
        "output_dir": "{env:RUNS}/lora", "pretrained_model_name_or_path": "{env:NOT_SET_ANYWHERE}base",
        "num_validation_images": 3, "validation_noise_scheduler": "euler-a",
        "validation_guidance_rescale": 0.7, "validation_steps": 100, "validation_torch_compile": True,
        "tracker_project_name": "my-lora", "logging_dir": "tb"})
    assert options["checkpoint"] == f"{tmp_path}/runs/lora" and options["base_model"] == "base"
    assert options["images_per_prompt"] == 3 and options["scheduler"] == "euler-a"
    assert options["project"] == "my-lora" and options["logging_dir"] == tmp_path / "runs" / "lora" / "tb"
    (note,) = notes
    assert "validation_guidance_rescale=0.7" in note and "validation_steps" not in note and "torch_compile" not in note
    _, notes = _load(tmp_path, {"validation_noise_scheduler": "perflow"})
    assert "validation_noise_scheduler='perflow'" in notes[0]


def test_a_config_run_uses_simpletuners_defaults_end_to_end(cli, models, tmp_path):
    """No validation keys at all: guidance 7.5, the default negative prompt and sd2x's Euler
    scheduler, as SimpleTuner's own validation of that run (its 30 steps at 256 px are overridden
    on the command line here, for speed; the unit test above holds those defaults)."""
    user = tmp_path / "prompts.json"
    user.write_text(json.dumps({"cube": "a red cube"}))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"--evaluation_type": "clip", "--model_family": "sd2x",
                                  "--pretrained_model_name_or_path": str(models.sd), "--output_dir": str(models.sd),
                                  "--pretrained_evaluation_model_name_or_path": str(models.clip),
                                  "--user_prompt_library": str(user), "--validation_prompt": "a blue ball"}))
    out = tmp_path / "run"
    result = cli("run", "--config", config, "--out", out, "--quiet", "--steps", "2", "--width", "64", "--height", "64")
    assert result.exit_code == 0, result.stderr
    g = json.loads((out / "manifest.json").read_text())["generation"]
    assert (g["steps"], g["guidance_scale"], g["width"], g["height"]) == (2, 7.5, 64, 64)
    assert g["negative_prompt"] == "blurry, cropped, ugly" and g["scheduler"] == "EulerDiscreteScheduler"
    assert pd.read_csv(out / "prompts.csv")["name"].tolist() == ["cube", "validation"]


# -- --scale percent: SimpleTuner's own statistics -------------------------------------------------------

def test_scale_percent_logs_simpletuners_statistics_and_the_files_keep_clipevals(run_tiny, tmp_path):
    from test_training import _tensorboard

    out, logs = tmp_path / "run", tmp_path / "logs"
    result = run_tiny(out, "--limit", "4", "--images-per-prompt", "2", "--report-to", "tensorboard",
                      "--logging-dir", logs, "--step", "3", "--scale", "percent")
    assert result.exit_code == 0, result.stderr
    scores = pd.read_csv(out / "scores.csv")
    # SimpleTuner's evaluate_images: per prompt name, the last image's torchmetrics score (clamped
    # 100·cos), round(·, 4); np.mean and np.std (ddof 0) over those.
    last = {row.prompt_id: row.clip_score for row in scores.sort_values(["prompt_id", "sample"]).itertuples()}
    per = [round(max(100 * c, 0.0), 4) for c in last.values()]
    events = _tensorboard(logs / "clipeval")
    logged = {tag: events.Scalars(tag)[0].value for tag in ("clip/mean", "clip/min", "clip/max", "clip/std")}
    assert logged["clip/mean"] == pytest.approx(np.mean(per), abs=1e-4)
    assert logged["clip/std"] == pytest.approx(np.std(per), abs=1e-4)
    assert (logged["clip/min"], logged["clip/max"]) == pytest.approx((min(per), max(per)), abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clip/mean"] == pytest.approx(scores["clip_score"].mean(), abs=1e-9)  # all 8 images, in cosine
    assert abs(np.mean(per) - 100 * summary["clip/mean"]) > 1e-3  # the two really differ here


def test_score_takes_scale_percent(cli, run_tiny, models, tmp_path):
    run = tmp_path / "run"
    assert run_tiny(run, "--limit", "2").exit_code == 0
    mean = json.loads((run / "summary.json").read_text())["clip/mean"]
    result = cli("score", run, "--clip-model", models.clip, "--out", tmp_path / "s", "--scale", "percent", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"clip/mean {100 * mean:.2f} (100 x cosine)")


def test_scheduler_swaps_the_pipelines_and_is_part_of_the_run(run_tiny, models, base_run, tmp_path):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    out = tmp_path / "euler-a"
    assert run_tiny(out, "--limit", "3", "--scheduler", "euler-a").exit_code == 0
    pipe = StableDiffusionPipeline.from_pretrained(models.sd)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "by-hand")
    reference = tmp_path / "ref"
    assert run_tiny(reference, "--limit", "3", checkpoint=tmp_path / "by-hand").exit_code == 0
    assert files_of(out) == files_of(reference) and files_of(out) != files_of(base_run)
    assert_user_error(run_tiny(out, "--limit", "3", "--scheduler", "ddim"), "scheduler 'ddim' (was 'euler-a')")
    assert_user_error(run_tiny(tmp_path / "x", "--scheduler", "flow_matching"), "noise-prediction model")
    assert_user_error(run_tiny(tmp_path / "y", "--scheduler", "lms"), "--scheduler lms: use one of")
