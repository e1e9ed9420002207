"""Fitting into training: the Python API, LoRA and fine-tuned checkpoints, trackers, sweeps for cron,
SimpleTuner configs and attention backends."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_user_error, files_of

# -- checkpoints a training run leaves ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dir(models, tmp_path_factory):
    """A tiny LoRA made with peft on the tiny UNet, saved the way diffusers and SimpleTuner save it."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(models.sd)
    torch.manual_seed(3)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    folder = tmp_path_factory.mktemp("lora") / "checkpoint-3"
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    return folder


def _finetuned_unet(models, target: Path, seed: int = 5) -> Path:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(models.sd, subfolder="unet")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    unet.save_pretrained(target / "unet")
    return target


def test_lora_changes_the_images_and_scale_zero_is_the_base(run_tiny, models, lora_dir, tmp_path):
    base, lora, zero = tmp_path / "base", tmp_path / "lora", tmp_path / "zero"
    assert run_tiny(base, "--limit", "3").exit_code == 0
    result = run_tiny(lora, "--limit", "3", "--base-model", str(models.sd), checkpoint=lora_dir)
    assert result.exit_code == 0, result.stderr
    assert all(files_of(lora)[k] != v for k, v in files_of(base).items() if k.startswith("images/"))
    assert run_tiny(zero, "--limit", "3", "--base-model", str(models.sd), "--lora-scale", "0", checkpoint=lora_dir).exit_code == 0
    assert files_of(zero) == files_of(base)
    manifest = json.loads((lora / "manifest.json").read_text())
    assert manifest["checkpoint"]["kind"] == "lora" and manifest["settings"]["lora_scale"] == 1.0
    assert_user_error(run_tiny(tmp_path / "r1", checkpoint=lora_dir), "LoRA weights", "--base-model")
    assert_user_error(run_tiny(tmp_path / "r2", "--lora-scale", "0.5"), "--lora-scale applies to LoRA and LyCORIS checkpoints")


