"""Logging a run to TensorBoard or Weights & Biases at the checkpoint's training step, so the CLIP
score curve sits beside the loss curve.

Logged: ``clip/mean``, ``clip/min``, ``clip/max``, ``clip/std``, ``clip/median`` (of the primary
scorer), ``LABEL/mean`` ... for each other scorer of the run, one ``clip/category/<name>`` per category, the histogram of image scores, and one image of the best
four and worst four images. Logging a step that is already there does nothing (TensorBoard: read
back from the event files; wandb: a small ledger next to its files), so a rerun from cron never
draws the same point twice. Both are optional extras with a one-line error when missing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipeval.errors import ClipevalError
from clipeval.layouts import STATE_FILES, training_step  # noqa: F401 - also trackers' API

TRACKERS = ("tensorboard", "wandb", "none")
GRID_TILE = 192


def parse_report_to(value: str, where: str = "--report-to") -> str:
    """``tensorboard``, ``wandb``, a comma list of both, ``all`` (those installed, as accelerate
    reads it) or ``none``; returned as the comma list clipeval logs to."""
    names = [n.strip().lower() for n in str(value).split(",") if n.strip()]
    if names in ([], ["none"]):
        return "none"
    if names == ["all"]:
        installed = [t for t in TRACKERS[:-1] if _installed(t)]
        if not installed:
            raise ClipevalError(f"{where} all: neither tensorboard nor wandb is installed: pip install 'clipeval[tensorboard]'")
        return ",".join(installed)
    unknown = [n for n in names if n not in TRACKERS[:-1]]
    if unknown:
        raise ClipevalError(f"{where} {unknown[0]!r}: clipeval logs to tensorboard, wandb (or both, comma-separated), all or none")
    return ",".join(dict.fromkeys(names))


def _installed(tracker: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(tracker) is not None


@dataclass
class Tracking:
    report_to: str  # "tensorboard", "wandb", "tensorboard,wandb" or "none"
    logging_dir: Path
    project: str = "clipeval"
    run_name: str | None = None
    step: int | None = None
    scale: str = "cosine"  # "percent": SimpleTuner's 100 x cosine, with its statistics

    @property
    def targets(self) -> list[str]:
        return [] if self.report_to == "none" else self.report_to.split(",")

    def check(self, checkpoint: str) -> None:
        """Before any GPU work: the extra is installed and the step is known."""
        self.report_to = parse_report_to(self.report_to)
        if self.scale not in ("cosine", "percent"):
            raise ClipevalError(f"--scale {self.scale}: use cosine or percent")
        if not self.targets:
            return
        for target in self.targets:
            _require(target)
        if self.step is None:
            self.step = training_step(checkpoint)
        if self.step is None:
            raise ClipevalError(
                f"--report-to {self.report_to}: no training step for {checkpoint} (not in its name, e.g. "
                f"checkpoint-1500 or NAME-step00001500, nor in its metadata or {' or '.join(STATE_FILES)}); pass --step"
            )

    def values(self, summary: dict[str, Any], scores=None) -> dict[str, float]:
        """The scalars logged. In percent, ``clip/mean``, ``min``, ``max`` and ``std`` are
        SimpleTuner's own statistics (``simpletuner_statistics``) when the per-image ``scores`` are
        given, so the curves overlay its dashboard; the median and categories are 100 x clipeval's."""
        factor = 100.0 if self.scale == "percent" else 1.0
        scalars = {k: summary[k] * factor for k in ("clip/mean", "clip/min", "clip/max", "clip/std", "clip/median")
                   if summary.get(k) is not None}
        if self.scale == "percent" and scores is not None:
            scalars.update(simpletuner_statistics(scores))
        for name, group in summary.get("by_category", {}).items():
            scalars[f"clip/category/{name}"] = group["mean"] * factor
        for name, block in (summary.get("scorers") or {}).items():  # the run's other scorers, by label
            if block.get("column") != "clip_score":
                scalars.update({f"{name}/{k}": block[k] * factor for k in ("mean", "min", "max", "std", "median")
                                if block.get(k) is not None})
        decided = summary.get("sequential")
        if decided:  # --until-decided: what it took, and the verdict as -1 worse, +1 better, 0 otherwise
            scalars["clip/sequential_prompts"] = float(decided["prompts_used"])
            scalars["clip/sequential_verdict"] = {"worse": -1.0, "better": 1.0}.get(decided["verdict"], 0.0)
        return scalars

    def log(self, result, *, checkpoint: str, extra: dict[str, float] | None = None) -> str:
        """``extra``: more scalars in cosine (the sweep's clip/delta_best), scaled like the others."""
        if self.report_to == "none":
            return "not logged (--report-to none)"
        self.check(checkpoint)
        scalars = self.values(result.summary, result.scores)
        factor = 100.0 if self.scale == "percent" else 1.0
        scalars.update({k: v * factor for k, v in (extra or {}).items() if v is not None and v == v})
        usable = result.scores[(result.scores["flag"] == "") & result.scores["clip_score"].notna()]
        scores = usable["clip_score"].to_numpy() * factor
        grid = best_and_worst(usable, result.out)
        said = []
        for target in self.targets:
            writer = self._tensorboard if target == "tensorboard" else self._wandb
            said.append(writer(scalars, scores, grid))
        return "; ".join(said)

    @property
    def name(self) -> str:
        return self.run_name or "clipeval"

    def _tensorboard(self, scalars, scores, grid) -> str:
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(self.logging_dir).expanduser() / self.name
        if self.step in logged_steps(folder):
            return f"step {self.step} is already in {folder}; not logged again"
        writer = SummaryWriter(log_dir=str(folder))
        try:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, self.step)
            writer.add_histogram("clip/scores", scores, self.step)
            if grid is not None:
                writer.add_image("clip/best_and_worst", grid, self.step, dataformats="HWC")
        finally:
            writer.close()
        return f"logged step {self.step} to TensorBoard in {folder}"

    def _wandb(self, scalars, scores, grid) -> str:
        import hashlib
        import os

        import wandb

        from clipeval.store import write_json

        folder = Path(self.logging_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        run_id = "clipeval-" + hashlib.sha1(f"{self.project}/{self.name}".encode()).hexdigest()[:12]
        ledger_path = folder / "clipeval-wandb-steps.json"
        ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}
        if self.step in ledger.get(run_id, []):
            return f"step {self.step} is already logged to wandb run {run_id}; not logged again"
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(project=self.project, name=self.name, id=run_id, resume="allow", dir=str(folder))
        try:
            # Our own step axis: checkpoints may be evaluated out of order, wandb's steps may not.
            run.define_metric("train/step")
            run.define_metric("clip/*", step_metric="train/step")
            payload: dict[str, Any] = {"train/step": self.step, **scalars, "clip/scores": wandb.Histogram(scores)}
            if grid is not None:
                payload["clip/best_and_worst"] = wandb.Image(grid)
            run.log(payload)
        finally:
            run.finish()
        ledger.setdefault(run_id, []).append(self.step)
        write_json(ledger_path, ledger)
        return f"logged step {self.step} to wandb run {run_id} in {folder}"


