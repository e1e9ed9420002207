"""Several processes (torchrun / accelerate launch, gloo on the CPU): the merged result equals a
single-process run, and a run killed on one rank resumes with another number of processes.

On the CPU, float results depend on the number of threads per process (the order of reductions);
the launchers give each process one thread, so the single-process reference runs with one too."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import files_of

pytestmark = pytest.mark.slow
ARGS = ["--prompt-library", "smoke", "--limit", "7", "--images-per-prompt", "2", "--batch-size", "3", "--steps", "2", "--quiet"]
HERE = Path(__file__).parent


@contextlib.contextmanager
def threads(n: int = 1):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models):
    from click.testing import CliRunner

    from clipeval.cli import main

    out = tmp_path_factory.mktemp("dist") / "single"
    with threads(1):
        result = CliRunner().invoke(main, ["run", "--checkpoint", str(models.sd), "--clip-model", str(models.clip),
                                           "--out", str(out), *ARGS])
    assert result.exit_code == 0, result.stderr
    return out


def launch(launcher: str, target: list[str], args: list, tmp_path: Path, timeout: float = 300,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Two processes on this machine. ``target`` is a script that imports ``closed_rank``, so a
    launch that outlives ``timeout`` fails with every rank's stack, and leaves no process behind."""
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *target]
    else:  # accelerate's own launcher; on a CPU-only machine --multi_gpu still forms a gloo group
        cmd = [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *target]
    pids = _pids(tmp_path)
    proc = subprocess.Popen([*cmd, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CLIPEVAL_TEST_PIDS": str(pids), **(env or {})})
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stacks(pids)
        _stop([proc], pids)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{launcher} did not end within {timeout} s; its stderr, with each rank's stack:\n{stderr[-20000:]}")
    finally:
        _stop([proc], pids)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _pids(tmp_path: Path) -> Path:
    pids = tmp_path / "pids"
    pids.mkdir(exist_ok=True)
    return pids


def _workers(pids: Path) -> list[int]:
    """The workers recorded in ``pids`` that still run: a pid whose process is gone may already
    belong to another, so a pid counts only while its process has this folder in its environment."""
    alive = []
    for record in pids.iterdir():
        try:
            pid = int(record.read_text())
            if f"CLIPEVAL_TEST_PIDS={pids}\0".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                alive.append(pid)
        except (ValueError, OSError):
            continue
    return alive


def _stacks(pids: Path) -> None:
    """Every worker prints its threads' stacks (closed_rank registers SIGUSR1 with faulthandler)."""
    import signal

    for pid in _workers(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    time.sleep(2)


def _stop(launchers: list[subprocess.Popen], pids: Path) -> None:
    """Kill what is left: the launchers with their sessions, and the workers, which torchrun starts
    in sessions of their own. A hung test must not leave them eating the next tests' CPU."""
    import signal

    for p in launchers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    for pid in _workers(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_processes_equal_one(launcher, reference, models, tmp_path):
    out = tmp_path / "two"
    # Rank 0 takes 3 s to write the tables: rank 1 waits for it before the group is destroyed
    # (torch's advice; a rank leaving early once hung its peer), and the group is destroyed.
    result = launch(launcher, [str(HERE / "closed_rank.py"), "run"],
                    ["--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, *ARGS], tmp_path,
                    env={"CLIPEVAL_TEST_SLOW_FINISH": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stderr
    assert said.count("process group alive at exit: False") == 2, said[-3000:]
    assert said.index("rank 0: tables written") < said.index("rank 1: process group alive at exit"), said[-3000:]
    assert sorted(p.name for p in (out / ".clipeval").glob("journal-*.jsonl")) == ["journal-0.jsonl", "journal-1.jsonl"]
    assert files_of(out) == files_of(reference)
    assert result.stdout.count("clip/mean") == 1  # rank 0 reports, rank 1 stays quiet


def test_a_default_thread_run_is_within_a_uint8_level_of_one_thread(reference, models, tmp_path):
    """The README's statement about threads: a run with torch's default thread count (2 on the test
    machines, set here) differs from the 1-thread reference (what each launched process runs) by at most one
    uint8 level per pixel, and its scores by float rounding."""
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from clipeval.cli import main

    out = tmp_path / "threads"
    with threads(2):  # the suite's workers run one thread each (conftest)
        result = CliRunner().invoke(main, ["run", "--checkpoint", str(models.sd), "--clip-model", str(models.clip),
                                           "--out", str(out), *ARGS])
    assert result.exit_code == 0, result.stderr
    images = sorted(p.name for p in (reference / "images").glob("*.png"))
    assert images == sorted(p.name for p in (out / "images").glob("*.png")) and len(images) == 14
    for name in images:
        a, b = (np.asarray(Image.open(run / "images" / name), dtype=int) for run in (reference, out))
        assert np.abs(a - b).max() <= 1, name
    ours, theirs = (pd.read_csv(run / "scores.csv") for run in (out, reference))
    assert np.abs(ours["clip_score"] - theirs["clip_score"]).max() < 1e-4


@pytest.mark.parametrize("form_group", [True, False], ids=["own-group", "no-group"])
def test_a_training_script_evaluates_twice_under_torchrun(form_group, models, tmp_path):
    """``clipeval.run`` from a training script, between steps, on every rank. A group the script
    formed stays up for its training (an all_reduce after each evaluation); without one, clipeval
    forms its own once and destroys it at exit, so a second evaluation works too."""
    out = tmp_path / "evals"
    result = launch("torchrun", [str(HERE / "in_training.py"), models.sd, models.clip, out], [], tmp_path,
                    env={"FORM_GROUP": "1" if form_group else "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stderr
    for step in (1, 2):
        assert f"rank 1: evaluation {step}: no result" in said, said[-3000:]
        rank0 = re.search(rf"rank 0: evaluation {step}: ([0-9.]+)(, all_reduce 2)?", said)
        assert rank0 and bool(rank0.group(2)) == form_group, said[-3000:]
    assert said.count(", all_reduce 2") == (4 if form_group else 0)
    assert said.count("process group alive at exit: False") == 2, said[-3000:]
    assert (out / "step1" / "scores.csv").read_bytes() == (out / "step2" / "scores.csv").read_bytes()


def _said(folder: Path) -> dict[int, dict]:
    import json

    return {int(p.stem[4:]): json.loads(p.read_text()) for p in folder.glob("rank*.json")}


def test_evaluate_across_ranks_splits_the_work_and_equals_one_process(models, tmp_path):
    """``evaluate(..., across_ranks=True)`` on both ranks of a training script's group: each
    pipeline makes half of the 10 images, and both ranks get the whole result, equal to one
    process evaluating everything; rank 0 writes the folder."""
    from diffusers import StableDiffusionPipeline

    from clipeval import ClipScorer, evaluate

    out = tmp_path / "eval"
    result = launch("torchrun", [str(HERE / "evaluate_ranks.py"), models.sd, models.clip, out, tmp_path], [], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    said = _said(tmp_path)
    assert sorted(said) == [0, 1], result.stderr[-3000:]
    assert [said[r]["made"] for r in (0, 1)] == [6, 4]  # 5 batches of 2: ranks 0 and 1 take 3 and 2
    with threads(1):
        alone = evaluate(StableDiffusionPipeline.from_pretrained(models.sd),
                         ["a red cube on a table", "a cat", "the city at night", "a bowl of fruit", "a dog in the snow"],
                         clip=ClipScorer(str(models.clip)), images_per_prompt=2, steps=2, batch_size=2)
    assert said[0]["scores"] == said[1]["scores"] == alone.scores["clip_score"].tolist()
    assert said[0]["mean"] == said[1]["mean"] == alone.summary["clip/mean"]
    written = pd.read_csv(out / "scores.csv", keep_default_na=False)
    assert written["clip_score"].tolist() == alone.scores["clip_score"].tolist()
    assert len(list((out / "images").glob("*.png"))) == 10


def test_evaluate_across_ranks_stops_every_rank_on_one_ranks_error(models, tmp_path):
    result = launch("torchrun", [str(HERE / "evaluate_ranks.py"), models.sd, models.clip, tmp_path / "eval", tmp_path],
                    [], tmp_path, timeout=240, env={"FAIL_RANK": "1"})
    said = _said(tmp_path)
    message = "ClipevalError: rank 1: RuntimeError: CUDA error: an illegal memory access was encountered (injected)"
    assert [said[r].get("error") for r in (0, 1)] == [message, message], result.stderr[-3000:]
    assert "Traceback (most recent call last)" in result.stderr  # rank 1's own, for the bug report
    assert not (tmp_path / "eval" / "scores.csv").exists()


def test_a_sweep_under_torchrun_equals_one_process(models, tmp_path):
    """Rank 0 alone takes the lock and plans; both ranks evaluate each checkpoint together. Before,
    rank 1 found the lock taken, said 'another sweep is working' and left, and rank 0 waited for it
    forever."""
    from click.testing import CliRunner

    from clipeval.cli import main

    training = tmp_path / "training"
    for step in (10, 20):
        shutil.copytree(models.sd, training / f"checkpoint-{step}")
    args = ["--prompt-library", "smoke", "--limit", "3", "--images-per-prompt", "2", "--batch-size", "2", "--steps", "2",
            "--clip-model", str(models.clip), "--settle", "0", "--quiet"]
    result = launch("torchrun", [str(HERE / "closed_rank.py"), "sweep", training], ["--out", tmp_path / "two", *args],
                    tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("2 evaluated, 0 up to date") == 1, result.stdout  # rank 0 reports
    with threads(1):
        alone = CliRunner().invoke(main, ["sweep", str(training), "--out", str(tmp_path / "one"), *args])
    assert alone.exit_code == 0, alone.stderr
    for step in (10, 20):
        name = f"checkpoint-{step}"
        assert (tmp_path / "two" / name / "scores.csv").read_bytes() == (tmp_path / "one" / name / "scores.csv").read_bytes()
    history = [pd.read_csv(tmp_path / side / "history.csv").drop(columns=["finished_at", "checkpoint"]) for side in ("two", "one")]
    pd.testing.assert_frame_equal(*history)
    again = launch("torchrun", [str(HERE / "closed_rank.py"), "sweep", training], ["--out", tmp_path / "two", *args],
                   tmp_path, timeout=240)
    assert again.returncode == 0 and "0 evaluated, 2 up to date" in again.stdout, again.stderr[-3000:]


def test_score_under_torchrun_runs_on_rank_0_alone(reference, models, tmp_path):
    """Before, both ranks scored into the same folder: the second was refused ('in use by a running
    clipeval'), and torchrun brought the whole launch down with it."""
    out = tmp_path / "scored"
    result = launch("torchrun", [str(HERE / "closed_rank.py"), "score", reference],
                    ["--clip-model", models.clip, "--out", out, "--quiet"], tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("note: score runs in one process: rank 0 does it, the other 1 rank(s)") == 1
    assert result.stdout.count("clip/mean") == 1
    assert (out / "scores.csv").read_bytes() == (reference / "scores.csv").read_bytes()


def test_a_rank_killed_mid_run_resumes_with_one_process(reference, run_tiny, models, tmp_path):
    out = tmp_path / "killed"
    killed = launch("torchrun", [str(HERE / "kill_rank.py"), "run"],
                    ["--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, *ARGS], tmp_path)
    assert killed.returncode != 0
    assert not (out / "summary.json").exists()
    assert (out / ".clipeval" / "journal-1.jsonl").read_text().count("\n") == 1  # rank 1 died after one batch
    with threads(1):
        resumed = run_tiny(out, *ARGS[:-3])
    assert resumed.exit_code == 0, resumed.stderr
    assert files_of(out) == files_of(reference)


def test_sigterm_to_torchrun_stops_every_rank_like_ctrl_c_and_the_run_resumes(reference, run_tiny, models, tmp_path):
    out = tmp_path / "terminated"
    stopped = launch("torchrun", [str(HERE / "term_rank.py"), "run"],
                     ["--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, *ARGS], tmp_path)
    assert stopped.returncode != 0
    said = [line for line in stopped.stderr.splitlines() if "terminated (SIGTERM)" in line]
    assert len(said) == 2, stopped.stderr[-5000:]  # each rank, one line each, no traceback
    # The only traceback is torchrun's own agent's (its SignalException); none from a rank.
    assert not re.search(r'File ".*[/\\]clipeval[/\\]', stopped.stderr), stopped.stderr[-5000:]
    assert not (out / "summary.json").exists()
    kept = sum((out / ".clipeval" / f"journal-{r}.jsonl").read_text().count("\n")
               for r in (0, 1) if (out / ".clipeval" / f"journal-{r}.jsonl").exists())
    assert kept >= 1
    with threads(1):
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
        result = launch("torchrun", [str(HERE / "closed_rank.py"), "run"],
                        ["--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, *ARGS], tmp_path,
                        timeout=180)
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
                    ["--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, *args], tmp_path,
                    timeout=240, env={"FAIL_AT": where})
    assert failed.returncode != 0
    said = [line for line in failed.stderr.splitlines() if line.startswith("clipeval: error:")]
    message = "clipeval: error: rank 1: RuntimeError: CUDA error: an illegal memory access was encountered (injected)"
    assert said == [message, message], failed.stderr[-3000:]  # both ranks, the same line
    assert failed.stderr.count("process group alive at exit: False") == 2  # closed on the error path too
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(target: list[str], args: list, tmp_path: Path, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Two torchrun launchers, one process each, as node 0 and node 1 of a two-machine job whose
    main node is 127.0.0.1: what each machine of a cluster runs. Their stderr goes to
    logs/node<N>; ``target`` imports ``closed_rank``, which records each worker's pid in pids/."""
    procs = []
    logs, pids, port = tmp_path / "logs", _pids(tmp_path), _free_port()
    logs.mkdir(exist_ok=True)
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), *target]
        with open(logs / f"node{node}", "w") as err:
            procs.append(subprocess.Popen(
                [*cmd, *map(str, args)], stdout=subprocess.DEVNULL, stderr=err, text=True, start_new_session=True,
                env={**os.environ, "OMP_NUM_THREADS": "1", "CLIPEVAL_TEST_PIDS": str(pids), **(env or {})}))
    return procs


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- node {n}:\n" + (tmp_path / "logs" / f"node{n}").read_text()[-10000:] for n in (0, 1))


def test_two_nodes_equal_one_process(reference, models, tmp_path):
    out = tmp_path / "nodes"
    procs = two_nodes([str(HERE / "closed_rank.py"), "run"],
                      ["--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, *ARGS], tmp_path)
    try:
        codes = [p.wait(timeout=300) for p in procs]
    except subprocess.TimeoutExpired:
        _stacks(tmp_path / "pids")
        pytest.fail(f"the two nodes did not end within 300 s; their stderr, with each rank's stack:\n{_logs(tmp_path)}")
    finally:
        _stop(procs, tmp_path / "pids")
    assert codes == [0, 0], _logs(tmp_path)
    assert _logs(tmp_path).count("process group alive at exit: False") == 2, _logs(tmp_path)
    assert files_of(out) == files_of(reference)
    assert sorted(p.name for p in (out / ".clipeval").glob("journal-*.jsonl")) == ["journal-0.jsonl", "journal-1.jsonl"]


def test_a_killed_node_stops_the_other_and_the_run_resumes(reference, run_tiny, models, tmp_path):
    import signal

    out = tmp_path / "nodes"
    slow = "import time, clipeval.store as s\n_c = s.RunDir.commit\ns.RunDir.commit = lambda self, rows: (_c(self, rows), time.sleep(2))[0]\n"
    script = tmp_path / "slow_clipeval.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(HERE)!r})\nimport closed_rank\n"
                      + slow + "from clipeval.cli import entry\nentry()\n")
    logs, pids = tmp_path / "logs", tmp_path / "pids"
    procs = two_nodes([str(script), "run"],
                      ["--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, *ARGS], tmp_path)
    said = ""
    try:
        deadline = time.time() + 120
        while not (out / ".clipeval" / "journal-1.jsonl").exists() and time.time() < deadline:
            time.sleep(0.05)
        # Node 1 gone mid-run: its worker (torchrun starts workers in sessions of their own) and its launcher.
        os.kill(int((pids / "1").read_text()), signal.SIGKILL)
        os.killpg(procs[1].pid, signal.SIGKILL)
        deadline = time.time() + 60  # node 0 has at most three batches of 2 s left, then its collective fails
        while "clipeval: error:" not in said and time.time() < deadline:
            time.sleep(0.2)
            said = (logs / "node0").read_text()
    finally:  # node 0's launcher may linger in torchrun's own exit barrier: not ours to wait for
        _stop(procs, pids)
    assert "clipeval: error: rank 0: another process of this run died without a word" in said, said[-2000:]
    assert not (out / "summary.json").exists()
    with threads(1):
        resumed = run_tiny(out, *ARGS[:-3])
    assert resumed.exit_code == 0, resumed.stderr
    assert files_of(out) == files_of(reference)
