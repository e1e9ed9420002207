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
    # torchrun runs clipeval through a script that reports, at exit, whether the group was destroyed
    target = ["-m", "clipeval", "run"] if launcher == "accelerate" else [str(HERE / "closed_rank.py"), "run"]
    result = launch(launcher, target, ["--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, *ARGS])
    assert result.returncode == 0, result.stderr[-3000:]
    if launcher == "torchrun":
        assert result.stderr.count("process group alive at exit: False") == 2, result.stderr[-3000:]
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


def two_nodes(target: list[str], args: list, port: int, logs: Path) -> list[subprocess.Popen]:
    """Two torchrun launchers, one process each, as node 0 and node 1 of a two-machine job whose
    main node is 127.0.0.1: what each machine of a cluster runs. Their stderr goes to logs/node<N>."""
    procs = []
    logs.mkdir(exist_ok=True)
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), *target]
        with open(logs / f"node{node}", "w") as err:
            procs.append(subprocess.Popen([*cmd, *map(str, args)], stdout=subprocess.DEVNULL, stderr=err, text=True,
                                          start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    return procs


def test_two_nodes_equal_one_process(reference, models, tmp_path):
    out = tmp_path / "nodes"
    procs = two_nodes(["-m", "clipeval", "run"],
                      ["--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, *ARGS], _free_port(),
                      tmp_path / "logs")
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], [(tmp_path / "logs" / f"node{n}").read_text()[-2000:] for n in (0, 1)]
    assert files_of(out) == files_of(reference)
    assert sorted(p.name for p in (out / ".clipeval").glob("journal-*.jsonl")) == ["journal-0.jsonl", "journal-1.jsonl"]


def test_a_killed_node_stops_the_other_and_the_run_resumes(reference, run_tiny, models, tmp_path):
    import signal

    out = tmp_path / "nodes"
    slow = "import time, clipeval.store as s\n_c = s.RunDir.commit\ns.RunDir.commit = lambda self, rows: (_c(self, rows), time.sleep(2))[0]\n"
    script = tmp_path / "slow_clipeval.py"
    pids = tmp_path / "pids"
    pids.mkdir()
    record = f"import os\nopen(os.path.join({str(pids)!r}, os.environ['RANK']), 'w').write(str(os.getpid()))\n"
    script.write_text(record + slow + "from clipeval.cli import main\nmain()\n")
    logs = tmp_path / "logs"
    procs = two_nodes([str(script), "run"],
                      ["--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, *ARGS], _free_port(), logs)
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
    finally:
        for p in procs:  # node 0's launcher may linger in torchrun's own exit barrier: not ours to wait for
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for pid in pids.iterdir():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid.read_text()), signal.SIGKILL)
    assert "clipeval: error: rank 0: another process of this run died without a word" in said, said[-2000:]
    assert not (out / "summary.json").exists()
    with one_thread():
        resumed = run_tiny(out, *ARGS[:-3])
    assert resumed.exit_code == 0, resumed.stderr
    assert files_of(out) == files_of(reference)
