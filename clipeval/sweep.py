"""``sweep``: evaluate every checkpoint of a training run that has not been evaluated yet, for cron.

Checkpoints are what the trainers write (``clipeval.layouts``): folders that load as one (a
pipeline, LoRA or LyCORIS weights, a fine-tuned unet/ or transformer/ over --base-model) and
per-step ``.safetensors`` files (kohya, ai-toolkit, OneTrainer), oldest step first, the training
folder's own final model last. Each is evaluated into RESULTS_DIR/<its name>/ with the same
settings; a finished one is not redone. A training folder with no checkpoint at all is an error:
a cron job that evaluates nothing must not pass.

- One sweep at a time per RESULTS_DIR (a flock, which dies with its process): the next cron tick
  while a slow sweep runs says so and exits 0, so no checkpoint is ever evaluated twice at once.
- A checkpoint still being written (a file modified in the last --settle seconds, a truncated
  .safetensors, a component of model_index.json missing) is skipped until a later tick.
- A checkpoint that fails is reported and the sweep goes on with the next; the exit code says so.
- ``history.csv`` (one row per evaluated checkpoint, by step) is rebuilt from the finished runs
  after each one, so it never holds a duplicate or a half row.
- Under a multi-process launcher, rank 0 alone holds the lock and plans; every rank evaluates.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clipeval.errors import ClipevalError

HISTORY_COLUMNS = ["step", "checkpoint", "clip_mean", "clip_mean_ci_low", "clip_mean_ci_high", "clip_std", "clip_median",
                   "clip_min", "clip_max", "images", "prompts", "flagged_images", "finished_at", "run",
                   "best_step", "delta_best", "delta_best_ci_low", "delta_best_ci_high", "p_best", "alert", "weights",
                   "prompts_used", "verdict", "metric"]


@dataclass
class SweepResult:
    evaluated: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name: why (still being written, ...)
    failed: dict[str, str] = field(default_factory=dict)  # name: error
    busy: str | None = None  # another sweep holds the results folder
    history: Path | None = None
    newest: dict[str, Any] | None = None  # history.csv's last row (the newest checkpoint), with its alert


def find_checkpoints(training_dir: Path) -> list:
    """The training folder's checkpoints (``layouts.Found``), oldest step first; none is an error."""
    from clipeval import layouts

    if not training_dir.is_dir():
        raise ClipevalError(f"{training_dir}: no such training output folder")
    found = layouts.find_checkpoints(training_dir)
    if not found:
        raise ClipevalError(
            f"{training_dir}: no checkpoint found (looked for checkpoint-N/ folders, diffusers pipelines, "
            "LoRA/LyCORIS files and folders, fine-tuned unet/ or transformer/ folders, and per-step .safetensors "
            "files as kohya, ai-toolkit and OneTrainer write them, in the folder and two levels below it)"
        )
    return found


def still_written(folder: Path, settle_s: float) -> str | None:
    """Why a checkpoint (a folder or a file) looks half-written, or None when it looks complete."""
    from clipeval.layouts import safetensors_complete

    files = [folder] if folder.is_file() else [p for p in folder.rglob("*") if p.is_file()]
    now = time.time()
    newest = max((p.stat().st_mtime for p in files), default=0)
    if now - newest < settle_s:
        return f"modified {now - newest:.0f} s ago (waiting {settle_s:g} s for writes to settle)"
    for path in files:
        if path.suffix == ".safetensors" and not safetensors_complete(path):
            return f"{path.relative_to(folder) if path != folder else path.name} is truncated"
    index = folder / "model_index.json"
    if index.is_file():
        try:
            components = json.loads(index.read_text(encoding="utf-8"))
        except ValueError:
            return "model_index.json is not valid JSON yet"
        for name, value in components.items():
            if not name.startswith("_") and isinstance(value, list) and value[0] is not None and not (folder / name).is_dir():
                return f"component {name}/ is missing"
    return None


