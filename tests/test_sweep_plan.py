"""What a sweep decides and says, with the evaluation itself replaced by a stand-in that writes a
finished run folder: which checkpoints it evaluates, in which order, into which folders, what
it skips and why, what a failure does to the rest, what reaches the trackers, and the lines a
cron log shows. (The stand-in is the only fake: history, pairing and alerts are the real code.)"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from test_compare import base_scores
from test_health import make_run

from clipeval.errors import ClipevalError

SHIFTS = {"checkpoint-100": 0.0, "checkpoint-200": 0.03, "checkpoint-300": -0.02, "checkpoint-400": 0.0, "final": 0.01,
          "my-model": 0.0}


@pytest.fixture
def stand_in(monkeypatch):
    """runner.run replaced: each call is recorded with the history.csv it found, and ``write(out,
    checkpoint)`` makes its run (by default the base scores shifted by SHIFTS[name]); a name in
    ``failing`` fails."""
    from clipeval import runner

    scores = base_scores(prompts=30)

    def write(out: Path, checkpoint: str) -> None:
        shifted = scores.assign(clip_score=(scores["clip_score"] + SHIFTS[out.name] + 0.002 * (scores["sample"] - 0.5)).round(8))
        make_run(out, shifted, checkpoint=checkpoint)

    state = SimpleNamespace(calls=[], failing=set(), write=write)

    def run(config):
        out = Path(config.out)
        history = out.parent / "history.csv"
        state.calls.append(SimpleNamespace(
            checkpoint=config.checkpoint, out=out, trackers=config.trackers, config=config,
            history=pd.read_csv(history, keep_default_na=False) if history.is_file() else None))
        if out.name in state.failing:
            raise ClipevalError("the unet would not load")
        state.write(out, config.checkpoint)
        from clipeval.store import load_run

        record = load_run(out)
        return SimpleNamespace(summary=record.summary, scores=record.scores, out=out)

    monkeypatch.setattr(runner, "run", run)
    return state


@pytest.fixture
def logged(monkeypatch) -> list:
    """What the sweep logs to its trackers, (step, checkpoint, extra, run folder) per call, instead of logging it;
    each call prints "logged step N"."""
    from clipeval import trackers

    calls: list = []
    monkeypatch.setattr(trackers, "_require", lambda target: None)
    monkeypatch.setattr(trackers.Tracking, "log", lambda self, result, *, checkpoint, extra=None: (
        calls.append((self.step, checkpoint, extra, result.out.name)) or f"logged step {self.step}"))
    return calls


def _pipeline(path: Path, age_s: float = 3600) -> Path:
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    old = time.time() - age_s
    for p in (path / "model_index.json", path):
        os.utime(p, (old, old))
    return path


def _sweep(cli, training, results, *extra):
    return cli("sweep", training, "--out", results, "--prompt-library", "smoke", *extra)


def test_the_library_sweep_as_a_training_loop_calls_it(stand_in, tmp_path):
    """sweep.sweep() with its defaults (the CLI always passes every option): a checkpoint written less
    than a minute ago waits for a later sweep, the alert is the whole interval below 0, each checkpoint
    is evaluated whole, and the result says what happened to each."""
    from clipeval import sweep
    from clipeval.runner import RunConfig

    training, results = tmp_path / "train", tmp_path / "results"
    for name in ("checkpoint-100", "checkpoint-200", "checkpoint-300"):
        _pipeline(training / name)
    _pipeline(training / "checkpoint-400", age_s=30)
    lines: list[str] = []
    base = RunConfig(checkpoint="", prompt_library="smoke", out=Path())
    old = os.umask(0o022)
    try:
        result = sweep.sweep(training, results, base, log=lines.append)
    finally:
        os.umask(old)
    assert stat.S_IMODE((results / ".clipeval-sweep.lock").stat().st_mode) == 0o644  # not executable
    assert result.evaluated == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    assert list(result.skipped) == ["checkpoint-400"]
    assert result.skipped["checkpoint-400"].endswith("s ago (waiting 60 s for writes to settle)")
    assert (result.failed, result.up_to_date, result.busy) == ({}, [], None)
    assert result.history == results / "history.csv" and result.history.is_file()
    assert result.newest["run"] == "checkpoint-300" and result.newest["best_step"] == 200
    assert (result.newest["verdict"], result.newest["prompts_used"]) == ("", 30)  # no sequential decision: whole runs
    assert str(result.newest["alert"]).lower() == "true"  # 0.05 below the best: the whole interval is below 0
    assert [(c.config.until_decided, c.config.order_prefix) for c in stand_in.calls] == [(False, None)] * 3
    assert lines[:3] == ["evaluating checkpoint-100 (step 100)", "evaluating checkpoint-200 (step 200)",
                         "evaluating checkpoint-300 (step 300)"]
    again = sweep.sweep(training, results, base, settle_s=10, log=lines.append)
    assert again.evaluated == ["checkpoint-400"] and again.up_to_date == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    assert again.newest["run"] == "checkpoint-400"
    _pipeline(training / "checkpoint-500")
    stand_in.failing.add("checkpoint-500")
    failed = sweep.sweep(training, results, base, log=lines.append)
    assert (failed.evaluated, failed.failed) == ([], {"checkpoint-500": "the unet would not load"})
    assert failed.newest["run"] == "checkpoint-400"  # the history is the finished runs'


def test_checkpoints_are_evaluated_in_step_order_each_into_its_folder(cli, stand_in, tmp_path):
    training, results = tmp_path / "train", tmp_path / "deep" / "results"  # --out's parents are made
    for name in ("checkpoint-300", "checkpoint-100", "checkpoint-200", "my-model"):
        _pipeline(training / name)
    (training / "model_index.json").write_text("{}")  # the training folder's own final model
    os.utime(training / "model_index.json", (time.time() - 3600,) * 2)
    stand_in.failing.add("checkpoint-200")
    result = _sweep(cli, training, results)
    assert result.exit_code == 2, result.stderr  # one checkpoint failed; the others were evaluated
    order = ["checkpoint-100", "checkpoint-200", "checkpoint-300", "my-model", "final"]
    assert [c.out for c in stand_in.calls] == [results / n for n in order]
    assert [c.checkpoint for c in stand_in.calls] == [str(training / n) for n in order[:4]] + [str(training)]
    assert all(c.trackers is None for c in stand_in.calls)  # the sweep logs, once the history row exists
    # history.csv is rebuilt after each evaluated checkpoint: each evaluation finds its predecessors' rows
    assert stand_in.calls[0].history is None
    assert stand_in.calls[2].history["run"].tolist() == ["checkpoint-100"]  # 200 failed and wrote nothing
    assert stand_in.calls[4].history["run"].tolist() == ["checkpoint-100", "checkpoint-300", "my-model"]
    assert result.stderr.splitlines() == [
        "evaluating checkpoint-100 (step 100)",
        "evaluating checkpoint-200 (step 200)",
        "checkpoint-200 failed: the unet would not load",
        "evaluating checkpoint-300 (step 300)",
        "evaluating my-model (no training step in its name, metadata or state file; it comes after every numbered "
        "step and has no step in history.csv)",
        "evaluating final (the training folder's final model; it comes after every numbered step and has no step "
        "in history.csv)",
    ]
    assert result.stdout.splitlines()[-1] == (f"4 evaluated, 0 up to date, 0 still being written, 1 failed → "
                                               f"{results / 'history.csv'}")
    history = pd.read_csv(results / "history.csv", keep_default_na=False)
    assert history["run"].tolist() == ["checkpoint-100", "checkpoint-300", "final", "my-model"]
    assert history["step"].tolist() == ["100", "300", "", ""]
    # The next tick evaluates what failed, and only that.
    stand_in.failing.clear()
    stand_in.calls.clear()
    again = _sweep(cli, training, results)
    assert again.exit_code == 0 and [c.out.name for c in stand_in.calls] == ["checkpoint-200"]
    assert again.stdout.splitlines()[-1].startswith("1 evaluated, 4 up to date, 0 still being written, 0 failed")
    assert pd.read_csv(results / "history.csv", keep_default_na=False)["run"].tolist()[:3] == [
        "checkpoint-100", "checkpoint-200", "checkpoint-300"]


def test_a_checkpoint_still_being_written_is_skipped_with_its_reason(cli, stand_in, tmp_path):
    training, results = tmp_path / "train", tmp_path / "results"
    _pipeline(training / "checkpoint-100")
    _pipeline(training / "checkpoint-200", age_s=0)
    _pipeline(training / "checkpoint-300")  # after the one being written: still evaluated this tick
    result = _sweep(cli, training, results, "--settle", "600")
    assert result.exit_code == 0
    assert [c.out.name for c in stand_in.calls] == ["checkpoint-100", "checkpoint-300"]
    skipped = result.stderr.splitlines()[1]
    assert skipped.startswith("skipping checkpoint-200: modified ") and skipped.endswith(
        " s ago (waiting 600 s for writes to settle); it will be evaluated by a later sweep")
    assert "2 evaluated, 0 up to date, 1 still being written, 0 failed" in result.stdout
    # Settled (or --settle 0): the next tick takes it.
    assert _sweep(cli, training, results, "--settle", "0").exit_code == 0
    assert [c.out.name for c in stand_in.calls] == ["checkpoint-100", "checkpoint-300", "checkpoint-200"]


def test_trackers_get_each_step_and_its_delta_to_the_best_earlier(cli, stand_in, logged, tmp_path, monkeypatch):
    from clipeval import trackers

    checked = []
    original = trackers.Tracking.check
    monkeypatch.setattr(trackers.Tracking, "check", lambda self, checkpoint: (checked.append((self.step, checkpoint)),
                                                                              original(self, checkpoint))[1])
    training, results = tmp_path / "train", tmp_path / "results"
    for name in ("checkpoint-100", "checkpoint-200", "checkpoint-300"):
        _pipeline(training / name)
    (training / "model_index.json").write_text("{}")
    os.utime(training / "model_index.json", (time.time() - 3600,) * 2)
    result = _sweep(cli, training, results, "--report-to", "tensorboard")
    assert result.exit_code == 0, result.stderr
    # Each checkpoint's run is given no tracker: the sweep logs it once, with its delta, not the run a second time.
    assert [c.trackers for c in stand_in.calls] == [None] * 4
    history = pd.read_csv(results / "history.csv", keep_default_na=False)
    assert [(s, c) for s, c, _, _ in logged] == [(n, str(training / f"checkpoint-{n}")) for n in (100, 200, 300)]
    assert checked == [(n, str(training / f"checkpoint-{n}")) for n in (100, 200, 300)]  # before each evaluation
    assert logged[0][2] == {"clip/delta_best": None}  # the first has nothing earlier
    for (_, _, extra, name), (_, row) in zip(logged[1:], history.iloc[1:3].iterrows()):
        assert row["run"] == name and extra == {"clip/delta_best": float(row["delta_best"])}
    assert logged[2][2]["clip/delta_best"] == pytest.approx(-0.05, abs=0.003)  # 300 against 200, the best
    assert "note: final is not logged to tensorboard: it has no training step" in result.stderr.splitlines()
    assert "logged step 300" in result.stderr.splitlines()


def test_the_lock_names_its_holder_and_a_finished_sweep_leaves_its_pid(cli, stand_in, tmp_path):
    import fcntl

    from clipeval import sweep
    from clipeval.runner import RunConfig

    training, results = tmp_path / "train", tmp_path / "results"
    _pipeline(training / "checkpoint-100")
    results.mkdir()
    (results / ".clipeval-sweep.lock").write_text("99999999999 (a longer, older pid)")
    assert _sweep(cli, training, results).exit_code == 0
    assert (results / ".clipeval-sweep.lock").read_text() == str(os.getpid())  # rewritten whole, not overlaid
    with open(results / ".clipeval-sweep.lock", "r+") as lock:
        lock.seek(0)
        lock.truncate()
        lock.write("4242")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _pipeline(training / "checkpoint-200")
        busy = _sweep(cli, training, results)
        lock.truncate(0)  # caught between the holder's truncation and its pid's write
        unnamed = sweep.sweep(training, results, RunConfig(checkpoint="", prompt_library="smoke", out=Path()),
                              log=lambda line: None)
    assert busy.exit_code == 0 and busy.stdout == f"another sweep (pid 4242) is working on {results}; nothing to do\n"
    assert unnamed.busy == f"another sweep (pid ?) is working on {results}; nothing to do"
    assert (unnamed.evaluated, unnamed.up_to_date, unnamed.skipped, unnamed.failed, unnamed.newest) == ([], [], {}, {}, None)
    assert len(stand_in.calls) == 1  # nothing evaluated while another sweep held the folder


def test_history_takes_the_step_of_a_run_whose_checkpoint_is_gone(cli, stand_in, tmp_path):
    """A results folder may hold runs of checkpoints the trainer has since deleted (save_total_limit):
    they keep their row, with the step read from the checkpoint path in their manifest."""
    from clipeval import stats, store
    from test_compare import SETTINGS

    training, results = tmp_path / "train", tmp_path / "results"
    _pipeline(training / "checkpoint-300")
    scores = base_scores(prompts=30).assign(flag="")
    scores.loc[[3, 7], "flag"] = ["nsfw", "black"]
    (results / "old-run").mkdir(parents=True)
    store.write_results(results / "old-run", scores=scores, prompts=stats.prompts_table(scores),
                        summary=stats.summarize(scores),
                        manifest={"status": "complete", "finished_at": "2026-12-01T10:00:00+00:00",
                                  "checkpoint": {"weights": "ema"},
                                  "settings": {**SETTINGS, "checkpoint": str(training / "checkpoint-100")}})
    assert _sweep(cli, training, results).exit_code == 0
    history = pd.read_csv(results / "history.csv", keep_default_na=False)
    assert history[["step", "run", "best_step"]].values.tolist() == [[100, "old-run", ""], [300, "checkpoint-300", "100"]]
    summary = json.loads((results / "old-run" / "summary.json").read_text())
    assert [history.iloc[0]["clip_mean_ci_low"], history.iloc[0]["clip_mean_ci_high"]] == summary["clip/mean_ci"]
    assert history.iloc[0]["checkpoint"] == str(training / "checkpoint-100")
    row = history.iloc[0]
    assert [row[c] for c in ("clip_mean", "clip_std", "clip_median", "clip_min", "clip_max")] == [
        summary[k] for k in ("clip/mean", "clip/std", "clip/median", "clip/min", "clip/max")]
    assert (row["images"], row["prompts"], row["flagged_images"]) == (58, 30, 2)
    assert (row["finished_at"], row["weights"], history.iloc[1]["weights"]) == ("2026-12-01T10:00:00+00:00", "ema", "")


@pytest.mark.parametrize("make, message", [
    (lambda t: None, "{t}: no such training output folder"),
    (lambda t: (t / "notes").mkdir(parents=True), "{t}: no checkpoint found (looked for checkpoint-N/ folders, diffusers "
     "pipelines, LoRA/LyCORIS files and folders, fine-tuned unet/ or transformer/ folders, and per-step .safetensors "
     "files as kohya, ai-toolkit and OneTrainer write them, in the folder and two levels below it)"),
])
def test_a_training_folder_with_nothing_to_evaluate_fails(cli, stand_in, tmp_path, make, message):
    training = tmp_path / "train"
    make(training)
    result = _sweep(cli, training, tmp_path / "results")
    assert result.exit_code == 2 and result.stderr == f"clipeval: error: {message.format(t=training)}\n"
    assert stand_in.calls == []


def test_history_carries_a_sequential_verdict_and_its_alert(cli, stand_in, tmp_path):
    """A run stopped by --until-decided against the best earlier run: history.csv takes its prompts used
    and verdict, and its alert follows the verdict (here against a fixed-size interval that says
    nothing), but only where it was decided against that very run."""
    from clipeval import stats, store
    from test_compare import SETTINGS

    training, results = tmp_path / "train", tmp_path / "results"
    scores = base_scores(prompts=30).assign(flag="")
    for step in (100, 200, 300):
        _pipeline(training / f"checkpoint-{step}")
    for step, against, verdict in ((100, None, None), (200, "checkpoint-100", "worse"), (300, "elsewhere", "worse")):
        summary = stats.summarize(scores)
        if against:
            summary["sequential"] = {"decided": True, "verdict": verdict, "prompts_used": 17,
                                     "baseline": str(results / against)}
        (results / f"checkpoint-{step}").mkdir(parents=True)
        store.write_results(results / f"checkpoint-{step}", scores=scores, prompts=stats.prompts_table(scores),
                            summary=summary, manifest={"status": "complete", "settings": {
                                **SETTINGS, "checkpoint": str(training / f"checkpoint-{step}")}})
    assert _sweep(cli, training, results).exit_code == 0
    history = pd.read_csv(results / "history.csv", keep_default_na=False)
    assert history["prompts_used"].tolist() == [30, 17, 17]  # a fixed-size run used all its prompts
    assert history["verdict"].tolist() == ["", "worse", "worse"]
    # 200 was decided worse against 100, its best earlier: alert. 300's verdict was against another run:
    # the fixed-size rule (identical scores, no alert) stands.
    assert history["alert"].tolist() == ["", "true", "false"]


def test_history_csv_is_exactly_its_documented_columns_in_step_order(cli, stand_in, tmp_path):
    """The file a user plots: the documented header and nothing else (no index column), steps in
    order with the stepless checkpoint last, integers written as integers, empty where undefined."""
    from clipeval.sweep import HISTORY_COLUMNS

    training, results = tmp_path / "train", tmp_path / "results"
    for name in ("checkpoint-300", "checkpoint-100", "my-model"):
        _pipeline(training / name)
    assert _sweep(cli, training, results).exit_code == 0
    text = (results / "history.csv").read_text()
    lines = text.splitlines()
    assert lines[0] == ",".join(HISTORY_COLUMNS)
    history = pd.read_csv(results / "history.csv", keep_default_na=False, dtype=str)
    assert history["run"].tolist() == ["checkpoint-100", "checkpoint-300", "my-model"]
    assert history["step"].tolist() == ["100", "300", ""] and history["best_step"].tolist() == ["", "100", "100"]
    assert history["prompts_used"].tolist() == ["30", "30", "30"] and history["verdict"].tolist() == ["", "", ""]
    assert history["alert"].tolist() == ["", "true", "false"]  # 300 is 0.02 below 100; my-model equals it


def test_still_written_says_why_a_checkpoint_looks_half_written(tmp_path):
    import safetensors.torch
    import torch

    from clipeval.sweep import still_written

    def aged(path: Path, seconds: float) -> Path:
        for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
            os.utime(p, (time.time() - seconds, time.time() - seconds))
        return path

    assert still_written(_pipeline(tmp_path / "empty-pipeline"), 60) is None
    (tmp_path / "nothing").mkdir()
    assert still_written(tmp_path / "nothing", 60) is None  # an empty folder has no recent write
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "model_index.json").write_text("{}")
    aged(fresh, 5)
    assert still_written(fresh, 60) in [f"modified {s} s ago (waiting 60 s for writes to settle)" for s in (5, 6, 7)]
    assert still_written(fresh, 2.5) is None
    # A truncated safetensors file, alone or inside a folder.
    whole = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(64, 64)}, whole)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:-100])
    assert still_written(aged(whole, 120), 60) is None
    assert still_written(aged(cut, 120), 60) == "cut.safetensors is truncated"
    pipe = _pipeline(tmp_path / "pipe")
    (pipe / "unet").mkdir()
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(cut.read_bytes())
    assert still_written(aged(pipe, 120), 60) == "unet/diffusion_pytorch_model.safetensors is truncated"
    # model_index.json being written, or naming a component folder not there yet (a null one is not expected).
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(whole.read_bytes())
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diff')
    assert still_written(aged(pipe, 120), 60) == "model_index.json is not valid JSON yet"
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1", "safety_checker": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    assert still_written(aged(pipe, 120), 60) == "component vae/ is missing"
    (pipe / "vae").mkdir()
    assert still_written(aged(pipe, 120), 60) is None
    # diffusers loads no key that starts with "_" as a component, whatever it holds: nothing is missing.
    index = json.loads((pipe / "model_index.json").read_text())
    (pipe / "model_index.json").write_text(json.dumps({**index, "_ignore_files": ["unet/model.bin"]}))
    assert still_written(aged(pipe, 120), 60) is None


def test_until_decided_runs_against_the_best_earlier_and_extends_it_when_too_short(cli, stand_in, tmp_path, monkeypatch):
    """The first checkpoint gets first_prefix of the seeded order; each later one is decided against
    the best earlier run (here not the previous one), which is extended (to twice what it held, at
    least the burn-in, at most the library) when the decision needs more of the order."""
    from clipeval import decide, runner

    monkeypatch.setitem(SHIFTS, "checkpoint-400", 0.01)
    monkeypatch.setitem(SHIFTS, "checkpoint-200", SHIFTS["checkpoint-200"])  # restored after the extension moves it
    library = tmp_path / "thousand.txt"
    library.write_text("".join(f"prompt number {i}\n" for i in range(1000)))
    training, results = tmp_path / "train", tmp_path / "results"
    for step in (100, 200, 300, 400):
        _pipeline(training / f"checkpoint-{step}")
    configs, stand = [], runner.run
    too_short = {"checkpoint-400": [60, 30]}  # the best earlier run is 30 prompts long, then (extended) 60

    def run(config):
        configs.append(config)
        waiting = too_short.get(Path(config.out).name)
        if config.until_decided and waiting:
            raise decide.BaselineTooShort("the baseline is too short", waiting.pop())
        if Path(config.out).exists():  # an extension: the stand-in writes its folder anew, with other scores
            import shutil

            shutil.rmtree(config.out)
            SHIFTS[Path(config.out).name] += 0.005
        return stand(config)

    monkeypatch.setattr(runner, "run", run)
    result = cli("sweep", training, "--out", results, "--prompt-library", library, "--until-decided",
                 "--alert-if-worse", "0.01")
    assert result.exit_code == 1, result.stderr  # the newest, 400, is 0.03 below 200 (its best earlier, twice extended): alert
    calls = [(Path(c.out).name, Path(c.checkpoint).name, c.until_decided, c.baseline and Path(c.baseline).name,
              c.order_prefix, c.margin) for c in configs]
    assert calls == [
        ("checkpoint-100", "checkpoint-100", False, None, 125, 0.005),  # first_prefix(1000) = 1000 / 8
        ("checkpoint-200", "checkpoint-200", True, "checkpoint-100", None, 0.01),
        ("checkpoint-300", "checkpoint-300", True, "checkpoint-200", None, 0.01),
        ("checkpoint-400", "checkpoint-400", True, "checkpoint-200", None, 0.01),  # the best, not the previous
        ("checkpoint-200", "checkpoint-200", False, None, 60, 0.005),  # extended to 2 x 30 prompts
        ("checkpoint-400", "checkpoint-400", True, "checkpoint-200", None, 0.01),
        ("checkpoint-200", "checkpoint-200", False, None, 120, 0.005),  # and again, to 2 x 60
        ("checkpoint-400", "checkpoint-400", True, "checkpoint-200", None, 0.01),
    ]
    for prompts in (60, 120):
        assert (f"extending checkpoint-200 to {prompts} prompts of the seeded order: checkpoint-400 needs more of it "
                "to be decided") in result.stderr
    # history.csv reads the extended run anew, not what the sweep had read of it before.
    history = pd.read_csv(results / "history.csv", keep_default_na=False)
    extended = json.loads((results / "checkpoint-200" / "summary.json").read_text())["clip/mean"]
    assert history.loc[history["run"] == "checkpoint-200", "clip_mean"].item() == extended


@pytest.mark.parametrize("prompts, prefix", [(30, 30), (100, 100), (101, 100), (800, 100), (801, 101), (1632, 204)])
def test_the_first_checkpoint_gets_an_eighth_of_the_order_and_at_least_twice_the_burn_in(prompts, prefix):
    from clipeval.sweep import first_prefix

    assert first_prefix(prompts) == prefix


def _two_scorer_run(path, scores, clip_shift: float, vqa_shift: float, checkpoint: str):
    """A finished run folder scored by CLIP (primary) and a VQA scorer, as run --scorer writes one."""
    from clipeval import metrics, store
    from test_compare import SETTINGS

    path.mkdir(parents=True)
    scores = scores.assign(clip_score=(scores["clip_score"] + clip_shift).round(8), flag="",
                           **{"score:vqa": (0.6 + scores["clip_score"] - 0.3 + vqa_shift).round(8),
                              "truncated:vqa": False})
    cols = [metrics.ScoreColumn("clip", "/models/clip", "clip", True), metrics.ScoreColumn("vqa", "/models/vqa", "vqa", False)]
    summary = metrics.summarize(scores, cols, [("cosine", "cosine"), ("vqa", "probability")])
    store.write_results(path, scores=scores, prompts=metrics.prompts_table(scores, cols), summary=summary,
                        manifest={"status": "complete", "settings": {**SETTINGS, "clip_model": "/models/clip",
                                                                      "checkpoint": checkpoint}})


def test_the_history_and_its_alert_follow_the_chosen_metric(cli, stand_in, tmp_path):
    """By CLIP the newest checkpoint got worse, by VQAScore better: --metric decides which the history
    and the alert are of. Folders that are not finished runs are passed over."""
    training, results = tmp_path / "train", tmp_path / "results"
    scores = base_scores(prompts=30)
    for step, clip, vqa in ((100, 0.0, 0.0), (200, 0.02, -0.01), (300, -0.02, 0.03)):
        _pipeline(training / f"checkpoint-{step}")
        _two_scorer_run(results / f"checkpoint-{step}", scores, clip, vqa, str(training / f"checkpoint-{step}"))
    (results / "logs").mkdir()  # a tracker's folder: not a run
    (results / "checkpoint-150").mkdir()  # a run that never finished: no result files
    by_vqa = _sweep(cli, training, results, "--metric", "vqa", "--alert-if-worse", "0.005")
    assert by_vqa.exit_code == 0, by_vqa.stderr  # by VQAScore the newest is the best yet
    history = pd.read_csv(results / "history.csv", keep_default_na=False)
    assert history["run"].tolist() == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    assert history["metric"].tolist() == ["vqa"] * 3
    for _, row in history.iterrows():
        assert row["clip_mean"] == json.loads((results / row["run"] / "summary.json").read_text())["scorers"]["vqa"]["mean"]
    assert history["best_step"].tolist() == ["", "100", "100"] and history["alert"].tolist() == ["", "true", "false"]
    by_clip = _sweep(cli, training, results, "--alert-if-worse", "0.005")
    assert by_clip.exit_code == 1, by_clip.stderr  # by CLIP it is 0.04 below step 200: the alert
    history = pd.read_csv(results / "history.csv", keep_default_na=False)
    assert history["metric"].tolist() == ["clip"] * 3 and history["alert"].tolist() == ["", "false", "true"]
    assert history["best_step"].tolist() == ["", "100", "200"]
    missing = _sweep(cli, training, results, "--metric", "pick")
    first = results / "checkpoint-100"  # the run that lacks it is named, with the way to add the scorer
    assert missing.exit_code == 2 and missing.stderr == (
        f"clipeval: error: {first} has no scorer 'pick' (it has clip, vqa): re-score it with "
        f"'clipeval score {first} --out NEW --scorer pick'\n")


def test_a_run_left_unfinished_by_an_earlier_tick_is_in_the_history_once_finished(cli, stand_in, tmp_path, monkeypatch):
    """Both checkpoints' folders were left half-done by a killed sweep; this tick finishes both, and the
    history written after the second holds it (what was read of it while unfinished is not kept)."""
    import shutil

    from clipeval import runner

    training, results = tmp_path / "train", tmp_path / "results"
    for name in ("checkpoint-100", "checkpoint-200"):
        _pipeline(training / name)
        (results / name / ".clipeval").mkdir(parents=True)
        (results / name / ".clipeval" / "run.json").write_text('{"status": "running"}')
    stand = runner.run

    def run(config):
        shutil.rmtree(config.out)  # the stand-in writes its folder anew (a real run resumes it)
        return stand(config)

    monkeypatch.setattr(runner, "run", run)
    assert _sweep(cli, training, results).exit_code == 0
    assert pd.read_csv(results / "history.csv", keep_default_na=False)["run"].tolist() == ["checkpoint-100", "checkpoint-200"]


def test_a_rank_other_than_0_evaluates_what_rank_0_planned_and_says_writes_and_logs_nothing(stand_in, logged, tmp_path,
                                                                                             monkeypatch):
    """Under torchrun every rank evaluates each checkpoint together; rank 0 alone speaks, writes
    history.csv, logs to the trackers and returns the result, also when another sweep holds the folder."""
    import fcntl

    from clipeval import distributed, sweep, trackers
    from clipeval.runner import RunConfig

    class SecondRank(distributed.Ranks):
        def on_main(self, fn):  # what rank 0 would broadcast: the same plan and answers, computed here
            return fn()

    monkeypatch.setattr(distributed, "ranks", lambda: SecondRank(rank=1, world=2))
    training, results = tmp_path / "train", tmp_path / "results"
    for name in ("checkpoint-100", "checkpoint-200"):
        _pipeline(training / name)
    lines: list[str] = []
    base = RunConfig(checkpoint="", prompt_library="smoke", out=Path(),
                     trackers=trackers.Tracking("tensorboard", tmp_path / "logs"))
    assert sweep.sweep(training, results, base, log=lines.append) is None
    assert [c.out.name for c in stand_in.calls] == ["checkpoint-100", "checkpoint-200"]  # it did its share
    assert (lines, logged, (results / "history.csv").exists()) == ([], [], False)
    _pipeline(training / "checkpoint-300")
    with open(results / ".clipeval-sweep.lock", "r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert sweep.sweep(training, results, base, log=lines.append) is None  # busy: rank 0 says so, not this one
    assert len(stand_in.calls) == 2 and lines == []


def test_a_stepless_checkpoint_is_noted_only_where_a_tracker_would_log(cli, stand_in, tmp_path):
    """--scale percent without --report-to logs nowhere: the final model's "not logged" note would be noise."""
    training, results = tmp_path / "train", tmp_path / "results"
    _pipeline(training / "checkpoint-100")
    (training / "model_index.json").write_text("{}")
    os.utime(training / "model_index.json", (time.time() - 3600,) * 2)
    result = _sweep(cli, training, results, "--scale", "percent")
    assert result.exit_code == 0, result.stderr
    assert [c.out.name for c in stand_in.calls] == ["checkpoint-100", "final"]
    assert not [line for line in result.stderr.splitlines() if line.startswith("note:")]