def simpletuner_statistics(scores) -> dict[str, float]:
    """What SimpleTuner logs as clip/mean, min, max and std (its ``evaluate_images``): per prompt
    the score of its last image only, as torchmetrics' ``clip_score`` of one image, max(100·cos, 0),
    rounded to 4 decimals; then numpy's mean and population std (ddof 0). The cosines are clipeval's
    (SimpleTuner's own differ on prompts over 77 tokens, where torchmetrics drops the end-of-text token)."""
    import numpy as np

    usable = scores[(scores["flag"] == "") & scores["clip_score"].notna()]
    last = usable.sort_values(["prompt_id", "sample"], kind="stable").groupby("prompt_id").tail(1)
    values = [round(max(100.0 * float(c), 0.0), 4) for c in last["clip_score"]]
    if not values:
        return {}
    return {"clip/min": min(values), "clip/max": max(values), "clip/mean": float(np.mean(values)),
            "clip/std": float(np.std(values))}


def _require(tracker: str) -> None:
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}[tracker]
    try:
        __import__(module)
    except ImportError as err:
        raise ClipevalError(f"--report-to {tracker} needs the {tracker} extra: pip install 'clipeval[{tracker}]'") from err


def logged_steps(folder: Path) -> set[int]:
    """The steps at which clip/mean is already in the TensorBoard event files of ``folder``."""
    if not folder.is_dir():
        return set()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    if "clip/mean" not in events.Tags().get("scalars", []):
        return set()
    return {event.step for event in events.Scalars("clip/mean")}


def best_and_worst(usable, run_dir: Path, count: int = 4):
    """One uint8 HWC image: the ``count`` best images above the ``count`` worst, or None without images."""
    import numpy as np
    from PIL import Image

    ranked = usable[usable["image"] != ""].sort_values("clip_score", kind="stable")
    if ranked.empty:
        return None
    rows = [ranked.tail(count).iloc[::-1], ranked.head(count)]
    canvas = Image.new("RGB", (GRID_TILE * count, GRID_TILE * 2), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, path in enumerate(row["image"]):
            try:
                with Image.open(Path(run_dir) / path) as image:
                    tile = image.convert("RGB")
                    tile.thumbnail((GRID_TILE, GRID_TILE))
                    canvas.paste(tile, (c * GRID_TILE, r * GRID_TILE))
            except OSError:
                continue
    return np.asarray(canvas)
