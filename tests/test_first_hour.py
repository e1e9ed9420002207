"""What a new user runs into in the first hour: a path typed another way, nan and out-of-scale
thresholds, SIGTERM, a smaller --limit, and a sweep's cron log."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_user_error, files_of

FAST = ("--limit", "3", "--steps", "2", "--quiet")


def _generated(run: Path) -> int:
    return json.loads((run / "manifest.json").read_text())["timings"]["images_generated"]


# -- the same folder is the same setting ----------------------------------------------------------------

def test_a_checkpoint_typed_another_way_resumes_the_same_run(cli, models, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(models.sd, work / "models" / "sd-a")
    shutil.copytree(models.clip, work / "models" / "clip")
    monkeypatch.chdir(work)
    out = "runs/a"
    first = cli("run", "--checkpoint", "models/sd-a", "--clip-model", "models/clip", "--prompt-library", "smoke",
                "--out", out, *FAST)
    assert first.exit_code == 0, first.stderr
    before = files_of(work / out)
    for spelling in ("models/sd-a/", "./models/sd-a", str(work / "models" / "sd-a"), "models/../models/sd-a"):
        again = cli("run", "--checkpoint", spelling, "--clip-model", str(work / "models" / "clip") + "/",
                    "--prompt-library", "smoke", "--out", out, *FAST)
        assert again.exit_code == 0, (spelling, again.stderr)
        assert _generated(work / out) == 0 and files_of(work / out) == before
    manifest = json.loads((work / out / "manifest.json").read_text())
    assert manifest["settings"]["checkpoint"] == str(work / "models" / "sd-a")  # the resolved location


def test_a_checkpoint_that_moved_is_recognised_by_its_files(run_tiny, models, tmp_path):
    old, new, other = tmp_path / "old" / "sd", tmp_path / "new" / "sd", tmp_path / "other" / "sd"
    shutil.copytree(models.sd, old)
    out = tmp_path / "run"
    assert run_tiny(out, "--limit", "2", checkpoint=old).exit_code == 0
    shutil.move(str(old), str(new))
    moved = run_tiny(out, "--limit", "3", checkpoint=new)  # and extended by a prompt
    assert moved.exit_code == 0, moved.stderr
    assert "the checkpoint moved" in moved.stderr and _generated(out) == 1
    shutil.copytree(models.sd, other)
    (other / "scheduler" / "scheduler_config.json").write_text(
        (other / "scheduler" / "scheduler_config.json").read_text().replace("0.012", "0.013"))
    assert_user_error(run_tiny(out, "--limit", "3", checkpoint=other), "other settings", "checkpoint")


def test_compare_pairs_rescored_runs_whose_clip_model_is_spelled_differently(cli, run_tiny, models, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert run_tiny(run, "--limit", "3").exit_code == 0
    monkeypatch.chdir(models.clip.parent)
    assert cli("score", run, "--clip-model", models.clip.name, "--out", tmp_path / "rel", "--quiet").exit_code == 0
    assert cli("score", run, "--clip-model", f"{models.clip}/", "--out", tmp_path / "abs", "--quiet").exit_code == 0
    result = cli("compare", tmp_path / "rel", tmp_path / "abs")
    assert result.exit_code == 0, result.stderr
    assert "mismatch" not in result.stdout


# -- every float option is a finite number in range; an error never leaves a lock -----------------------

@pytest.mark.parametrize("option", ["--guidance-scale", "--lora-scale", "--fail-below"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_run_options_are_one_line(run_tiny, tmp_path, option, value):
    out = tmp_path / "run"
    result = run_tiny(out, option, value)
    assert_user_error(result, option, "not a finite number")
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (("--margin", "nan"), "not a finite number"), (("--confidence", "inf"), "not a finite number"),
    (("--margin", "5"), "did you mean 0.05"), (("--margin", "-0.1"), "--margin"),
])
def test_compare_refuses_thresholds_it_cannot_mean(cli, run_tiny, tmp_path, args, needle):
    run = tmp_path / "a"
    assert run_tiny(run, "--limit", "2").exit_code == 0
    assert_user_error(cli("compare", run, run, *args), needle)


def test_sweep_refuses_a_non_finite_margin(cli, models, tmp_path):
    (tmp_path / "train").mkdir()
    result = cli("sweep", tmp_path / "train", "--out", tmp_path / "res", "--prompt-library", "smoke",
                 "--alert-if-worse", "nan")
    assert_user_error(result, "--alert-if-worse", "not a finite number")


def test_an_unexpected_error_leaves_no_lock(run_tiny, tmp_path, monkeypatch):
    from clipeval import store

    out = tmp_path / "run"
    assert run_tiny(out, "--limit", "2").exit_code == 0

    def broken(self, *args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(store.RunDir, "commit", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_tiny(out, "--limit", "3")
    monkeypatch.undo()
    assert not (out / ".clipeval" / "lock").exists() or _unlocked(out / ".clipeval" / "lock")
    assert run_tiny(out, "--limit", "3").exit_code == 0  # nothing left holds the folder


def _unlocked(path: Path) -> bool:
    import fcntl

    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


# -- gates in the scale people think in ---------------------------------------------------------------------

def test_fail_below_is_read_in_the_printed_scale(run_tiny, tmp_path):
    out = tmp_path / "run"
    passed = run_tiny(out, "--limit", "2", "--scale", "percent", "--fail-below", "1")
    assert passed.exit_code == 0, passed.stderr
    mean = json.loads((out / "summary.json").read_text())["clip/mean"]
    failed = run_tiny(out, "--limit", "2", "--scale", "percent", "--fail-below", f"{100 * mean + 0.5:.2f}")
    assert failed.exit_code == 1
    assert f"clip/mean {100 * mean:.2f} < --fail-below" in failed.stderr and "(100 x cosine)" in failed.stderr
    cosine = run_tiny(out, "--limit", "2", "--fail-below", f"{mean - 0.001:.4f}")
    assert cosine.exit_code == 0


@pytest.mark.parametrize("args, needle", [
    (("--fail-below", "30"), "did you mean 0.3, or --scale percent"),
    (("--fail-below", "-1.5"), "outside the possible range [-1, 1]"),
    (("--scale", "percent", "--fail-below", "130"), "outside the possible range [-100, 100]"),
])
def test_a_threshold_outside_the_scores_range_is_refused_before_any_work(run_tiny, tmp_path, args, needle):
    out = tmp_path / "run"
    assert_user_error(run_tiny(out, *args), needle)
    assert not out.exists()


# -- a smaller --limit never shrinks a finished result ------------------------------------------------------

def test_a_smaller_limit_is_refused_and_a_larger_than_the_library_noted(run_tiny, tmp_path):
    out = tmp_path / "run"
    assert run_tiny(out, "--limit", "3", "--images-per-prompt", "2").exit_code == 0
    before = files_of(out)
    assert_user_error(run_tiny(out, "--limit", "2", "--images-per-prompt", "2"), "holds results for 3 prompts x 2",
                      "--limit 3")
    assert_user_error(run_tiny(out, "--limit", "3"), "holds results for 3 prompts x 2")
    assert files_of(out) == before
    assert run_tiny(out, "--limit", "2", "--overwrite").exit_code == 0  # what --overwrite is for
    big = run_tiny(tmp_path / "all", "--limit", "100000")
    assert big.exit_code == 0 and "--limit 100000 is more than the 16 prompts of smoke" in big.stderr


# -- SIGTERM is Ctrl-C ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_keeps_what_was_finished_and_the_same_command_resumes(run_tiny, models, tmp_path):
    reference = tmp_path / "reference"
    assert run_tiny(reference, "--limit", "8", "--batch-size", "1").exit_code == 0
    out = tmp_path / "run"
    args = ["run", "--checkpoint", models.sd, "--clip-model", models.clip, "--prompt-library", "smoke", "--limit", "8",
            "--batch-size", "1", "--steps", "2", "--quiet", "--out", out]
    code = "from clipeval.cli import entry\nentry()"
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    journal = out / ".clipeval"
    deadline = time.time() + 120
    while time.time() < deadline and not list(journal.glob("journal*")) and proc.poll() is None:
        time.sleep(0.05)
    while time.time() < deadline and proc.poll() is None and _committed(out) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "terminated (SIGTERM)" in stderr and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    kept = _committed(out)
    assert kept >= 2
    resumed = run_tiny(out, "--limit", "8", "--batch-size", "1")
    assert resumed.exit_code == 0, resumed.stderr
    assert _generated(out) == 8 - kept
    assert files_of(out) == files_of(reference)


def _committed(out: Path) -> int:
    """Images whose rows are in the run's journal (what a resume keeps)."""
    total = 0
    for journal in (out / ".clipeval").glob("journal*"):
        try:
            total += sum(1 for line in journal.read_text().splitlines() if line.strip().startswith("{"))
        except OSError:
            pass
    return total