VQA_SHIFTS = {"checkpoint-100": 0.0, "checkpoint-200": -0.01, "checkpoint-300": 0.03}


@pytest.fixture
def two_scorer_stand_in(stand_in):
    """The stand-in writing runs scored by CLIP (shifted by SHIFTS[name]) and a VQA scorer (by VQA_SHIFTS[name]):
    by CLIP checkpoint-300 is worse than 200, by VQA it is the best."""
    scores = base_scores(prompts=30)
    stand_in.write = lambda out, checkpoint: _two_scorer_run(out, scores, SHIFTS[out.name], VQA_SHIFTS[out.name],
                                                             checkpoint)
    return stand_in


def test_the_history_written_after_each_evaluation_and_the_trackers_follow_the_chosen_metric(
        cli, two_scorer_stand_in, logged, tmp_path):
    training, results = tmp_path / "train", tmp_path / "results"
    for step in (100, 200, 300):
        _pipeline(training / f"checkpoint-{step}")
    result = _sweep(cli, training, results, "--metric", "vqa", "--alert-if-worse", "0.005", "--report-to", "tensorboard")
    assert result.exit_code == 0, result.stderr  # by CLIP the newest is 0.05 below step 200: that would alert
    history = pd.read_csv(results / "history.csv", keep_default_na=False)
    assert history["metric"].tolist() == ["vqa"] * 3 and history["best_step"].tolist() == ["", "100", "100"]
    assert history["alert"].tolist() == ["", "true", "false"]
    assert [step for step, _, _, _ in logged] == [100, 200, 300]
    extras = [extra for _, _, extra, _ in logged]
    assert [list(extra) for extra in extras] == [["vqa/delta_best"]] * 3
    assert extras[0]["vqa/delta_best"] is None
    assert extras[2]["vqa/delta_best"] == pytest.approx(float(history.iloc[2]["delta_best"]))
    assert extras[2]["vqa/delta_best"] == pytest.approx(0.03, abs=0.003)  # against 100, the best by VQA


