"""Faults and hostile input: bad images from the model, I/O errors, unsafe checkpoints, hub trouble."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import assert_user_error, cache_repo


@pytest.fixture
def broken_vae(monkeypatch):
    """The real pipeline, with its VAE made to return NaN for the first image of every batch and
    black for the second (what a float16 overflow and a safety checker produce)."""
    from diffusers import AutoencoderKL

    original = AutoencoderKL.decode

    def decode(self, z, *args, **kwargs):
        out = original(self, z, *args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        sample[0] = float("nan")
        if len(sample) > 1:
            sample[1] = -1.0  # 0 after the pipeline's (x / 2 + 0.5).clamp(0, 1)
        return out

    monkeypatch.setattr(AutoencoderKL, "decode", decode)


def test_nan_and_black_images_are_flagged_and_left_out_of_the_statistics(run_tiny, cli, models, tmp_path, broken_vae):
    out = tmp_path / "run"
    result = run_tiny(out, "--limit", "4", "--batch-size", "4")
    assert result.exit_code == 0, result.stderr
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert scores["flag"].tolist() == ["nan", "black", "", ""]
    assert scores["clip_score"][0] == "" and scores["clip_score"][1] != ""  # NaN: no score; black: CLIP's
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 2 and summary["flagged_images"] == {"black": 1, "nan": 1}
    good = pd.to_numeric(scores["clip_score"][2:])
    assert summary["clip/mean"] == pytest.approx(good.mean(), abs=1e-9)
    prompts = pd.read_csv(out / "prompts.csv", keep_default_na=False)
    assert prompts["n"].tolist() == [0, 0, 1, 1] and prompts["clip_mean"][0] == ""
    assert "2 image(s) flagged (1 black, 1 nan)" in result.stderr
    # Re-scoring carries the flags, and a comparison never pairs a flagged image.
    again = tmp_path / "again"
    assert cli("score", out, "--out", again, "--clip-model", models.clip, "--quiet").exit_code == 0
    assert (again / "scores.csv").read_bytes() == (out / "scores.csv").read_bytes()
    compared = cli("compare", out, again, "--format", "json", "--resamples", "200")
    assert compared.exit_code == 0, compared.stderr
    data = json.loads(compared.stdout)
    assert data["runs"][0]["paired_images"] == 2


def test_a_run_whose_every_image_is_flagged_fails_but_keeps_its_tables(run_tiny, tmp_path, broken_vae):
    out = tmp_path / "run"
    result = run_tiny(out, "--limit", "1")
    assert_user_error(result, "no usable image", "nan")
    assert pd.read_csv(out / "scores.csv", keep_default_na=False)["flag"].tolist() == ["nan"]
    assert json.loads((out / "manifest.json").read_text())["status"] == "no usable image"
    assert not (out / "summary.json").exists()


def test_a_safety_checker_that_fires_flags_its_images_nsfw(run_tiny, models, tmp_path):
    """A real StableDiffusionSafetyChecker (tiny, its concept thresholds set so that it fires on
    everything) saved in the pipeline folder and loaded by diffusers as users' checkpoints are:
    the blanked images are flagged nsfw, not scored as black pictures."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = StableDiffusionPipeline.from_pretrained(models.sd)
    checker = StableDiffusionSafetyChecker(CLIPConfig.from_pretrained(models.clip))
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)  # cosine − (−2) > 0: every image is "nsfw"
    pipe.register_modules(safety_checker=checker, feature_extractor=CLIPImageProcessor.from_pretrained(models.clip))
    pipe.register_to_config(requires_safety_checker=True)
    folder = tmp_path / "sd-with-checker"
    pipe.save_pretrained(folder)
    assert "StableDiffusionSafetyChecker" in (folder / "model_index.json").read_text()

    out = tmp_path / "run"
    result = run_tiny(out, "--limit", "3", checkpoint=folder)
    assert_user_error(result, "no usable image", "nsfw")
    scores = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert scores["flag"].tolist() == ["nsfw"] * 3
    from PIL import Image
    import numpy as np

    assert all(np.asarray(Image.open(out / path)).max() == 0 for path in scores["image"])  # blanked
    assert json.loads((out / "manifest.json").read_text())["status"] == "no usable image"


