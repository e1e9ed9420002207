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


def test_adaptive_doubles_while_images_per_second_rise_then_settles():
    from clipeval.loop import Adaptive

    said = []
    a = Adaptive(8, auto=True, grow=True, log=said.append)
    gib = 2**30

    def twice(adaptive, size, rate, peak=5 * gib, base=4 * gib, total=80 * gib):
        adaptive.observe(size, 100.0, peak, base, total)  # the first call at a size: a warm-up, not measured
        adaptive.observe(size, size / rate, peak, base, total)

    a.observe(8, 100.0, 5 * gib, 4 * gib, 80 * gib)
    assert a.limit == 8  # a slow first call (compilation, autotuning) decides nothing
    a.observe(8, 8 / 10, 5 * gib, 4 * gib, 80 * gib)  # 10 img/s
    assert a.limit == 16
    twice(a, 16, 15.0, peak=6 * gib)  # +50%: keep growing
    assert a.limit == 32
    twice(a, 32, 15.3, peak=8 * gib)  # +2%: not worth more, but no loss
    assert (a.limit, a.grow) == (32, False)
    assert said == ["--batch-size auto: generating 32 images at once (images/s stopped rising)"]
    a.observe(32, 1.0, peak=0, base=0, total=0)  # settled: nothing moves any more
    assert a.limit == 32

    b = Adaptive(8, auto=True, grow=True)
    twice(b, 8, 10.0)
    twice(b, 16, 9.0, peak=6 * gib)  # slower: step back
    assert (b.limit, b.grow) == (8, False)

    c = Adaptive(8, auto=True, grow=True)
    twice(c, 8, 10.0, peak=40 * gib)  # 4 + 2·36 GiB would not fit in 90% of 80
    assert (c.limit, c.grow) == (8, False)

    d = Adaptive(8, auto=True, grow=True)
    d.shrink(8)  # out of memory: halve and never grow again
    assert (d.limit, d.grow) == (4, False)


@pytest.mark.slow
def test_batch_size_auto_generates_several_journal_batches_at_once(run_tiny, tmp_path, monkeypatch):
    """The real loop with growth forced on (the CPU never grows) and measured throughput faked:
    the generation calls double, each journal line stays one batch of 4, and the images are
    those of a fixed batch size, to the uint8 rounding that batch composition may move."""
    import numpy as np
    import pandas as pd
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from clipeval import loop

    calls = []
    original = StableDiffusionPipeline.__call__

    import functools

    @functools.wraps(original)
    def call(self, prompt=None, **kwargs):
        calls.append(len(prompt))
        return original(self, prompt=prompt, **kwargs)

    rates = {8: 10.0, 16: 15.0, 32: 15.3}
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)
    monkeypatch.setattr(loop.Adaptive, "for_run", classmethod(lambda cls, size, device, log=None: cls(8, log=log, auto=True, grow=True)))
    monkeypatch.setattr(loop._Watch, "report", lambda self, adaptive, size: adaptive.observe(size, size / rates.get(size, 1.0), 0, 0, 0))
    out = tmp_path / "auto"
    result = run_tiny(out, "--limit", "16", "--images-per-prompt", "8", "--batch-size", "auto")
    assert result.exit_code == 0, result.stderr
    assert calls == [8, 8, 16, 16, 32, 32, 16]  # 128 images: each size twice (warm-up, measure), then the 16 left
    assert "--batch-size auto: generating 32 images at once (images/s stopped rising)" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generation"]["batch_size"] == "auto"
    assert manifest["timings"]["images_per_generation_call"] == 32
    fixed = tmp_path / "fixed"
    assert run_tiny(fixed, "--limit", "16", "--images-per-prompt", "8", "--batch-size", "4").exit_code == 0
    a, b = pd.read_csv(out / "scores.csv"), pd.read_csv(fixed / "scores.csv")
    assert a.drop(columns="clip_score").equals(b.drop(columns="clip_score"))
    for name in a["image"]:
        pa, pb = np.asarray(Image.open(out / name), int), np.asarray(Image.open(fixed / name), int)
        assert np.abs(pa - pb).max() <= 1