@dataclass(frozen=True)
class Plan:
    """What a sweep will do, decided by rank 0 alone (it holds the lock and reads the results)
    and sent to the other ranks of a multi-process launch, which evaluate with it."""

    busy: str | None
    steps: dict[str, int | None]  # every checkpoint's name: its step
    up_to_date: list[str]
    todo: list  # layouts.Found: not evaluated yet, oldest step first


def sweep(training_dir: Path, results_dir: Path, base: Any, *, settle_s: float = 60.0, margin: float = 0.0,
          until_decided: bool = False, log=print) -> SweepResult | None:
    """``base`` is a ``RunConfig`` carrying the settings; its checkpoint and out are replaced.
    ``margin``: the alert rule's, as ``compare --fail-if-worse --margin``. ``until_decided``: each
    checkpoint is generated in the seeded order only until the confidence sequence decides it
    against the best earlier one (``clipeval.decide``), that one extended when it is too short.

    Under ``torchrun`` or ``accelerate launch`` rank 0 plans (it holds the lock, reads the finished
    runs and decides what to evaluate), every rank evaluates each checkpoint together, as ``run``
    does, and rank 0 writes the history and logs; the other ranks return None."""
    from clipeval import distributed, runner

    training_dir, results_dir = Path(training_dir).expanduser(), Path(results_dir).expanduser()
    ranks = distributed.ranks()
    result = SweepResult(history=results_dir / "history.csv")
    read: dict[str, Any] = {}  # rank 0: finished runs already read (and hashed) by this tick, once each
    held: list[int] = []  # rank 0: the lock's descriptor, kept for the whole sweep
    say = log if ranks.main else (lambda message: None)
    try:
        plan = ranks.on_main(lambda: _plan(training_dir, results_dir, read, held))
        result.up_to_date = plan.up_to_date
        if plan.busy:
            result.busy = plan.busy
            return result if ranks.main else None
        history = None  # written after each evaluated checkpoint; skipped and failed ones change nothing
        for checkpoint in plan.todo:
            name = checkpoint.name
            # Asked now, not when planning: one written meanwhile is settled once its turn comes.
            reason = ranks.on_main(lambda: still_written(checkpoint.path, settle_s))
            if reason:
                result.skipped[name] = reason
                say(f"skipping {name}: {reason}; it will be evaluated by a later sweep")
                continue
            if checkpoint.step is not None:
                say(f"evaluating {name} (step {checkpoint.step})")
            else:
                what = "the training folder's final model" if checkpoint.final else "no training step in its name, metadata or state file"
                say(f"evaluating {name} ({what}; it comes after every numbered step and has no step in history.csv)")
            trackers = base.trackers if ranks.main else None
            if trackers is not None and checkpoint.step is None and trackers.report_to != "none":
                say(f"note: {name} is not logged to {trackers.report_to}: it has no training step")
                trackers = None
            if trackers is not None:
                trackers = replace(trackers, step=checkpoint.step)
            try:
                # Before the GPU work, as run does; its verdict reaches every rank.
                ranks.on_main(lambda: trackers.check(str(checkpoint.path)) if trackers is not None else None)
                # Logged here, once its history row (and so clip/delta_best) exists, not by run.
                config = replace(base, checkpoint=str(checkpoint.path), out=results_dir / name, trackers=None)
                if until_decided:
                    evaluated = _decided(config, checkpoint, results_dir, plan.steps, margin, read, say)
                else:
                    evaluated = runner.run(config)
                if ranks.main:
                    history = write_history(results_dir, plan.steps, margin=margin, read=read, metric=base.metric)
                if trackers is not None and evaluated is not None:
                    row = history[history["run"] == name]
                    delta = None if row.empty or row.iloc[0]["alert"] == "" else float(row.iloc[0]["delta_best"])
                    key = "clip/delta_best" if base.metric is None else f"{history.iloc[0]['metric']}/delta_best"
                    log(trackers.log(evaluated, checkpoint=str(checkpoint.path), extra={key: delta}))
            except ClipevalError as err:
                result.failed[name] = str(err)
                say(f"{name} failed: {err}")
                continue
            result.evaluated.append(name)
        if not ranks.main:
            return None
        if history is None:  # nothing evaluated: still apply the rule (perhaps with another margin)
            history = write_history(results_dir, plan.steps, margin=margin, read=read, metric=base.metric)
        result.newest = history.iloc[-1].to_dict() if len(history) else None
        return result
    finally:
        for fd in held:
            os.close(fd)