def test_until_decided_decides_against_the_best_earlier_by_the_chosen_metric_at_a_smaller_step(
        cli, two_scorer_stand_in, tmp_path):
    """checkpoint-200 was still being written when 300 was evaluated, and the trainer was restarted once:
    old-run is another checkpoint saved at step 200. Evaluated now, 200 is decided against the best run
    at a *smaller* step by the chosen metric: 100 (not 300, later; not old-run, the same step), as is its
    history row."""
    training, results = tmp_path / "train", tmp_path / "results"
    scores = base_scores(prompts=30)
    for step in (100, 200, 300):
        _pipeline(training / f"checkpoint-{step}")
    # Finished runs: by VQA, 100 is the best before step 200 and 100b the worst; by CLIP, 100b is the best.
    for name, clip, vqa, step in (("checkpoint-100", 0.0, 0.0, 100), ("checkpoint-100b", 0.04, -0.04, 100),
                                  ("old-run", 0.05, 0.05, 200), ("checkpoint-300", 0.03, 0.05, 300)):
        _two_scorer_run(results / name, scores, clip, vqa, str(tmp_path / "gone" / f"checkpoint-{step}"))
    result = _sweep(cli, training, results, "--until-decided", "--metric", "vqa", "--alert-if-worse", "0.01")
    assert result.exit_code == 0, result.stderr  # the newest, 300, ties old-run, its best earlier
    [call] = two_scorer_stand_in.calls
    assert (call.out.name, call.config.until_decided, Path(call.config.baseline).name) == (
        "checkpoint-200", True, "checkpoint-100")
    history = pd.read_csv(results / "history.csv", keep_default_na=False)
    assert history.loc[history["run"] == "checkpoint-200", "best_step"].item() == "100"


