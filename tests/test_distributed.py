"""Several processes (torchrun / accelerate launch, gloo on the CPU): the merged result equals a
single-process run, and a run killed on one rank resumes with another number of processes.

On the CPU, float results depend on the number of threads per process (the order of reductions);
the launchers give each process one thread, so the single-process reference runs with one too."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import files_of

pytestmark = pytest.mark.slow
ARGS = ["--prompt-library", "smoke", "--limit", "7", "--images-per-prompt", "2", "--batch-size", "3", "--steps", "2", "--quiet"]
HERE = Path(__file__).parent


@contextlib.contextmanager
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models):
    from click.testing import CliRunner

    from clipeval.cli import main

    out = tmp_path_factory.mktemp("dist") / "single"
    with one_thread():
        result = CliRunner().invoke(main, ["run", "--checkpoint", str(models.sd), "--clip-model", str(models.clip),
                                           "--out", str(out), *ARGS])
    assert result.exit_code == 0, result.stderr
    return out


def launch(launcher: str, target: list[str], args: list, timeout: float = 300, env: dict[str, str] | None = None):
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *target]
    else:  # accelerate's own launcher; on a CPU-only machine --multi_gpu still forms a gloo group
        cmd = [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *target]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_processes_equal_one(launcher, reference, models, tmp_path):
    out = tmp_path / "two"
    result = launch(launcher, ["-m", "clipeval", "run"],
                    ["--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, *ARGS])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / ".clipeval").glob("journal-*.jsonl")) == ["journal-0.jsonl", "journal-1.jsonl"]
    assert files_of(out) == files_of(reference)
    assert result.stdout.count("clip/mean") == 1  # rank 0 reports, rank 1 stays quiet


def test_a_rank_killed_mid_run_resumes_with_one_process(reference, run_tiny, models, tmp_path):
    out = tmp_path / "killed"
    killed = launch("torchrun", [str(HERE / "kill_rank.py"), "run"],
                    ["--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, *ARGS])
    assert killed.returncode != 0
    assert not (out / "summary.json").exists()
    assert (out / ".clipeval" / "journal-1.jsonl").read_text().count("\n") == 1  # rank 1 died after one batch
    with one_thread():
        resumed = run_tiny(out, *ARGS[:-3])
    assert resumed.exit_code == 0, resumed.stderr
    assert files_of(out) == files_of(reference)


def test_rank_0_failing_to_claim_stops_every_rank(models, tmp_path):
    import fcntl

    out = tmp_path / "busy"
    (out / ".clipeval").mkdir(parents=True)
    with open(out / ".clipeval" / "lock", "w") as lock:
        lock.write("4242")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another clipeval holds the folder
        start = time.time()
        result = launch("torchrun", ["-m", "clipeval", "run"],
                        ["--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, *ARGS], timeout=180)
    assert result.returncode != 0 and time.time() - start < 170
    assert "in use by a running clipeval (pid 4242)" in result.stderr
    assert "rank 0: " in result.stderr  # rank 1 says why it stopped too


@pytest.mark.parametrize("where", ["load", "loop"])
def test_any_error_on_one_rank_stops_every_rank_with_its_message(where, run_tiny, models, tmp_path):
    """Rank 1 raises a plain RuntimeError (a CUDA error, a bug): rank 0 stops at its next batch
    instead of finishing its own, both say rank 1's message in one line, and the run resumes."""
    out = tmp_path / "failed"
    args = ["--prompt-library", "smoke", "--limit", "16", "--images-per-prompt", "2", "--batch-size", "2",
            "--steps", "2", "--quiet"]
    failed = launch("torchrun", [str(HERE / "fail_rank.py"), "run"],
                    ["--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, *args], timeout=240,
                    env={"FAIL_AT": where})
    assert failed.returncode != 0
    said = [line for line in failed.stderr.splitlines() if line.startswith("clipeval: error:")]
    message = "clipeval: error: rank 1: RuntimeError: CUDA error: an illegal memory access was encountered (injected)"
    assert said == [message, message], failed.stderr[-3000:]  # both ranks, the same line
    assert failed.stderr.count("Traceback (most recent call last)") >= 1  # rank 1's own, for the bug report
    journals = {p.name: p.read_text().count("\n") for p in (out / ".clipeval").glob("journal-*.jsonl")}
    if where == "load":
        assert journals == {} and not (out / "images").exists()  # nothing generated by anyone
    else:
        assert journals["journal-1.jsonl"] == 1
        assert journals["journal-0.jsonl"] <= 5  # rank 0 had 8 batches: it stopped, it did not finish
    committed = 2 * sum(journals.values())
    resumed = run_tiny(out, *args[:-3])
    assert resumed.exit_code == 0, resumed.stderr
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timings"]["images_generated"] == 32 - committed
    assert len(list((out / "images").glob("*.png"))) == 32
