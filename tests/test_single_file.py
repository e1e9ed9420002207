"""Single-file .safetensors checkpoints (original SD key layout) with --base-model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_user_error, files_of
from ldm_checkpoint import unet_to_ldm, vae_to_ldm, write_single_file


def test_the_test_writer_inverts_diffusers_converters(models):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    for cls, subfolder, to_ldm, back in (
        (UNet2DConditionModel, "unet", unet_to_ldm, convert_ldm_unet_checkpoint),
        (AutoencoderKL, "vae", vae_to_ldm, convert_ldm_vae_checkpoint),
    ):
        model = cls.from_pretrained(models.sd, subfolder=subfolder)
        state = model.state_dict()
        restored = back(to_ldm(state, dict(model.config)), dict(model.config))
        assert set(restored) == set(state)
        assert all(torch.equal(restored[k], state[k]) for k in state)


@pytest.fixture(scope="module")
def single_file(models, tmp_path_factory):
    return write_single_file(models.sd, tmp_path_factory.mktemp("single") / "tiny-sd.safetensors")


def test_single_file_run_equals_the_folder_run(run_tiny, single_file, models, tmp_path):
    folder, single = tmp_path / "folder", tmp_path / "single"
    assert run_tiny(folder, "--limit", "3").exit_code == 0
    result = run_tiny(single, "--limit", "3", "--base-model", str(models.sd), checkpoint=single_file)
    assert result.exit_code == 0, result.stderr
    assert files_of(single) == files_of(folder)
    manifest = json.loads((single / "manifest.json").read_text())
    assert manifest["checkpoint"]["kind"] == "single-file"
    assert manifest["checkpoint"]["base_model"] == str(models.sd)
    assert manifest["checkpoint"]["files"][0]["file"] == "tiny-sd.safetensors"


def test_single_file_with_an_uncached_hub_base_is_one_line(run_tiny, single_file, tmp_path):
    result = run_tiny(tmp_path / "run", "--base-model", "someone/not-cached", checkpoint=single_file)
    assert_user_error(result, "someone/not-cached")