# -- I/O errors -------------------------------------------------------------------------------------

@pytest.fixture
def disk_full(monkeypatch):
    """ENOSPC from the operating system once ``budget`` more writes to matching temp files happened."""
    import errno
    import os

    state = {"pattern": None, "budget": 0}
    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if state["pattern"] and state["pattern"] in name:
            if state["budget"] <= 0:
                os.close(fd)
                raise OSError(errno.ENOSPC, "No space left on device")
            state["budget"] -= 1
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)
    return state


def test_disk_full_mid_run_is_one_line_and_the_run_resumes(run_tiny, tmp_path, disk_full):
    from conftest import files_of

    reference = tmp_path / "reference"
    assert run_tiny(reference, "--limit", "6", "--batch-size", "2").exit_code == 0
    out = tmp_path / "run"
    disk_full.update(pattern=".png.", budget=3)
    result = run_tiny(out, "--limit", "6", "--batch-size", "2")
    assert_user_error(result, "cannot write", ".png", "No space left on device (disk full)", "rerun the same command")
    assert not (out / "summary.json").exists()
    disk_full.update(pattern=None)
    assert run_tiny(out, "--limit", "6", "--batch-size", "2").exit_code == 0
    assert files_of(out) == files_of(reference)


@pytest.fixture(scope="module")
def extended_reference(models, tmp_path_factory):
    """A --limit 2 run extended to --limit 3 without a fault: what a failed extension must end as
    once rerun (a fresh --limit 3 run cuts other batches, which moves pixels by float rounding)."""
    from click.testing import CliRunner

    from clipeval.cli import main

    out = tmp_path_factory.mktemp("extended") / "run"
    args = ["run", "--checkpoint", str(models.sd), "--clip-model", str(models.clip), "--prompt-library", "smoke",
            "--out", str(out), "--steps", "2", "--quiet", "--limit"]
    assert CliRunner().invoke(main, [*args, "2"]).exit_code == 0
    assert CliRunner().invoke(main, [*args, "3"]).exit_code == 0
    return out


@pytest.mark.parametrize("how", ["disk full", "cannot be replaced"])
@pytest.mark.parametrize("name", ["scores.csv", "prompts.csv", "summary.json", "manifest.json"])
def test_a_failed_final_write_leaves_the_old_set_or_a_folder_every_reader_refuses(
        name, how, run_tiny, cli, models, tmp_path, disk_full, monkeypatch, extended_reference):
    """Extending a run, the final write fails at each result file in turn. Afterwards either every
    result file is the previous complete set, byte for byte, or compare, report, score and the
    sweep's history all refuse the folder saying to rerun; the rerun completes it."""
    import errno
    import os
    from pathlib import Path

    from conftest import files_of

    from clipeval import sweep

    results = tmp_path / "results"
    out = results / "run"
    assert run_tiny(out, "--limit", "2").exit_code == 0
    before = {n: (out / n).read_bytes() for n in ("scores.csv", "prompts.csv", "summary.json", "manifest.json")}
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == name and Path(dst).parent == out:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_replace(src, dst)

    if how == "disk full":
        disk_full.update(pattern=name, budget=0)
    else:
        monkeypatch.setattr(os, "replace", replace)
    assert_user_error(run_tiny(out, "--limit", "3"), "cannot write", name, "rerun the same command")
    disk_full.update(pattern=None)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not list(out.glob(".*.tmp"))

    after = {n: (out / n).read_bytes() if (out / n).exists() else None for n in before}
    sweep.write_history(results, {}, margin=0.0, read={})
    history = pd.read_csv(results / "history.csv")
    if after == before:  # the old set, whole: every reader still reads it
        assert cli("compare", out, out, "--resamples", "200").exit_code == 0
        assert history["run"].tolist() == ["run"] and history["images"].tolist() == [2]
    else:
        rerun = "rerun the command that made it to complete it"
        assert_user_error(cli("compare", out, extended_reference, "--resamples", "200"), rerun)
        assert_user_error(cli("report", out, "--out", tmp_path / "r.html"), rerun)
        assert_user_error(cli("score", out, "--clip-model", models.clip, "--out", tmp_path / "s", "--quiet"), rerun)
        assert history.empty  # the sweep evaluates it again instead
        assert name != "scores.csv"  # the first write: nothing was replaced before it
    assert run_tiny(out, "--limit", "3").exit_code == 0  # the same command completes it
    assert files_of(out) == files_of(extended_reference)
    assert cli("compare", out, extended_reference, "--resamples", "200").exit_code == 0
    sweep.write_history(results, {}, margin=0.0, read={})
    assert pd.read_csv(results / "history.csv")["images"].tolist() == [3]