@pytest.mark.parametrize("outcome", ["failed", "still being written"])
def test_a_sweep_that_finished_no_checkpoint_has_no_newest_row(cli, stand_in, tmp_path, outcome):
    """The only checkpoint failed (exit 2) or is still being written (exit 0, a later tick takes it):
    history.csv is its header alone, and the summary line says so without a traceback."""
    from clipeval.sweep import HISTORY_COLUMNS

    training, results = tmp_path / "train", tmp_path / "results"
    _pipeline(training / "checkpoint-100", age_s=3600 if outcome == "failed" else 0)
    stand_in.failing.add("checkpoint-100")
    result = _sweep(cli, training, results, "--alert-if-worse", "0.01")
    assert result.exit_code == (2 if outcome == "failed" else 0), result.stderr
    assert result.stdout == (f"0 evaluated, 0 up to date, {int(outcome != 'failed')} still being written, "
                             f"{int(outcome == 'failed')} failed → {results / 'history.csv'}\n")
    assert (results / "history.csv").read_text() == ",".join(HISTORY_COLUMNS) + "\n"


@pytest.mark.parametrize("manifest_settings", ["without a checkpoint", "none"])
def test_a_run_whose_manifest_lacks_its_checkpoint_takes_the_step_of_its_folder(cli, stand_in, tmp_path, manifest_settings):
    """A finished run written by hand or by another tool, its manifest without the checkpoint setting
    (or without settings): its row's step comes from its folder's name, its checkpoint cell is empty."""
    from clipeval import stats, store
    from test_compare import SETTINGS

    training, results = tmp_path / "train", tmp_path / "results"
    _pipeline(training / "checkpoint-500")
    scores = base_scores(prompts=30).assign(flag="")
    settings = {k: v for k, v in SETTINGS.items() if k != "checkpoint"}
    names = ["checkpoint-500", "checkpoint-700"] if manifest_settings != "none" else ["checkpoint-500"]
    for name in names:  # checkpoint-700 is gone from the training folder
        (results / name).mkdir(parents=True)
        manifest = {"status": "complete", **({"settings": settings} if manifest_settings != "none" else {})}
        store.write_results(results / name, scores=scores, prompts=stats.prompts_table(scores),
                            summary=stats.summarize(scores), manifest=manifest)
    result = _sweep(cli, training, results)
    assert result.exit_code == 0, result.stderr
    assert stand_in.calls == []  # up to date
    history = pd.read_csv(results / "history.csv", keep_default_na=False, dtype=str)
    assert history[["step", "checkpoint", "run"]].values.tolist() == [[n.split("-")[1], "", n] for n in names]