def first_prefix(prompts: int) -> int:
    """How much of the seeded order a sweep's first checkpoint gets, with nothing to decide it
    against yet: later checkpoints extend it as far as their decisions need."""
    from clipeval.sequential import BURN_IN

    return min(prompts, max(2 * BURN_IN, -(-prompts // 8)))


def _decided(config, checkpoint, results_dir: Path, steps: dict, margin: float, read: dict, say):
    """Evaluate one checkpoint --until-decided against the best earlier one (the highest clip_mean at
    a smaller step, over what each generated), extending that one's prefix of the order while the
    decision needs prompts it lacks. The first checkpoint gets ``first_prefix`` of the order."""
    import pandas as pd

    from clipeval import decide, prompts, runner, sequential

    size = len(prompts.load_library(config.prompt_library).prompts)
    history = write_history(results_dir, steps, margin=margin, read=read, metric=config.metric)
    history = history[history["run"] != checkpoint.name]
    if checkpoint.step is not None:
        history = history[history["step"].notna() & (history["step"] < checkpoint.step)]
    if history.empty:
        return runner.run(replace(config, order_prefix=first_prefix(size)))
    best = history.loc[pd.to_numeric(history["clip_mean"]).idxmax()]
    baseline = results_dir / best["run"]
    while True:
        try:
            return runner.run(replace(config, until_decided=True, baseline=baseline, margin=margin))
        except decide.BaselineTooShort as short:
            fewest = sequential.fewest_prompts(size, margin, sequential.rule(config.sequence, bound=config.delta_bound))
            grow = min(size, max(2 * short.prompts, fewest or size))  # no decision comes sooner
            say(f"extending {best['run']} to {grow} prompts of the seeded order: {checkpoint.name} needs more of it "
                "to be decided")
            runner.run(replace(config, checkpoint=best["checkpoint"], out=baseline, order_prefix=grow))
            read.pop(best["run"], None)  # its files changed


def _plan(training_dir: Path, results_dir: Path, read: dict[str, Any], held: list[int]) -> Plan:
    """Take the results folder's lock (kept open in ``held``) and sort the checkpoints into
    evaluated and not yet; fills ``read`` with the finished runs."""
    from clipeval import store

    checkpoints = find_checkpoints(training_dir)
    store.check_parent(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    steps = {c.name: c.step for c in checkpoints}
    lock = os.open(results_dir / ".clipeval-sweep.lock", os.O_RDWR | os.O_CREAT, 0o644)
    held.append(lock)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(lock, 64, 0).decode(errors="replace").strip() or "?"
        return Plan(f"another sweep (pid {holder}) is working on {results_dir}; nothing to do", steps, [], [])
    os.ftruncate(lock, 0)
    os.pwrite(lock, str(os.getpid()).encode(), 0)
    up_to_date, todo = [], []
    for checkpoint in checkpoints:
        name = checkpoint.name
        record = _record(results_dir / name)
        if record is not None:
            read[name] = record
            up_to_date.append(name)
        else:
            todo.append(checkpoint)
    return Plan(None, steps, up_to_date, todo)


def _record(out: Path):
    """The run's result set when it is complete and whole; else None (the sweep evaluates it again)."""
    from clipeval.store import load_run

    try:
        return load_run(out)
    except ClipevalError:
        return None


def write_history(results_dir: Path, steps: dict[str, int | None], *, margin: float, read: dict[str, Any],
                  metric: str | None = None):
    """history.csv from every finished run in ``results_dir``: derived, so never a duplicate row.
    Each checkpoint is compared with the best earlier one (the highest clip_mean at a smaller step)
    exactly as ``clipeval compare BEST THIS`` does; ``alert`` is the ``--fail-if-worse --margin``
    rule. ``read``: records already read by the caller (folder name → RunRecord), filled with the
    ones read here, so a cron tick reads and hashes each finished run once. Returns the table as written."""
    import pandas as pd

    from clipeval.store import write_csv
    from clipeval.trackers import training_step

    from clipeval import metrics

    rows, records = [], {}
    for out in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        record = read[out.name] if out.name in read else _record(out)
        if record is not None:
            read[out.name] = record
        if record is None or record.summary is None:
            continue
        scorer = metrics.view(record.summary, record.settings, metric, out)[0]
        record = metrics.select(record, metric)  # every row of one scorer: compare refuses two
        summary, manifest = record.summary, record.manifest
        records[out.name] = record
        ci = summary.get("clip/mean_ci") or [None, None]
        step = steps.get(out.name, training_step(manifest.get("settings", {}).get("checkpoint", out.name)))
        rows.append({
            "step": step, "checkpoint": manifest.get("settings", {}).get("checkpoint"),
            "clip_mean": summary["clip/mean"], "clip_mean_ci_low": ci[0], "clip_mean_ci_high": ci[1],
            "clip_std": summary["clip/std"], "clip_median": summary["clip/median"], "clip_min": summary["clip/min"],
            "clip_max": summary["clip/max"], "images": summary["images"], "prompts": summary["prompts"],
            "flagged_images": sum((summary.get("flagged_images") or {}).values()),
            "finished_at": manifest.get("finished_at"), "run": out.name,
            "weights": (manifest.get("checkpoint") or {}).get("weights") or "",
            "prompts_used": (summary.get("sequential") or {}).get("prompts_used", summary["prompts"]),
            "verdict": (summary.get("sequential") or {}).get("verdict", ""),
            "metric": scorer,
        })
    frame = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    frame["step"] = frame["step"].astype("Int64")
    frame = frame.sort_values(["step", "run"], na_position="last", kind="stable").reset_index(drop=True)
    _against_best(frame, records, results_dir, margin)
    frame["prompts_used"] = frame["prompts_used"].astype("Int64")
    write_csv(results_dir / "history.csv", frame)
    return frame


SWEEP_WAY_OUT = "sweep into another --out to start a history of runs evaluated alike"


def _against_best(frame, records: dict, results_dir: Path, margin: float) -> None:
    """Fill the best_step ... alert columns in place (empty for the first checkpoint)."""
    import pandas as pd

    from clipeval.compare import RunScores, compare
    from clipeval.stats import usable

    frame["alert"] = frame["alert"].astype(object)
    for i in range(len(frame)):
        step = frame.at[i, "step"]
        earlier = frame.iloc[:i]  # rows are in step order; a checkpoint without a step comes last
        if not pd.isna(step):
            earlier = earlier[earlier["step"].notna() & (earlier["step"] < step)]
        if earlier.empty:
            frame.at[i, "alert"] = ""
            continue
        best = earlier.loc[earlier["clip_mean"].idxmax()]
        names = (best["run"], frame.at[i, "run"])
        runs = [RunScores(str(results_dir / n), records[n].path, records[n].settings, usable(records[n].scores))
                for n in names]
        try:
            result = compare(runs, margin=margin, way_out=SWEEP_WAY_OUT).runs[0]
        except ClipevalError as err:
            raise ClipevalError(f"{runs[0].path} and {runs[1].path} cannot be paired: {err}") from err
        ci = result.overall.delta_ci or (None, None)
        frame.loc[i, ["best_step", "delta_best", "delta_best_ci_low", "delta_best_ci_high", "p_best"]] = [
            best["step"], result.overall.delta, ci[0], ci[1], result.overall.p_value]
        worse = result.worse
        decided = (records[names[1]].summary or {}).get("sequential")
        if decided and decided.get("decided") and Path(decided["baseline"]).name == best["run"]:
            worse = decided["verdict"] == "worse"  # decided against this very run: the sequence's verdict is the rule
        frame.at[i, "alert"] = "true" if worse else "false"
    frame["best_step"] = frame["best_step"].astype("Int64")