# -- untrusted checkpoints ----------------------------------------------------------------------------

def _ldm_state(models):
    from ldm_checkpoint import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(models.sd, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(models.sd, subfolder="vae")
    text = CLIPTextModel.from_pretrained(models.sd, subfolder="text_encoder")
    return {**unet_to_ldm(unet.state_dict(), dict(unet.config)), **vae_to_ldm(vae.state_dict(), dict(vae.config)),
            **text_encoder_to_ldm(text.state_dict())}


def test_pickle_checkpoints_need_allow_pickle_and_then_load_only_tensors(run_tiny, models, tmp_path):
    import torch
    from conftest import files_of

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": _ldm_state(models)}, ckpt)
    refused = run_tiny(tmp_path / "r1", "--base-model", str(models.sd), checkpoint=ckpt)
    assert_user_error(refused, "pickle", "--allow-pickle")
    allowed = run_tiny(tmp_path / "r2", "--base-model", str(models.sd), "--allow-pickle", "--limit", "2", checkpoint=ckpt)
    assert allowed.exit_code == 0, allowed.stderr
    assert run_tiny(tmp_path / "r3", "--limit", "2").exit_code == 0
    assert files_of(tmp_path / "r2") == files_of(tmp_path / "r3")


class _Payload:
    """Unpickling this runs a shell command: what a malicious .ckpt does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_even_with_allow_pickle(run_tiny, models, tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    result = run_tiny(tmp_path / "run", "--base-model", str(models.sd), "--allow-pickle", checkpoint=evil)
    assert_user_error(result, "could not load checkpoint")
    assert not marker.exists()


def test_a_folder_with_only_pickle_weights(run_tiny, models, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "bin-only"
    shutil.copytree(models.sd, folder)
    for weights in folder.rglob("*.safetensors"):  # the names diffusers and transformers look for
        name = "pytorch_model.bin" if weights.name == "model.safetensors" else "diffusion_pytorch_model.bin"
        torch.save(load_file(weights), weights.with_name(name))
        weights.unlink()
    assert_user_error(run_tiny(tmp_path / "r1", checkpoint=folder), "only pickle weights", "--allow-pickle")
    assert run_tiny(tmp_path / "r2", "--allow-pickle", "--limit", "2", checkpoint=folder).exit_code == 0
    assert run_tiny(tmp_path / "r3", "--limit", "2").exit_code == 0  # the same weights as safetensors
    import numpy as np
    from PIL import Image

    for name in ("00000_00.png", "00001_00.png"):
        pickled, safe = (np.asarray(Image.open(tmp_path / r / "images" / name)).astype(int) for r in ("r2", "r3"))
        assert np.abs(pickled - safe).max() <= 1  # the same model: float rounding at most
    scores = [pd.read_csv(tmp_path / r / "scores.csv")["clip_score"] for r in ("r2", "r3")]
    assert (scores[0] - scores[1]).abs().max() < 1e-4


@pytest.mark.parametrize("change", [
    {"_class_name": ["pipeline", "MyPipeline"]},
    {"unet": ["my_unet_module", "MyUNet"]},
    {"unet": ["os", "system"]},  # not one of diffusers' pipeline packages
    {"unet": ["stable_diffusion/../../custom", "MyUNet"]},
])
def test_checkpoints_that_ask_for_custom_code_are_refused(run_tiny, models, tmp_path, change):
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(models.sd, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, **change}))
    (folder / "pipeline.py").write_text("raise SystemExit('custom code ran')\n")
    assert_user_error(run_tiny(tmp_path / "run", checkpoint=folder), "clipeval never runs code")


# -- the Hugging Face Hub, offline --------------------------------------------------------------------

def test_hub_ids_load_from_the_cache_offline_with_revisions(run_tiny, models, tmp_path):
    commit = cache_repo("clipeval-tests/tiny-sd", models.sd)
    cache_repo("clipeval-tests/tiny-clip", models.clip, "b" * 40)
    out = tmp_path / "hub"
    result = run_tiny(out, "--limit", "2", "--revision", commit, "--clip-model", "clipeval-tests/tiny-clip",
                      checkpoint="clipeval-tests/tiny-sd")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint"]["kind"] == "hub" and manifest["settings"]["revision"] == commit
    local = tmp_path / "local"
    assert run_tiny(local, "--limit", "2").exit_code == 0
    assert (out / "scores.csv").read_bytes() == (local / "scores.csv").read_bytes()
    missing = run_tiny(tmp_path / "r2", "--revision", "f" * 40, checkpoint="clipeval-tests/tiny-sd")
    assert_user_error(missing, "clipeval-tests/tiny-sd@" + "f" * 40, "not in the local Hugging Face cache")
    bad_clip = run_tiny(tmp_path / "r3", "--clip-revision", "nope", "--clip-model", "clipeval-tests/tiny-clip")
    assert_user_error(bad_clip, "could not load CLIP model clipeval-tests/tiny-clip")
    assert_user_error(run_tiny(tmp_path / "r4", "--revision", "main"), "applies to hub ids")


@pytest.mark.parametrize("name, message, needle", [
    ("GatedRepoError", "Access to model x is restricted", "gated"),
    ("RevisionNotFoundError", "404 Client Error", "revision does not exist"),
    ("RepositoryNotFoundError", "404 Client Error", "no such model"),
    ("LocalEntryNotFoundError", "Cannot find the requested files in the disk cache", "local Hugging Face cache"),
    ("OSError", "We couldn't connect to 'https://huggingface.co' to load the files", "Hub cannot be reached"),
    ("OSError", "o/r does not appear to have a file named model.safetensors or model.safetensors.index.json and thus "
     "cannot be loaded with `safetensors`. Please do not set `use_safetensors=True`.", "only pickle weights: pickle"),
])
def test_hub_errors_become_what_to_do(name, message, needle):
    from clipeval.pipelines import hub_error

    error = type(name, (Exception,), {})(message)
    assert needle in hub_error(error)


def test_clip_models_with_only_pickle_weights(cli, models, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    clip = tmp_path / "clip-bin"
    shutil.copytree(models.clip, clip)
    torch.save(load_file(clip / "model.safetensors"), clip / "pytorch_model.bin")
    (clip / "model.safetensors").unlink()
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(images / "00000.png")
    args = ["score", images, "--prompts", "smoke", "--clip-model", clip, "--quiet"]
    assert_user_error(cli(*args, "--out", tmp_path / "o1"), "only pickle weights", "--allow-pickle")
    allowed = cli(*args, "--out", tmp_path / "o2", "--allow-pickle")
    assert allowed.exit_code == 0, allowed.stderr
    same = cli("score", images, "--prompts", "smoke", "--clip-model", models.clip, "--quiet", "--out", tmp_path / "o3")
    assert same.exit_code == 0, same.stderr
    import pandas as pd

    # The same weights, read from pickle or safetensors; where the tensors land in memory can move
    # the kernels' summation order, so the scores agree to float32 rounding, not always bit for bit.
    pickled, safe = (pd.read_csv(tmp_path / o / "scores.csv") for o in ("o2", "o3"))
    assert pickled.drop(columns="clip_score").equals(safe.drop(columns="clip_score"))
    assert (pickled["clip_score"] - safe["clip_score"]).abs().max() < 1e-6