# -- the sweep's cron log ---------------------------------------------------------------------------------

def test_sweep_prints_a_line_per_checkpoint_and_no_alert_without_the_option(cli, models, tmp_path):
    import pandas as pd

    training = tmp_path / "training"
    for step in (2, 5, 9):
        shutil.copytree(models.sd, training / f"checkpoint-{step}")
    results = tmp_path / "results"
    result = cli("sweep", training, "--out", results, "--prompt-library", "smoke", "--limit", "3", "--steps", "2",
                 "--clip-model", models.clip, "--settle", "0", "--quiet", "--guidance-scale", "7.5")
    assert result.exit_code == 0, result.stderr
    history = pd.read_csv(results / "history.csv", keep_default_na=False)
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"step 2: clip/mean 0\.\d{4} \[0\.\d{4}, 0\.\d{4}\], the first checkpoint", lines[0])
    for line, row in zip(lines[1:3], history.iloc[1:].itertuples()):
        f = {c: float(getattr(row, c)) for c in ("clip_mean", "clip_mean_ci_low", "clip_mean_ci_high", "delta_best",
                                                  "delta_best_ci_low", "delta_best_ci_high")}
        assert line == (f"step {row.step}: clip/mean {f['clip_mean']:.4f} [{f['clip_mean_ci_low']:.4f}, "
                        f"{f['clip_mean_ci_high']:.4f}], delta {f['delta_best']:+.4f} [{f['delta_best_ci_low']:+.4f}, "
                        f"{f['delta_best_ci_high']:+.4f}] to the best earlier (step {row.best_step})")
    assert len(lines) == 4 and lines[3].startswith("3 evaluated")
    assert "alert:" not in result.stderr


