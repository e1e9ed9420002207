"""What each trainer writes, read without a model: which files are adapters, which step a checkpoint
is, which weights are the EMA, and which entries of a training folder are checkpoints. Files are
laid out as each trainer lays them out (see ../shared/TRAINERS.md); tensors are tiny."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipeval import layouts


def lora(path: Path, prefix: str = "lora_unet_a", *, metadata: dict | None = None, kind: str = "kohya") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "kohya":
        tensors = {f"{prefix}.lora_down.weight": torch.zeros(2, 4), f"{prefix}.lora_up.weight": torch.zeros(4, 2),
                   f"{prefix}.alpha": torch.tensor(2.0)}
    else:
        tensors = {f"{prefix}.lora_A.weight": torch.zeros(2, 4), f"{prefix}.lora_B.weight": torch.zeros(4, 2)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def pipeline(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    denoiser(folder / "unet")
    return folder


def denoiser(folder: Path, name: str = "UNet2DConditionModel") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": name}))
    save_file({"w": torch.zeros(1)}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def found(root: Path) -> list[tuple[str, int | None, bool]]:
    return [(f.name, f.step, f.final) for f in layouts.find_checkpoints(root)]


# -- headers -------------------------------------------------------------------------------------------------

def test_a_header_is_read_and_a_cut_file_is_incomplete(tmp_path):
    path = lora(tmp_path / "a.safetensors", metadata={"ss_steps": "12"})
    header = layouts.read_header(path)
    assert set(header.tensors) == {"lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha"}
    assert header.metadata["ss_steps"] == "12" and header.complete
    data = path.read_bytes()
    path.write_bytes(data[:-1])  # one byte short of its last tensor
    assert layouts.read_header(path).complete is False and not layouts.safetensors_complete(path)
    path.write_bytes(data[:10])  # cut inside the header
    assert layouts.read_header(path) is None
    path.write_bytes(b"")
    assert layouts.read_header(path) is None
    path.write_bytes((8).to_bytes(8, "little") + b"[1,2,3] ")  # a header that is no object
    assert layouts.read_header(path) is None
    path.write_bytes(data)
    assert layouts.safetensors_complete(path)


def test_odd_headers_are_read_as_far_as_they_are_safetensors(tmp_path):
    def raw(header: dict, tail: bytes = b"", length: int | None = None) -> Path:
        text = json.dumps(header).encode()
        path = tmp_path / "odd.safetensors"
        path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + tail)
        return path

    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty), metadata={"ss_steps": "3"})  # metadata alone, no tensor: a whole file
    header = layouts.read_header(empty)
    assert header is not None and header.tensors == {} and header.complete and header.metadata == {"ss_steps": "3"}
    assert layouts.read_header(raw({}, length=len(b"{}") + 8)) is None  # the header says more than the file holds
    odd = layouts.read_header(raw({"__metadata__": [1], "junk": {"a": 1}, "w": {"dtype": "F32", "shape": [1],
                                                                            "data_offsets": [0, 4]}}, b"\0" * 4))
    assert odd.metadata == {} and set(odd.tensors) == {"w"} and odd.complete


def test_adapters_are_told_by_their_tensor_names():
    from clipeval.layouts import adapter_format, adapter_modules

    assert adapter_format(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]) == "lora"
    assert adapter_format(["double_blocks.0.processor.qkv_lora1.down.weight"]) == "lora"  # XLabs' Flux LoRAs
    assert adapter_format(["transformer.blocks.0.attn.to_q.lora_A.weight"]) == "lora"
    assert adapter_format(["lycoris_down_blocks_0_attentions_0_proj_in.lora_down.weight"]) == "lycoris"
    assert adapter_format(["lora_unet_down_blocks_0_proj_in.hada_w1_a"]) == "lycoris"
    assert adapter_format(["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.bias"]) is None
    named = adapter_modules(["unet.a.b.lora_A.weight", "unet.a.b.lora_B.weight", "unet.a.b.lora_magnitude_vector",
                             "lora_te_text_model_x.lora_down.weight", "lora_te_text_model_x.alpha"])
    assert named == {"denoiser": {"a.b"}, "text_encoder": {"text_model_x"}}  # magnitudes and alphas are no module


def test_the_component_a_key_prefix_addresses():
    c = layouts.adapter_component
    assert c("lora_unet_down_blocks_0") == ("denoiser", "down_blocks_0")
    assert c("lora_te_text_model_x") == ("text_encoder", "text_model_x")
    assert c("lora_te1_text_model_x") == ("text_encoder", "text_model_x")
    assert c("lora_te2_text_model_x") == ("text_encoder_2", "text_model_x")
    assert c("lora_te3_x") == ("text_encoder_3", "x")
    assert c("lycoris_down_blocks_0") == ("denoiser", "down_blocks_0")
    assert c("transformer.blocks.0") == ("denoiser", "blocks.0")
    assert c("diffusion_model.double_blocks.0") == ("denoiser", "double_blocks.0")
    assert c("text_encoder_2.layers.0") == ("text_encoder_2", "layers.0")
    assert c("down_blocks.0.attn") == ("denoiser", "down_blocks.0.attn")  # peft's own files: no prefix
    assert c("unet") == ("denoiser", "unet")


# -- steps -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, step", [
    ("checkpoint-1500", 1500), ("checkpoint_20", 20), ("global_step300", 300), ("ckpt-7", 7),
    ("cat-step00000300", 300), ("my_job_000000250", 250), ("my_job_1000000000", 1000000000),
    ("2026-12-01_20-17-02-save-30-7-2", 30), ("2026-12-01_20-17-02-backup-45-9-1", 45),
    ("cat-000002", None), ("cat", None), ("my_job_00250", None), ("steps", None),
])
def test_the_step_in_a_name(name, step):
    assert layouts.step_in_name(name) == step


def test_state_files_name_the_step_by_each_trainers_key(tmp_path):
    for name, key, value in (("trainer_state.json", "global_step", 5), ("training_state.json", "global_step", 6),
                             ("train_state.json", "current_step", 7), ("trainer_state.json", "step", 8)):
        folder = tmp_path / f"{name}-{key}"
        folder.mkdir()
        (folder / name).write_text(json.dumps({key: value, "current_epoch": 99}))
        assert layouts.training_step(folder) == value
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "trainer_state.json").write_text(json.dumps({"global_step": True}))  # a bool is no step
    assert layouts.training_step(odd) is None
    (odd / "trainer_state.json").write_text("[]")
    assert layouts.training_step(odd) is None
    (odd / "trainer_state.json").write_text("{not json")
    assert layouts.training_step(odd) is None


def test_steps_that_are_not_there_are_none_and_a_dotted_folder_keeps_its_name(tmp_path):
    garbage = tmp_path / "x.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    assert layouts.training_step(garbage) is None
    dotted = tmp_path / "sd-v1.5-checkpoint-300"
    dotted.mkdir()
    assert layouts.training_step(dotted) == 300  # a folder's whole name, not its "stem" sd-v1
    deep = lora(tmp_path / "checkpoint-5" / "a" / "b" / "c" / "x.safetensors")
    assert layouts.training_step(deep) is None  # three folders up at most
    assert layouts.training_step(lora(tmp_path / "checkpoint-6" / "a" / "b" / "x.safetensors")) == 6
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "trainer_state.json").write_text("{not json")
    (broken / "training_state.json").write_text(json.dumps({"global_step": 9}))  # the next file is still read
    assert layouts.training_step(broken) == 9
    (broken / "trainer_state.json").write_text("[1, 2]")  # valid JSON, but no object
    assert layouts.training_step(broken) == 9


def test_a_files_step_its_name_first_then_its_metadata_then_a_state_folder_then_its_folders(tmp_path):
    assert layouts.training_step(lora(tmp_path / "a-step00000010.safetensors", metadata={"ss_steps": "99"})) == 10
    assert layouts.training_step(lora(tmp_path / "b.safetensors", metadata={"ss_steps": "99"})) == 99
    assert layouts.training_step(lora(tmp_path / "c.safetensors", metadata={"ss_steps": "n/a"})) is None
    d = lora(tmp_path / "d-000003.safetensors")
    (tmp_path / "d-000003-state").mkdir()
    (tmp_path / "d-000003-state" / "train_state.json").write_text(json.dumps({"current_step": 96}))
    assert layouts.training_step(d) == 96
    nested = lora(tmp_path / "checkpoint-40" / "sub" / "lora.safetensors")
    assert layouts.training_step(nested) == 40
    (tmp_path / "checkpoint-40" / "sub" / "training_state.json").write_text(json.dumps({"global_step": 41}))
    assert layouts.training_step(nested) == 41  # the nearer folder's state says
    assert layouts.training_step(tmp_path / "missing-folder") is None
    folder = tmp_path / "final"
    folder.mkdir()
    (tmp_path / "final-state").mkdir()
    (tmp_path / "final-state" / "train_state.json").write_text(json.dumps({"current_step": 12}))
    assert layouts.training_step(folder) == 12  # kohya's -state beside a folder


# -- EMA -------------------------------------------------------------------------------------------------------

def test_ema_weights_are_chosen_where_there_are_both(tmp_path):
    full = tmp_path / "checkpoint-1"
    denoiser(full / "unet")
    denoiser(full / "unet_ema")
    assert layouts.ema_choice(full, None) == (full / "unet_ema", "ema")
    assert layouts.ema_choice(full, True) == (full / "unet_ema", "ema")
    assert layouts.ema_choice(full, False) == (full / "unet", "raw")
    flux = tmp_path / "checkpoint-2"
    denoiser(flux / "transformer", "FluxTransformer2DModel")
    denoiser(flux / "transformer_ema", "FluxTransformer2DModel")
    assert layouts.ema_choice(flux, None) == (flux / "transformer_ema", "ema")
    simpletuner = tmp_path / "checkpoint-3"
    lora(simpletuner / "pytorch_lora_weights.safetensors", kind="peft", prefix="unet.a")
    lora(simpletuner / "ema" / "pytorch_lora_weights.safetensors", kind="peft", prefix="unet.a")
    assert layouts.ema_choice(simpletuner, None) == (simpletuner / "ema" / "pytorch_lora_weights.safetensors", "ema")
    assert layouts.ema_choice(simpletuner, False) == (simpletuner / "pytorch_lora_weights.safetensors", "raw")
    full_ema = tmp_path / "checkpoint-4"
    denoiser(full_ema / "unet")
    denoiser(full_ema / "ema")
    assert layouts.ema_choice(full_ema, None) == (full_ema / "ema", "ema")
    only_raw = tmp_path / "checkpoint-5"
    denoiser(only_raw / "unet")
    assert layouts.ema_choice(only_raw, None) == (only_raw / "unet", None)  # no choice: nothing recorded
    only_ema = tmp_path / "checkpoint-6"
    denoiser(only_ema / "unet_ema")
    assert layouts.ema_choice(only_ema, False) == (only_ema / "unet_ema", "ema")
    assert layouts.ema_choice(tmp_path / "empty", None) == (None, None)


# -- what a sweep finds ---------------------------------------------------------------------------------------

def test_kohyas_output(tmp_path):
    out = tmp_path / "kohya"
    lora(out / "cat-step00000004.safetensors")
    lora(out / "cat-step00000008.safetensors")
    (out / "cat-step00000008-state").mkdir()
    save_file({"w": torch.zeros(1)}, str(out / "cat-step00000008-state" / "model.safetensors"))
    lora(out / "cat-000001.safetensors", metadata={"ss_steps": "6"})
    lora(out / "cat.safetensors", metadata={"ss_steps": "8"})
    (out / "sample").mkdir()
    (out / "logs").mkdir()
    lora(out / ".hidden.safetensors")
    assert found(out) == [("cat-step00000004", 4, False), ("cat-000001", 6, False), ("cat-step00000008", 8, False),
                          ("cat", 8, True)]


def test_ai_toolkits_output(tmp_path):
    out = tmp_path / "output"
    lora(out / "job" / "job_000000250.safetensors")
    lora(out / "job" / "job_000000500.safetensors")
    pipeline(out / "job" / "job_000000750")  # a full fine-tune's folder
    (out / "job" / "samples").mkdir(parents=True)
    (out / "job" / "optimizer.pt").write_bytes(b"\0")
    assert found(out) == [("job__job_000000250", 250, False), ("job__job_000000500", 500, False),
                          ("job__job_000000750", 750, False)]
    assert [f.name for f in layouts.find_checkpoints(out / "job")] == ["job_000000250", "job_000000500", "job_000000750"]


def test_onetrainers_workspace(tmp_path):
    ws = tmp_path / "workspace"
    lora(ws / "save" / "2026-12-01_20-17-02-save-30-7-2.safetensors")
    lora(ws / "save" / "2026-12-01_20-19-40-save-60-14-4.safetensors")
    for step in (30, 45):
        backup = ws / "backup" / f"2026-12-01_20-18-00-backup-{step}-7-2"
        lora(backup / "lora" / "lora.safetensors")
        (backup / "meta.json").write_text("{}")
    assert found(ws) == [("save__2026-12-01_20-17-02-save-30-7-2", 30, False),
                         ("backup__2026-12-01_20-18-00-backup-45-7-2", 45, False),
                         ("save__2026-12-01_20-19-40-save-60-14-4", 60, False)]


def test_simpletuners_output(tmp_path):
    out = tmp_path / "st"
    for step in (10, 20):
        lora(out / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors", kind="peft", prefix="unet.a")
    (out / "temporary-30").mkdir()
    lora(out / "temporary-30" / "pytorch_lora_weights.safetensors", kind="peft", prefix="unet.a")
    pipeline(out / "pipeline")
    assert found(out) == [("checkpoint-10", 10, False), ("checkpoint-20", 20, False), ("pipeline", None, True)]


def test_diffusers_full_training_with_ema_and_its_final_pipeline(tmp_path):
    out = pipeline(tmp_path / "sd-finetuned")
    for step in (2, 4):
        denoiser(out / f"checkpoint-{step}" / "unet")
        denoiser(out / f"checkpoint-{step}" / "unet_ema")
    for part in ("text_encoder", "vae", "tokenizer", "scheduler"):
        denoiser(out / part)  # never a checkpoint of its own, whatever it holds
    assert found(out) == [("checkpoint-2", 2, False), ("checkpoint-4", 4, False), ("final", None, True)]


def test_diffusers_lora_training_and_its_root_lora(tmp_path):
    out = tmp_path / "lora-out"
    for step in (100, 200):
        lora(out / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors", kind="peft", prefix="unet.a")
    lora(out / "pytorch_lora_weights.safetensors", kind="peft", prefix="unet.a")
    (out / "final").mkdir()  # a folder that happens to be named so: the final model gets another name
    lora(out / "final" / "pytorch_lora_weights.safetensors", kind="peft", prefix="unet.a")
    assert [(f.name, f.final) for f in layouts.find_checkpoints(out)] == [
        ("checkpoint-100", False), ("checkpoint-200", False), ("final", False), ("final-model", True)]


def test_sorting_by_step_then_name_and_the_finals_own_step(tmp_path):
    out = tmp_path / "out"
    lora(out / "b-step00000000.safetensors")
    lora(out / "a-step00000001.safetensors")
    assert [f.step for f in layouts.find_checkpoints(out)] == [0, 1]
    root = pipeline(tmp_path / "trained")
    (root / "training_state.json").write_text(json.dumps({"global_step": 50}))
    denoiser(root / "checkpoint-40" / "unet")
    assert found(root) == [("checkpoint-40", 40, False), ("final", 50, True)]
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model_index.json").write_text("{}")  # a pipeline's index alone still marks a checkpoint
    assert layouts.is_checkpoint_folder(alone)
    hidden = tmp_path / "hidden"
    lora(hidden / ".cache" / "x-step00000001.safetensors")
    lora(hidden / "y-step00000002.safetensors")
    assert [f.step for f in layouts.find_checkpoints(hidden)] == [2]


def test_onetrainer_backups_are_told_by_their_folder_or_their_name(tmp_path):
    ws = tmp_path / "ws"
    lora(ws / "save" / "x-save-30-1-1.safetensors")
    backup = ws / "backup" / "checkpoint-30"  # under backup/, without -backup- in its name
    lora(backup / "lora" / "lora.safetensors")
    elsewhere = ws / "other" / "2026-12-01_20-18-00-backup-30-7-2"  # -backup- in its name, not under backup/
    lora(elsewhere / "lora" / "lora.safetensors")
    assert [f.name for f in layouts.find_checkpoints(ws)] == ["save__x-save-30-1-1"]


def test_kohyas_final_file_needs_a_per_step_or_epoch_sibling(tmp_path):
    out = tmp_path / "out"
    lora(out / "ep.safetensors")
    lora(out / "ep-000001.safetensors", metadata={"ss_steps": "4"})
    lora(out / "dog.safetensors", metadata={"ss_steps": "5"})
    lora(out / "dog-notes.safetensors", metadata={"ss_steps": "6"})  # no step, no epoch: not dog's step file
    pipeline(out / "job")
    lora(out / "job-step00000010.safetensors")
    finals = {f.name: f.final for f in layouts.find_checkpoints(out)}
    assert finals == {"ep-000001": False, "dog": False, "dog-notes": False, "job-step00000010": False, "job": False,
                      "ep": True}


def test_three_levels_deep_and_no_deeper(tmp_path):
    """Three levels: the training folder and two below it (OneTrainer's workspace/backup/<backup>/)."""
    root = tmp_path / "root"
    lora(root / "w-step00000001.safetensors")
    lora(root / "a" / "b" / "x-step00000002.safetensors")
    lora(root / "a" / "b" / "c" / "y-step00000003.safetensors")
    assert [f.step for f in layouts.find_checkpoints(root)] == [1, 2]
    assert [f.step for f in layouts.find_checkpoints(root, depth=4)] == [1, 2, 3]


def test_a_bare_denoiser_folder_is_a_checkpoint_and_nothing_is_nothing(tmp_path):
    out = tmp_path / "out"
    denoiser(out / "my-unet-1000")
    denoiser(out / "transformer-like", "SD3Transformer2DModel")
    (out / "notes").mkdir()
    (out / "notes" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert [f.name for f in layouts.find_checkpoints(out)] == ["my-unet-1000", "transformer-like"]
    empty = tmp_path / "empty"
    (empty / "logs").mkdir(parents=True)
    (empty / "unet").mkdir()
    assert layouts.find_checkpoints(empty) == []


def test_is_checkpoint_folder(tmp_path):
    assert layouts.is_checkpoint_folder(pipeline(tmp_path / "p"))
    assert layouts.is_checkpoint_folder(lora(tmp_path / "l" / "pytorch_lora_weights.safetensors").parent)
    assert layouts.is_checkpoint_folder(lora(tmp_path / "o" / "lora" / "lora.safetensors").parent.parent)
    assert layouts.is_checkpoint_folder(lora(tmp_path / "e" / "ema" / "pytorch_lora_weights.safetensors").parent.parent)
    assert layouts.is_checkpoint_folder(denoiser(tmp_path / "u" / "unet").parent)
    assert layouts.is_checkpoint_folder(denoiser(tmp_path / "t" / "transformer_ema", "FluxTransformer2DModel").parent)
    assert not layouts.is_checkpoint_folder(tmp_path / "nothing")
    assert layouts.denoiser_class(denoiser(tmp_path / "x", "UNet2DModel")) == "UNet2DModel"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[]")
    assert layouts.denoiser_class(tmp_path / "bad") is None
    os.makedirs(tmp_path / "n", exist_ok=True)
    (tmp_path / "n" / "config.json").write_text(json.dumps({"_class_name": 3}))
    assert layouts.denoiser_class(tmp_path / "n") is None