def test_a_finetuned_unet_folder_runs_on_the_base_pipeline(run_tiny, models, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    checkpoint = _finetuned_unet(models, tmp_path / "checkpoint-7")
    full = tmp_path / "full"
    pipe = StableDiffusionPipeline.from_pretrained(models.sd)
    pipe.unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    pipe.save_pretrained(full)
    a, b = tmp_path / "a", tmp_path / "b"
    result = run_tiny(a, "--limit", "3", "--base-model", str(models.sd), checkpoint=checkpoint)
    assert result.exit_code == 0, result.stderr
    assert run_tiny(b, "--limit", "3", checkpoint=full).exit_code == 0
    assert files_of(a) == files_of(b)
    assert json.loads((a / "manifest.json").read_text())["checkpoint"]["kind"] == "denoiser"


# -- the Python API ------------------------------------------------------------------------------------

def test_evaluate_in_memory_matches_run_and_restores_the_pipeline(models, run_tiny, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from clipeval import ClipScorer, evaluate

    monkeypatch.chdir(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(models.sd)
    pipe.unet.train()
    clip = ClipScorer(str(models.clip))
    result = evaluate(pipe, "smoke", clip=clip, images_per_prompt=2, steps=2, batch_size=4)
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert pipe.unet.training and not pipe.vae.training  # each module back in its own mode
    assert len(result.records) == 32 and result.summary["images"] == 32
    reference = tmp_path / "run"
    assert run_tiny(reference, "--images-per-prompt", "2").exit_code == 0
    run_scores = pd.read_csv(reference / "scores.csv", keep_default_na=False)
    assert result.scores["clip_score"].tolist() == run_scores["clip_score"].tolist()
    assert result.summary["clip/mean"] == json.loads((reference / "summary.json").read_text())["clip/mean"]
    again = evaluate(pipe, ["a red cube", "a cat"], clip=clip, steps=2, out=tmp_path / "kept")
    assert again.prompts["prompt"].tolist() == ["a red cube", "a cat"]
    assert {"scores.csv", "prompts.csv", "summary.json", "images"} <= {p.name for p in (tmp_path / "kept").iterdir()}
    with pytest.raises(Exception, match="non-empty list"):
        evaluate(pipe, [], clip=clip)


# -- trackers ------------------------------------------------------------------------------------------

def _tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    return events


def test_tensorboard_logs_the_summary_at_the_step_once(run_tiny, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    args = ["--images-per-prompt", "2", "--report-to", "tensorboard", "--logging-dir", str(logs), "--step", "1500"]
    result = run_tiny(out, *args)
    assert result.exit_code == 0, result.stderr
    assert "logged step 1500 to TensorBoard" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    events = _tensorboard(logs / "clipeval")
    tags = set(events.Tags()["scalars"])
    assert {"clip/mean", "clip/min", "clip/max", "clip/std", "clip/median"} <= tags
    assert {f"clip/category/{c}" for c in summary["by_category"]} <= tags
    for tag in ("clip/mean", "clip/min", "clip/max", "clip/std", "clip/median"):
        (event,) = events.Scalars(tag)
        assert event.step == 1500 and event.value == pytest.approx(summary[tag], rel=1e-6)
    assert events.Scalars("clip/category/Animals")[0].value == pytest.approx(summary["by_category"]["Animals"]["mean"], rel=1e-6)
    assert events.Histograms("clip/scores")[0].step == 1500
    (image,) = events.Images("clip/best_and_worst")
    assert image.step == 1500 and image.width == 4 * 192
    again = run_tiny(out, *args)  # the same step again: not a second point
    assert "already in" in again.stderr
    assert len(_tensorboard(logs / "clipeval").Scalars("clip/mean")) == 1


def test_the_step_comes_from_the_checkpoint_name_or_state_file(run_tiny, models, tmp_path):
    named = tmp_path / "checkpoint-250"
    shutil.copytree(models.sd, named)
    assert run_tiny(tmp_path / "a", "--limit", "2", "--report-to", "tensorboard", "--logging-dir", str(tmp_path / "logs"),
                    checkpoint=named).exit_code == 0
    stateful = tmp_path / "final"
    shutil.copytree(models.sd, stateful)
    (stateful / "trainer_state.json").write_text(json.dumps({"global_step": 777}))
    assert run_tiny(tmp_path / "b", "--limit", "2", "--report-to", "tensorboard", "--logging-dir", str(tmp_path / "logs"),
                    checkpoint=stateful).exit_code == 0
    assert [e.step for e in _tensorboard(tmp_path / "logs" / "clipeval").Scalars("clip/mean")] == [250, 777]
    nameless = run_tiny(tmp_path / "c", "--limit", "2", "--report-to", "tensorboard")
    assert_user_error(nameless, "no training step", "--step")
    assert not (tmp_path / "c").exists()  # refused before any work


def test_scale_percent_logs_and_prints_100x(run_tiny, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    result = run_tiny(out, "--limit", "3", "--report-to", "tensorboard", "--logging-dir", str(logs), "--step", "1",
                      "--scale", "percent")
    assert result.exit_code == 0, result.stderr
    mean = json.loads((out / "summary.json").read_text())["clip/mean"]
    assert _tensorboard(logs / "clipeval").Scalars("clip/mean")[0].value == pytest.approx(100 * mean, rel=1e-6)
    assert result.stdout.startswith(f"clip/mean {100 * mean:.2f} (100 x cosine)")


def wandb_history(folder: Path) -> list[dict]:
    """The logged rows of offline wandb runs, read from their .wandb files: LevelDB's log format
    (32 KiB blocks, 7-byte record headers) after wandb's 7-byte file header, holding Record protos."""
    import struct

    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(folder.rglob("run-*.wandb")):
        data, pos, buffer, chunks = path.read_bytes(), 7, b"", []
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if kind == 0 and length == 0:
                break
            buffer += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                chunks.append(buffer)
                buffer = b""
        for chunk in chunks:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline(run_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, logs = tmp_path / "run", tmp_path / "wandb-logs"
    args = ["--limit", "3", "--report-to", "wandb", "--logging-dir", str(logs), "--step", "42", "--project", "tests"]
    result = run_tiny(out, *args)
    assert result.exit_code == 0, result.stderr
    (logged,) = wandb_history(logs)
    summary = json.loads((out / "summary.json").read_text())
    assert logged["train/step"] == 42
    for key in ("clip/mean", "clip/min", "clip/max", "clip/std", "clip/median"):
        assert logged[key] == pytest.approx(summary[key], rel=1e-6)
    assert logged["clip/category/Animals"] == pytest.approx(summary["by_category"]["Animals"]["mean"], rel=1e-6)
    assert logged["clip/scores/_type"] == "histogram" and sum(logged["clip/scores/values"]) == 3
    assert logged["clip/best_and_worst/_type"] == "image-file" and logged["clip/best_and_worst/width"] == 4 * 192
    again = run_tiny(out, *args)
    assert "already logged" in again.stderr
    assert len(wandb_history(logs)) == 1


def test_a_missing_tracker_extra_is_named(run_tiny, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    result = run_tiny(tmp_path / "run", "--report-to", "wandb", "--step", "1")
    assert_user_error(result, "needs the wandb extra", "pip install 'clipeval[wandb]'")


# -- sweeps for cron -----------------------------------------------------------------------------------

@pytest.fixture
def training_dir(models, lora_dir, tmp_path):
    out = tmp_path / "training"
    shutil.copytree(lora_dir, out / "checkpoint-2")
    _finetuned_unet(models, out / "checkpoint-5")
    shutil.copytree(models.sd, out / "checkpoint-10")
    (out / "logs").mkdir()
    (out / "logs" / "events.out").write_text("not a checkpoint")
    half = out / "checkpoint-20"
    shutil.copytree(models.sd, half)
    weights = half / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut short, as mid-save
    return out


def sweep_cli(cli, models, training, results, *extra):
    return cli("sweep", training, "--out", results, "--prompt-library", "smoke", "--limit", "2", "--steps", "2",
               "--base-model", models.sd, "--clip-model", models.clip, "--settle", "0", "--quiet", *extra)


def test_sweep_evaluates_new_checkpoints_oldest_first_once(cli, models, training_dir, tmp_path):
    results = tmp_path / "results"
    first = sweep_cli(cli, models, training_dir, results, "--report-to", "tensorboard")
    assert first.exit_code == 0, first.stderr
    assert "3 evaluated, 0 up to date, 1 still being written, 0 failed" in first.stdout
    assert "skipping checkpoint-20" in first.stderr and "truncated" in first.stderr
    assert first.stderr.index("evaluating checkpoint-2 ") < first.stderr.index("evaluating checkpoint-5 ") < first.stderr.index("evaluating checkpoint-10 ")
    history = pd.read_csv(results / "history.csv")
    assert history["step"].tolist() == [2, 5, 10] and history["run"].tolist() == ["checkpoint-2", "checkpoint-5", "checkpoint-10"]
    for run in history.itertuples():
        assert run.clip_mean == json.loads((results / run.run / "summary.json").read_text())["clip/mean"]
        assert run.clip_mean_ci_low <= run.clip_mean <= run.clip_mean_ci_high
    assert [e.step for e in _tensorboard(results / "logs" / "clipeval").Scalars("clip/mean")] == [2, 5, 10]
    # clip/delta_best from the second checkpoint on, equal to history.csv's (the first has no earlier one)
    deltas = _tensorboard(results / "logs" / "clipeval").Scalars("clip/delta_best")
    assert [e.step for e in deltas] == [5, 10]
    assert [e.value for e in deltas] == pytest.approx(history["delta_best"].tolist()[1:], abs=1e-6)
    second = sweep_cli(cli, models, training_dir, results)
    assert "0 evaluated, 3 up to date" in second.stdout
    shutil.copytree(models.sd, training_dir / "checkpoint-15")
    third = sweep_cli(cli, models, training_dir, results)
    assert "1 evaluated, 3 up to date" in third.stdout and "evaluating checkpoint-15" in third.stderr
    assert pd.read_csv(results / "history.csv")["step"].tolist() == [2, 5, 10, 15]


def test_sweep_waits_for_checkpoints_to_settle(cli, models, training_dir, tmp_path):
    result = sweep_cli(cli, models, training_dir, tmp_path / "results", "--settle", "3600")
    assert "0 evaluated, 0 up to date, 4 still being written" in result.stdout
    assert "waiting 3600 s" in result.stderr


def test_a_second_sweep_while_one_runs_does_nothing_and_a_dead_ones_lock_is_free(cli, models, training_dir, tmp_path):
    import fcntl

    results = tmp_path / "results"
    results.mkdir()
    with open(results / ".clipeval-sweep.lock", "w") as lock:
        lock.write("31337")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = sweep_cli(cli, models, training_dir, results)
        assert busy.exit_code == 0 and "another sweep (pid 31337)" in busy.stdout
        assert not list(results.glob("checkpoint-*"))
    # The holder is gone (its flock with it); the lock file stays and is taken over.
    assert "3 evaluated" in sweep_cli(cli, models, training_dir, results).stdout


def test_a_broken_checkpoint_does_not_stop_the_sweep(cli, models, training_dir, tmp_path):
    shutil.rmtree(training_dir / "checkpoint-20")
    broken = training_dir / "checkpoint-7"
    shutil.copytree(models.sd, broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "unet": ["evil_module", "EvilUNet"]}))
    result = sweep_cli(cli, models, training_dir, tmp_path / "results")
    assert result.exit_code == 2
    assert "3 evaluated, 0 up to date, 0 still being written, 1 failed" in result.stdout
    assert "checkpoint-7 failed" in result.stderr and "never runs code" in result.stderr


@pytest.mark.slow
def test_a_checkpoint_finished_while_the_sweep_works_on_earlier_ones_is_evaluated_in_its_turn(
        cli, models, training_dir, tmp_path, monkeypatch):
    """Whether a checkpoint is still being written is asked when its turn comes, not when the sweep
    starts: checkpoint-20 (cut short at the start) is complete by the time checkpoint-10 is done."""
    from clipeval import runner

    full = (models.sd / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    real = runner.run

    def run(config):
        result = real(config)
        if Path(config.checkpoint).name == "checkpoint-10":  # the trainer finishes saving meanwhile
            (training_dir / "checkpoint-20" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(full)
        return result

    monkeypatch.setattr(runner, "run", run)
    result = sweep_cli(cli, models, training_dir, tmp_path / "results")
    assert result.exit_code == 0, result.stderr
    assert "4 evaluated, 0 up to date, 0 still being written" in result.stdout
    assert (tmp_path / "results" / "checkpoint-20" / "summary.json").is_file()


# -- SimpleTuner configs --------------------------------------------------------------------------------

@pytest.fixture
def simpletuner_config(models, lora_dir, tmp_path):
    library = tmp_path / "user_prompts.json"
    library.write_text(json.dumps({"cat": "a cat on a sofa", "dog": "a dog in the snow", "car": "a red car"}))
    config = {
        "--model_family": "sd1x", "--evaluation_type": "clip",
        "--pretrained_model_name_or_path": str(models.sd), "--output_dir": str(lora_dir),
        "--pretrained_evaluation_model_name_or_path": str(models.clip), "--report_to": "none",
        "--validation_seed": 7, "--validation_resolution": "64x32,64x64", "--validation_num_inference_steps": 2,
        "--validation_guidance": 4.5, "--validation_negative_prompt": "blurry", "--user_prompt_library": library.name,
        "--learning_rate": 1e-4, "--lora_rank": 16,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_run_from_a_simpletuner_config(cli, simpletuner_config, tmp_path):
    out = tmp_path / "run"
    result = cli("run", "--config", simpletuner_config, "--out", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "evaluates at the first, 64x32" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    s, g = manifest["settings"], manifest["generation"]
    assert manifest["checkpoint"]["kind"] == "lora"
    assert (s["seed"], g["steps"], g["guidance_scale"], g["negative_prompt"]) == (7, 2, 4.5, "blurry")
    assert (g["width"], g["height"]) == (64, 32)
    assert pd.read_csv(out / "scores.csv")["prompt"].tolist() == ["a cat on a sofa", "a dog in the snow", "a red car"]
    prompts = pd.read_csv(out / "prompts.csv")
    assert list(prompts.columns[:3]) == ["prompt_id", "name", "prompt"]  # the {name: prompt} keys are kept
    assert prompts["name"].tolist() == ["cat", "dog", "car"]
    override = cli("run", "--config", simpletuner_config, "--out", tmp_path / "other", "--seed", "9", "--steps", "3", "--quiet")
    assert override.exit_code == 0, override.stderr
    assert json.loads((tmp_path / "other" / "manifest.json").read_text())["settings"]["seed"] == 9


@pytest.mark.parametrize("change, needle", [
    ({"--evaluation_type": "none"}, "evaluation_type is 'none'"),
    ({"--validation_num_inference_steps": "many"}, "validation_num_inference_steps must be an integer"),
    ({"--validation_resolution": "big"}, "validation_resolution 'big'"),
    ({"--report_to": "comet_ml"}, "report_to 'comet_ml'"),
])
def test_wrong_simpletuner_values_are_one_line(cli, simpletuner_config, tmp_path, change, needle):
    config = json.loads(simpletuner_config.read_text())
    config.update(change)
    simpletuner_config.write_text(json.dumps(config))
    assert_user_error(cli("run", "--config", simpletuner_config, "--out", tmp_path / "run"), needle)


@pytest.mark.parametrize("value", [True, "default", "image"])
def test_validation_prompt_library_uses_simpletuners_own_prompts(cli, simpletuner_config, mirror, tmp_path, value):
    config = json.loads(simpletuner_config.read_text())
    config.update({"--user_prompt_library": None, "--validation_prompt_library": value})
    simpletuner_config.write_text(json.dumps(config))
    out = tmp_path / "run"
    result = cli("run", "--config", simpletuner_config, "--out", out, "--limit", "2", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["library"]["name"] == "simpletuner"
    prompts = pd.read_csv(out / "prompts.csv")
    assert prompts["name"].tolist() == ["alien_landscape", "alien_market"]
    assert prompts["prompt"][0].startswith("Alien planet, strange rock formations")


# -- attention backends --------------------------------------------------------------------------------

def test_attention_is_set_on_the_denoiser_only(run_tiny, models, tmp_path, monkeypatch):
    import torch.nn.functional as F
    from diffusers.models.attention_processor import AttnProcessor

    import clipeval.pipelines

    seen = {}
    original = clipeval.pipelines.set_attention

    def spy(pipe, backend):
        original(pipe, backend)
        seen["processors"] = {type(p) for p in pipe.unet.attn_processors.values()}

    monkeypatch.setattr(clipeval.pipelines, "set_attention", spy)
    sdpa_before = F.scaled_dot_product_attention
    eager, plain = tmp_path / "eager", tmp_path / "plain"
    assert run_tiny(eager, "--limit", "3", "--attention", "eager").exit_code == 0
    assert seen["processors"] == {AttnProcessor}
    assert F.scaled_dot_product_attention is sdpa_before  # nothing patched globally
    assert run_tiny(plain, "--limit", "3").exit_code == 0
    a, b = pd.read_csv(eager / "scores.csv"), pd.read_csv(plain / "scores.csv")
    assert np.allclose(a.clip_score, b.clip_score, atol=1e-4)
    assert json.loads((eager / "manifest.json").read_text())["generation"]["attention"] == "eager"
    from clipeval.score import ClipScorer

    assert ClipScorer(str(models.clip)).model.config._attn_implementation == "sdpa"
    assert_user_error(run_tiny(tmp_path / "r", "--attention", "sage"), "--attention sage", "attention dispatcher")


def test_transformer_denoisers_take_diffusers_backends():
    from diffusers import FluxTransformer2DModel

    from clipeval.errors import ClipevalError
    from clipeval.pipelines import set_attention

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=(4, 2, 2))
    pipe = types.SimpleNamespace(unet=None, transformer=transformer)
    set_attention(pipe, "_native_math")
    assert {p._attention_backend for p in transformer.attn_processors.values()} == {"_native_math"}
    with pytest.raises(ClipevalError, match="--attention sage"):
        set_attention(pipe, "sage")  # sageattention is not installed here
    with pytest.raises(ClipevalError, match="--attention nonsense"):
        set_attention(pipe, "nonsense")
