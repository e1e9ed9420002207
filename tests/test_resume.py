"""Killed with SIGKILL at different points, a run resumed by the same command ends with files
identical to an uninterrupted run. Real processes: nothing in-process can fake a kill -9."""

from __future__ import annotations

import json
import signal
import time

import pytest
from conftest import assert_user_error, files_of, run_subprocess

pytestmark = pytest.mark.slow

ARGS = ["--prompt-library", "smoke", "--limit", "6", "--images-per-prompt", "2", "--batch-size", "3", "--steps", "2"]

_PRELUDE = """
import json, os, signal, tempfile
import clipeval.store as store
_n = [0]
def _die():
    os.kill(os.getpid(), signal.SIGKILL)
_commit, _write_atomic = store.RunDir.commit, store.write_atomic
"""

KILL_POINTS = {
    # after the first batch is committed: mid-generation
    "after-first-batch": """
def commit(self, rows):
    _commit(self, rows); _n[0] += 1
    if _n[0] == 1: _die()
store.RunDir.commit = commit
""",
    # the manifest is written, no batch yet
    "before-first-commit": """
def commit(self, rows):
    _die()
store.RunDir.commit = commit
""",
    # half of the second batch's journal line reaches the disk
    "torn-journal-line": """
def commit(self, rows):
    _n[0] += 1
    if _n[0] == 2:
        line = json.dumps({"rows": list(rows)})
        with open(self.state / f"journal-{self.rank}.jsonl", "ab") as f:
            f.write(line[: len(line) // 2].encode()); f.flush()
        _die()
    _commit(self, rows)
store.RunDir.commit = commit
""",
    # inside the fifth PNG write: a partial temp file is left behind
    "mid-png-write": """
def write_atomic(path, data):
    if path.suffix == ".png":
        _n[0] += 1
        if _n[0] == 5:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.write(fd, data[: len(data) // 2]); _die()
    _write_atomic(path, data)
store.write_atomic = write_atomic
""",
    # while the models load: nothing written yet
    "during-model-load": """
import clipeval.pipelines
clipeval.pipelines.load_pipeline = lambda *a, **k: _die()
""",
    # inside the fourth batch's generation (the first batch is committed)
    "inside-generation": """
import clipeval.generate
_generate = clipeval.generate.generate
def generate(*a, **k):
    _n[0] += 1
    if _n[0] == 4: _die()
    return _generate(*a, **k)
clipeval.generate.generate = generate
""",
    # while the fourth batch's prompts are embedded (the first batch is committed); a window of
    # one prompt makes each batch embed its own
    "text-embedding": """
import clipeval.score, clipeval.scorers
clipeval.scorers.TEXT_WINDOW = 1
_prepare = clipeval.score.ClipScorer.prepare
def prepare(self, prompts):
    _n[0] += 1
    if _n[0] == 4: _die()
    return _prepare(self, prompts)
clipeval.score.ClipScorer.prepare = prepare
""",
    # while the fourth batch's images are embedded (the first batch is committed)
    "image-scoring": """
import clipeval.score
_images = clipeval.score.ClipScorer.embed_images
def embed_images(self, images):
    _n[0] += 1
    if _n[0] == 4: _die()
    return _images(self, images)
clipeval.score.ClipScorer.embed_images = embed_images
""",
    # every batch committed, no table written
    "before-final-tables": """
def write_atomic(path, data):
    if path.name == "scores.csv": _die()
    _write_atomic(path, data)
store.write_atomic = write_atomic
""",
    # half of summary.json's temp file on disk
    "mid-summary-write": """
def write_atomic(path, data):
    if path.name == "summary.json":
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.write(fd, data[: len(data) // 2]); _die()
    _write_atomic(path, data)
store.write_atomic = write_atomic
""",
    # every table and the summary written, not the manifest that commits them
    "final-manifest": """
def write_atomic(path, data):
    if path.name == "manifest.json": _die()
    _write_atomic(path, data)
store.write_atomic = write_atomic
""",
    # everything generated; scores.csv written, prompts.csv not yet
    "between-final-tables": """
def write_atomic(path, data):
    if path.name == "prompts.csv": _die()
    _write_atomic(path, data)
store.write_atomic = write_atomic
""",
}


# Images the resumed run must generate after each kill: 12 images in 4 batches of 3; the loop
# commits batch i once batch i+2 is generated. A resumed run that started over would generate 12.
STILL_TO_DO = {
    "after-first-batch": 9, "torn-journal-line": 9, "mid-png-write": 9, "inside-generation": 9,
    "text-embedding": 9, "image-scoring": 9,
    "before-final-tables": 0, "mid-summary-write": 0, "final-manifest": 0, "between-final-tables": 0,
    "before-first-commit": 12, "during-model-load": 12,
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models):
    from click.testing import CliRunner

    from clipeval.cli import main

    out = tmp_path_factory.mktemp("reference") / "run"
    args = ["run", "--checkpoint", str(models.sd), "--clip-model", str(models.clip), "--out", str(out), "--quiet", *ARGS]
    assert CliRunner().invoke(main, args).exit_code == 0
    return files_of(out)


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_resume_after_kill_equals_uninterrupted(point, reference, run_tiny, models, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, "--quiet", *ARGS]
    killed = run_subprocess(args, prelude=_PRELUDE + KILL_POINTS[point])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "summary.json").exists() or point == "final-manifest"
    resumed = run_tiny(out, *ARGS[2:-2])  # the same command
    assert resumed.exit_code == 0, resumed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timings"]["images_generated"] == STILL_TO_DO[point]  # only what was not committed
    assert manifest["resumed"] == (0 if point == "during-model-load" else 1)
    assert files_of(out) == reference
    assert not list(out.rglob(".*.tmp"))


def test_second_run_into_a_live_folder_is_refused_and_a_dead_lock_is_taken_over(run_tiny, models, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    hold = _PRELUDE + """
import time
def commit(self, rows):
    _commit(self, rows); time.sleep(600)
store.RunDir.commit = commit
from clipeval.cli import entry
entry()
"""
    args = ["run", "--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, "--quiet", *ARGS]
    first = subprocess.Popen([sys.executable, "-c", hold, *map(str, args)])
    try:
        deadline = time.time() + 120
        while not list((out / ".clipeval").glob("journal-*.jsonl")) and time.time() < deadline:
            time.sleep(0.2)
        assert_user_error(run_tiny(out, *ARGS[2:-2]), "in use by a running clipeval", f"pid {first.pid}")
    finally:
        first.kill()
        first.wait()
    resumed = run_tiny(out, *ARGS[2:-2])
    assert resumed.exit_code == 0, resumed.stderr


def test_ctrl_c_exits_130_saying_how_to_resume(reference, run_tiny, models, tmp_path):
    out = tmp_path / "run"
    interrupt = _PRELUDE + """
def commit(self, rows):
    _commit(self, rows); _n[0] += 1
    if _n[0] == 2: os.kill(os.getpid(), signal.SIGINT)
store.RunDir.commit = commit
"""
    args = ["run", "--checkpoint", models.sd, "--clip-model", models.clip, "--out", out, "--quiet", *ARGS]
    stopped = run_subprocess(args, prelude=interrupt)
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.stderr.strip().endswith("clipeval: interrupted; run the same command again to resume")
    assert "Traceback" not in stopped.stderr
    resumed = run_tiny(out, *ARGS[2:-2])
    assert resumed.exit_code == 0, resumed.stderr
    assert files_of(out) == reference
