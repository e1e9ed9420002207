"""SD3 and Flux (transformer denoisers, flow matching, T5) through run, resume and score, as the
README promises for any pipeline diffusers auto-loads. Tiny random models, real loading code."""

from __future__ import annotations

import json

import pytest
from conftest import files_of
from tiny_transformers import build_flux, build_sd3

ARGS = ("--limit", "4", "--images-per-prompt", "2", "--batch-size", "3", "--height", "32", "--width", "32")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformers")
    return {"sd3": build_sd3(root / "sd3"), "flux": build_flux(root / "flux")}


@pytest.mark.slow
@pytest.mark.parametrize("family, pipeline_class", [("sd3", "StableDiffusion3Pipeline"), ("flux", "FluxPipeline")])
def test_run_resume_and_score(family, pipeline_class, pipelines, run_tiny, cli, models, tmp_path, monkeypatch):
    from clipeval import store
    from clipeval.pipelines import resolve_checkpoint, resolve_dtype

    checkpoint = pipelines[family]
    reference = tmp_path / "reference"
    result = run_tiny(reference, *ARGS, checkpoint=checkpoint)
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["settings"]["pipeline"] == pipeline_class
    assert manifest["settings"]["dtype"] == "float32"  # auto on the CPU
    index = resolve_checkpoint(str(checkpoint), None).model_index
    assert resolve_dtype("auto", "cuda", index) == "bfloat16"  # auto on a GPU: what they are trained in

    # Interrupted after its first committed batch, the same command finishes the rest only.
    out = tmp_path / "run"
    real_commit, calls = store.RunDir.commit, []

    def commit(self, rows):
        real_commit(self, rows)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(store.RunDir, "commit", commit)
    assert run_tiny(out, *ARGS, checkpoint=checkpoint).exit_code == 130
    monkeypatch.setattr(store.RunDir, "commit", real_commit)
    resumed = run_tiny(out, *ARGS, checkpoint=checkpoint)
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads((out / "manifest.json").read_text())["timings"]["images_generated"] == 8 - 3
    assert files_of(out) == files_of(reference)

    # Re-scoring the PNGs with the run's CLIP reproduces its scores bit for bit.
    again = tmp_path / "again"
    assert cli("score", out, "--clip-model", models.clip, "--out", again, "--quiet").exit_code == 0
    assert (again / "scores.csv").read_bytes() == (out / "scores.csv").read_bytes()

    # Another base seed, other pixels.
    other = tmp_path / "seed1"
    assert run_tiny(other, *ARGS, "--seed", "1", checkpoint=checkpoint).exit_code == 0
    assert all(files_of(other)[k] != v for k, v in files_of(reference).items() if k.startswith("images/"))