# -- progress from the first second ---------------------------------------------------------------------

def test_progress_in_a_log_says_what_loads_and_moves_within_a_batch(cli, models, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPEVAL_PROGRESS_SECONDS", "0")  # every update a line (30 s in real logs)
    result = cli("run", "--checkpoint", models.sd, "--clip-model", models.clip, "--prompt-library", "smoke",
                 "--limit", "3", "--steps", "3", "--batch-size", "2", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert re.search(r"^clipeval: loading checkpoint .*sd \(4\.\d MB\) on cpu \.\.\.$", result.stderr, re.M)
    assert re.search(r"^clipeval: loading CLIP model .*clip \(\d+\.\d kB\) \.\.\.$", result.stderr, re.M)
    assert "clipeval: generating + scoring: 0/3 images to start with" in lines
    steps = [line for line in lines if "denoising step" in line]
    assert any(line.endswith("denoising step 1/3") for line in steps) and any(line.endswith("step 3/3") for line in steps)
    assert re.search(r"^clipeval: generating \+ scoring: 2/3 images \(67%\), \d+\.\d\d img/s, ETA \d+s", result.stderr, re.M)
    assert lines.index(next(line for line in lines if "loading checkpoint" in line)) < lines.index(steps[0])
    assert any(re.fullmatch(r"clipeval: generating \+ scoring: 3/3 images \(100%\), \d+\.\d\d img/s, ETA 0s", line)
               for line in lines)
    again = cli("run", "--checkpoint", models.sd, "--clip-model", models.clip, "--prompt-library", "smoke",
                "--limit", "3", "--steps", "3", "--batch-size", "2", "--out", tmp_path / "run")
    assert again.exit_code == 0 and "3/3 images to start with" in again.stderr
    assert "img/s" not in again.stderr  # nothing left to do: no rate of nothing
    quiet = cli("run", "--checkpoint", models.sd, "--clip-model", models.clip, "--prompt-library", "smoke",
                "--limit", "3", "--steps", "3", "--out", tmp_path / "quiet", "--quiet")
    assert "clipeval:" not in quiet.stderr


# -- small ones ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_prompts_into_a_closed_pipe_exits_0_quietly(tmp_path):
    library = tmp_path / "many.txt"
    library.write_text("".join(f"prompt number {i} of a long library\n" for i in range(20000)))
    done = subprocess.run(["bash", "-o", "pipefail", "-c",
                           f"{sys.executable} -c 'from clipeval.cli import entry; entry()' prompts {library} | head -1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "prompt_id,prompt,category,challenge\n" and done.stderr == ""


def test_a_comparison_where_every_prompt_ties_says_so(cli, run_tiny, tmp_path):
    run = tmp_path / "a"
    assert run_tiny(run, "--limit", "3").exit_code == 0
    result = cli("compare", run, run)
    assert result.exit_code == 0, result.stderr
    assert "n/a (all tied)" in result.stdout and "0.0%" not in result.stdout
    assert "no spread to measure" in result.stdout and "needs 2 prompts" not in result.stdout


def test_help_has_text_for_every_generation_option_and_compare_wraps(cli):
    text = " ".join(cli("run", "--help").stdout.split())
    for words in ("--images-per-prompt INTEGER RANGE Images per prompt, each from its own seed",
                  "--height INTEGER RANGE Image height in pixels", "--width INTEGER RANGE Image width in pixels"):
        assert words in text, words
    compare = cli("compare", "--help").stdout
    assert all(len(line) <= 100 for line in compare.splitlines())
    assert "delta lies below -margin; --fail-if-worse then exits 1." in " ".join(compare.split())


def test_the_mirror_error_says_what_the_mirror_lacks(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPEVAL_CACHE_DIR", str(tmp_path / "cache"))  # not a copy another test left cached
    monkeypatch.setenv("CLIPEVAL_LIBRARY_MIRROR", str(tmp_path / "mirror"))
    result = cli("prompts", "parti")
    assert_user_error(result, f"could not get PartiPrompts.tsv from CLIPEVAL_LIBRARY_MIRROR={tmp_path / 'mirror'}",
                      "put the file there")
    assert "offline? set" not in result.stderr


def test_score_with_a_table_lists_the_images_it_leaves_out(cli, run_tiny, models, tmp_path):
    run = tmp_path / "run"
    assert run_tiny(run, "--limit", "3").exit_code == 0
    table = tmp_path / "pairs.csv"
    table.write_text("image,prompt\n00000_00.png,a first prompt\n")
    result = cli("score", run / "images", "--prompts", table, "--clip-model", models.clip, "--out", tmp_path / "s", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "2 images the table leaves out: 00001_00.png, 00002_00.png" in result.stderr
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert "00001_00.png" in json.dumps(manifest)


def test_evaluate_takes_a_limit_and_dir_lists_the_api(models, tmp_path):
    import clipeval
    from diffusers import StableDiffusionPipeline

    assert {"evaluate", "run", "RunConfig", "ClipScorer", "load_library"} <= set(dir(clipeval))
    pipe = StableDiffusionPipeline.from_pretrained(models.sd)
    result = clipeval.evaluate(pipe, "smoke", clip=str(models.clip), steps=2, limit=2)
    assert result.summary["prompts"] == 2 and result.prompts["prompt_id"].tolist() == [0, 1]
    from clipeval.errors import ClipevalError

    with pytest.raises(ClipevalError, match="limit"):
        clipeval.evaluate(pipe, "smoke", clip=str(models.clip), steps=2, limit=0)
