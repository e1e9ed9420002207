"""The loop under pressure (out-of-memory), --compile's wiring, and a CLI that starts at once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.fixture
def small_gpu(monkeypatch):
    """The real pipeline, failing like CUDA does when asked for more than ``limit`` images at once."""
    import torch
    from diffusers import StableDiffusionPipeline

    import functools

    state = {"limit": 2, "calls": []}
    original = StableDiffusionPipeline.__call__

    @functools.wraps(original)  # clipeval reads the pipeline's defaults from its signature
    def call(self, prompt=None, **kwargs):
        state["calls"].append(len(prompt))
        if len(prompt) > state["limit"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, prompt=prompt, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)
    return state


def test_out_of_memory_halves_the_batch_and_carries_on(run_tiny, tmp_path, small_gpu):
    out = tmp_path / "run"
    result = run_tiny(out, "--limit", "6", "--batch-size", "6")
    assert result.exit_code == 0, result.stderr
    assert small_gpu["calls"] == [6, 3, 1, 1, 1, 1, 1, 1]  # 6 fails, 3 fails, 3 // 2 = 1 works
    assert result.stderr.count("out of GPU memory") == 1


def test_out_of_memory_at_one_image_is_a_clear_error(run_tiny, tmp_path, small_gpu):
    small_gpu["limit"] = 0
    result = run_tiny(tmp_path / "run", "--limit", "2")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    notice, error = result.stderr.strip().splitlines()  # the one notice of halving, then the error
    assert notice == "clipeval: out of GPU memory at 2 images at once; continuing with 1"
    assert error.startswith("clipeval: error: out of GPU memory even for one image at a time") and "--height" in error


def test_compile_wraps_the_denoiser_and_is_recorded(run_tiny, tmp_path, monkeypatch):
    """A real torch.compile wrapper (OptimizedModule), with the eager backend so the test does not
    spend minutes in inductor; results equal the uncompiled run's to float rounding."""
    import numpy as np
    import pandas as pd
    import torch

    compiled = []
    original = torch.compile

    def compile(module, **kwargs):
        compiled.append(type(module).__name__)
        return original(module, backend="eager")

    monkeypatch.setattr(torch, "compile", compile)
    out = tmp_path / "run"
    result = run_tiny(out, "--limit", "2", "--compile")
    assert result.exit_code == 0, result.stderr
    assert compiled == ["UNet2DConditionModel"]
    assert json.loads((out / "manifest.json").read_text())["generation"]["compile"] is True
    plain = tmp_path / "plain"
    assert run_tiny(plain, "--limit", "2").exit_code == 0
    a, b = pd.read_csv(out / "scores.csv"), pd.read_csv(plain / "scores.csv")
    assert np.allclose(a.clip_score, b.clip_score, atol=1e-5)


@pytest.mark.parametrize("args", [["--help"], ["libraries"], ["prompts", "smoke"], ["run", "--help"], ["compare", "--help"]])
def test_the_cli_starts_without_torch_or_diffusers(args):
    code = ("import sys\nfrom clipeval.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'pandas', 'scipy') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)" % (args,))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stderr, result.stderr[-500:]