def test_batch_size_auto_resumes_in_journal_batches(run_tiny, tmp_path, monkeypatch):
    """Killed after its first generation call of 8 images, an auto run kept two journal lines of 4:
    the resume generates exactly the rest."""
    from diffusers import StableDiffusionPipeline

    import functools

    from clipeval import loop

    original = StableDiffusionPipeline.__call__
    state = {"calls": [], "fail_after": 1}

    @functools.wraps(original)
    def call(self, prompt=None, **kwargs):
        if len(state["calls"]) == state["fail_after"]:
            raise KeyboardInterrupt
        state["calls"].append(len(prompt))
        return original(self, prompt=prompt, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)
    monkeypatch.setattr(loop.Adaptive, "for_run", classmethod(lambda cls, size, device, log=None: cls(8, log=log, auto=True, grow=True)))
    monkeypatch.setattr(loop._Watch, "report", lambda self, adaptive, size: adaptive.observe(size, size / 10.0, 0, 0, 0))
    out = tmp_path / "auto"
    first = run_tiny(out, "--limit", "6", "--images-per-prompt", "4", "--batch-size", "auto")
    assert first.exit_code == 130
    journal = [json.loads(line) for line in (out / ".clipeval" / "journal-0.jsonl").read_text().splitlines()]
    assert [len(line["rows"]) for line in journal] == [4, 4]
    state.update(calls=[], fail_after=99)
    second = run_tiny(out, "--limit", "6", "--images-per-prompt", "4", "--batch-size", "auto")
    assert second.exit_code == 0, second.stderr
    assert sum(state["calls"]) == 16  # 24 images, 8 kept


def test_the_default_auto_batch_on_a_cpu_is_batch_4_byte_for_byte(run_tiny, tmp_path):
    """On a CPU nothing grows: ``auto`` (the default) is four images per call and per journal line."""
    auto, four = tmp_path / "auto", tmp_path / "four"
    assert run_tiny(auto, "--limit", "5", "--images-per-prompt", "2").exit_code == 0
    assert run_tiny(four, "--limit", "5", "--images-per-prompt", "2", "--batch-size", "4").exit_code == 0
    assert json.loads((auto / "manifest.json").read_text())["generation"]["batch_size"] == "auto"
    for name in ["scores.csv", "prompts.csv", *sorted(p.name for p in (four / "images").iterdir())]:
        path = name if name.endswith(".csv") else f"images/{name}"
        assert (auto / path).read_bytes() == (four / path).read_bytes(), path


def test_a_batch_size_that_is_neither_a_number_nor_auto_is_one_line(run_tiny, tmp_path):
    result = run_tiny(tmp_path / "run", "--batch-size", "big")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'big' is neither a positive integer nor 'auto'" in result.output
    assert not (tmp_path / "run").exists()



EXIT_PRELUDE = """
import atexit, gc, os, pathlib, threading, time
mark = pathlib.Path(os.environ["MARK"])
atexit.register(lambda: (mark / "atexit").write_text("ran"))
atexit.register(lambda: (mark / "collections").write_text(str(gc.get_stats()[0]["collections"])))

class Teardown:  # collected when the interpreter tears its modules down
    def __del__(self):
        (mark / "teardown").write_text("ran")

keep = Teardown()
if os.environ.get("THREAD"):
    def later():  # a caller's own thread, which ends only once the main thread has
        while threading.main_thread().is_alive():
            time.sleep(0.01)
        (mark / "thread").write_text("done")
    threading.Thread(target=later).start()
"""


@pytest.mark.slow
@pytest.mark.parametrize("thread", [False, True])
def test_the_cli_leaves_without_the_teardown_but_with_its_exit_handlers(models, tmp_path, thread):
    """Once torch is loaded, the executable skips the interpreter's ~1 s teardown; atexit handlers
    still run, output is complete, exit codes stay; a caller's live thread gets a normal exit. The
    collector ran rarely while torch and transformers were imported (at Python's default
    threshold: over 1,000 times in a score of this size)."""
    import numpy as np
    from conftest import run_subprocess
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((24, 24, 3), 60 * i, np.uint8)).save(images / f"{i:05d}.png")
    library = tmp_path / "prompts.txt"
    library.write_text("a red square\na blue square\n", encoding="utf-8")
    env = {"MARK": str(tmp_path), "THREAD": "1" if thread else ""}
    done = run_subprocess(["score", images, "--prompts", library, "--clip-model", models.clip, "--out", tmp_path / "out",
                           "--quiet"], env=env, prelude=EXIT_PRELUDE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("clip/mean ") and done.stdout.endswith("summary.json\n")
    assert (tmp_path / "atexit").read_text() == "ran"
    assert int((tmp_path / "collections").read_text()) < 100
    if thread:
        assert (tmp_path / "thread").read_text() == "done"  # the normal exit waited for it
    else:
        assert not (tmp_path / "teardown").exists()  # the teardown was skipped

    (tmp_path / "atexit").unlink()
    failed = run_subprocess(["score", images, "--prompts", library, "--clip-model", tmp_path / "no-such-model",
                             "--out", tmp_path / "out2"], env=env, prelude=EXIT_PRELUDE)
    assert failed.returncode == 2 and failed.stderr.startswith("clipeval: error: ") and "Traceback" not in failed.stderr
    assert (tmp_path / "atexit").read_text() == "ran"
