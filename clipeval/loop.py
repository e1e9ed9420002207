"""The hot loop: generate a batch, score it, write its PNGs, commit it; keep the accelerator busy.

On CUDA, batch i is scored by CLIP on a worker thread and its own stream while batch i+1 is
generated; PNGs are encoded and written on worker threads; the journal line of a batch is written
once its images are on disk. Between two generations the main thread only hands work over, so the
GPU waits for neither CLIP, nor PNG encoding, nor the journal. On the CPU the scoring stays inline
(threads would only fight over the same cores).

A CUDA out-of-memory error halves the number of images generated at once (said once), down to
one; the batch stays the unit of the journal. With ``--batch-size auto`` on CUDA, consecutive
journal batches are generated together and their number doubles while images/s still rises by
5% and the measured peak memory says the doubled batch fits: the largest batch worth having,
found on the run's own work, without a separate probe. Each size is measured on its second call:
the first pays for kernel autotuning, allocation and, under --compile, recompilation.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from clipeval.errors import ClipevalError


AUTO_UNIT = 4  # the journal batch under --batch-size auto: resume granularity, not speed
AUTO_CAP = 256  # images per generation call, at most
GAIN = 1.05  # a doubling must raise images/s by this much to be kept growing


def journal_batch(batch_size: int | str) -> int:
    """The images per journal line (the unit a resume keeps): ``auto`` generates several at once."""
    return AUTO_UNIT if batch_size == "auto" else int(batch_size)


@dataclass
class Adaptive:
    """How many images are generated at once; shrinks on out-of-memory, grows under ``auto``."""

    limit: int
    said: bool = False
    log: Any = None  # callable(str) for the one message
    auto: bool = False  # journal batches may share a generation call
    grow: bool = False
    rate: float | None = None  # images/s at limit // 2, the last size measured
    warmed: set[int] = field(default_factory=set)  # sizes called once already

    @classmethod
    def for_run(cls, batch_size: int | str, device: str, log: Any = None) -> "Adaptive":
        if batch_size != "auto":
            return cls(int(batch_size), log=log)
        # Growth needs memory figures and a device whose throughput rises with the batch: CUDA.
        # Elsewhere auto is exactly --batch-size 4 (the journal unit, one batch per call).
        if not str(device).startswith("cuda"):
            return cls(AUTO_UNIT, log=log)
        return cls(2 * AUTO_UNIT, log=log, auto=True, grow=True)

    def observe(self, size: int, seconds: float, peak: int, base: int, total: int) -> None:
        """After ``size`` images took ``seconds`` with ``peak`` bytes at most (``base`` before):
        double the limit, or stop growing (and say at which size)."""
        if not self.grow or size < self.limit:
            return
        if size not in self.warmed:  # a new shape's first call pays for autotuning, allocation
            self.warmed.add(size)    # and, under --compile, recompilation: measure the second
            return
        rate = size / max(seconds, 1e-9)
        if self.rate is not None and rate < self.rate * GAIN:
            if rate < self.rate:  # the doubling lost: step back
                self.limit = size // 2
            return self._settle("images/s stopped rising")
        self.rate = rate
        if 2 * size > AUTO_CAP:
            return self._settle(f"the cap of {AUTO_CAP}")
        if total and base + 2 * (peak - base) > 0.9 * total:
            return self._settle("the next doubling would not fit in GPU memory")
        self.limit = 2 * size

    def _settle(self, why: str) -> None:
        self.grow = False
        if self.log is not None:
            self.log(f"--batch-size auto: generating {self.limit} images at once ({why})")

    def shrink(self, size: int) -> None:
        if size <= 1:
            raise ClipevalError(
                "out of GPU memory even for one image at a time: lower --height/--width, use --dtype float16 "
                "or bfloat16, or a GPU with more memory"
            )
        self.limit = max(1, size // 2)
        self.grow = False
        if not self.said and self.log is not None:
            self.log(f"out of GPU memory at {size} images at once; continuing with {self.limit}")
            self.said = True


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(err, oom) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def generate_adaptive(pipe, batch, gen, adaptive: Adaptive, on_step=None):
    """``generate`` in sub-batches of at most ``adaptive.limit`` images, shrinking on OOM."""
    import torch

    from clipeval.generate import generate

    images, flags, start = [], [], 0
    while start < len(batch):
        size = min(adaptive.limit, len(batch) - start)
        try:
            part, part_flags = generate(pipe, batch[start : start + size], gen, on_step=on_step)
        except Exception as err:  # noqa: BLE001 - only out-of-memory is handled here
            if not is_out_of_memory(err):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            adaptive.shrink(size)
            continue
        images.append(part)
        flags += part_flags
        start += size
    return (images[0] if len(images) == 1 else torch.cat(images)), flags


class ScoreStage:
    """Scoring of a batch by every scorer of the run, on a worker thread and side stream when the
    images are on CUDA: the images are generated and decoded once, whatever the number of scorers."""

    def __init__(self, scorers: Sequence, overlap: bool, prompts=()):
        from clipeval.scorers import Ahead

        prompts = list(prompts)
        self.scorers = [Ahead(scorer, prompts) for scorer in scorers]  # used on the one worker thread only
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip") if overlap else None
        self.stream = None

    def submit(self, images, prompts: list[str]) -> concurrent.futures.Future:
        if self.pool is None:
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result(self._score(images, prompts, None))
            return future
        import torch

        if self.stream is None:
            self.stream = torch.cuda.Stream(device=images.device)
        ready = torch.cuda.Event()
        ready.record()  # on the generating (current) stream
        return self.pool.submit(self._score, images, prompts, ready)

    def _score(self, images, prompts, ready):
        if ready is None:
            return self._run(images, prompts)
        import torch

        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            images.record_stream(self.stream)  # the allocator must not reuse it before we are done
            return self._run(images, prompts)

    def _run(self, images, prompts):
        results = [scorer.score(images, prompts) for scorer in self.scorers]
        return results, images.permute(0, 2, 3, 1).cpu().numpy()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


@dataclass
class Pending:
    batches: list[list]  # journal batches generated together: one commit each
    flags: list[str]
    scored: concurrent.futures.Future
    writes: list[concurrent.futures.Future] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def items(self) -> list:
        return [item for batch in self.batches for item in batch]


def groups(batches: Sequence[list], adaptive: Adaptive) -> Iterator[list[list]]:
    """Consecutive journal batches to generate in one call: one at a time, unless ``auto`` lets
    several share a call (read lazily: the limit moves as the run measures itself)."""
    group: list[list] = []
    for batch in batches:
        if group and (not adaptive.auto or sum(map(len, group)) + len(batch) > adaptive.limit):
            yield group
            group = []
        group.append(batch)
    if group:
        yield group


def run_batches(batches: Sequence[list], *, pipe, scorer, gen, rundir, done: dict, save_images: bool,
                batch_size: int | str, bar, log, stop=None, adaptive: Adaptive | None = None) -> int:
    """Generate, score, write and commit ``batches``; returns the number of images generated.
    ``scorer``: one scorer, or a list whose first is the primary (``clip_score``) and the others
    fill their own columns (``clipeval.metrics``).
    With ``rundir`` None (``evaluate`` without a folder) nothing is written: rows only fill ``done``.
    ``stop()``, asked before each batch, ends the loop early (another rank failed); what was
    generated is still committed. ``adaptive`` (else made from ``batch_size``) ends holding the
    number of images generated at once."""
    from clipeval.metrics import columns
    from clipeval.store import image_name

    device = str(getattr(pipe, "device", "cpu"))
    overlap = device.startswith("cuda")
    scorers = list(scorer) if isinstance(scorer, (list, tuple)) else [scorer]
    others = columns([s.name for s in scorers], [s.name for s in scorers])[1:]  # only their column names are read
    stage = ScoreStage(scorers, overlap, (item.prompt for batch in batches for item in batch))
    adaptive = adaptive or Adaptive.for_run(batch_size, device, log=log)
    if save_images and rundir is not None:
        rundir.images.mkdir(parents=True, exist_ok=True)
    generated = 0

    def finish(p: Pending, writers) -> None:
        """Scores → rows and PNG writes (batch i), while the GPU works on batch i+1."""
        from clipeval.stats import score_value

        results, host = p.scored.result()
        cosines, truncated = results[0]
        for i, (item, pixels, cosine, cut, flag) in enumerate(zip(p.items, host, cosines, truncated, p.flags)):
            name = image_name(item.prompt_id, item.sample) if save_images and rundir is not None else ""
            if name:
                p.writes.append(writers.submit(write_png, rundir, name, pixels, item))
            p.rows.append({
                "prompt_id": item.prompt_id,
                "sample": item.sample,
                "seed": item.seed,
                "prompt": item.prompt,
                "category": item.category,
                "challenge": item.challenge,
                # A NaN image has no score; a black one keeps CLIP's, but neither counts.
                "clip_score": None if flag == "nan" else score_value(cosine),
                "truncated": bool(cut),
                "image": f"images/{name}" if name else "",
                "flag": flag,
            })
            for col, (values, cuts) in zip(others, results[1:]):
                p.rows[-1][col.column] = None if flag == "nan" else score_value(values[i])
                p.rows[-1][col.truncated] = bool(cuts[i])

    def commit(p: Pending) -> None:
        for write in p.writes:
            write.result()  # re-raises a failed write (disk full, ...)
        start = 0
        for batch in p.batches:  # one journal line per batch, as cut: resume sees the same units
            rows = p.rows[start : start + len(batch)]
            start += len(batch)
            if rundir is not None:
                rundir.commit(rows)
            for row in rows:
                done[(row["prompt_id"], row["sample"])] = row
            bar.update(len(batch))

    def on_step(step: int, steps: int) -> None:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"denoising step {step}/{steps}")

    scoring: Pending | None = None  # generated, being scored
    writing: Pending | None = None  # scored, PNGs being written

    def drain(writers) -> None:
        """Commit the last two calls' work: one scored, one still being scored."""
        if writing is not None:
            commit(writing)
        if scoring is not None:
            finish(scoring, writers)
            commit(scoring)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="png") as writers:
            for group in groups(batches, adaptive):
                if stop is not None and stop():
                    break
                items = [item for batch in group for item in batch]
                watch = _Watch(device, adaptive.grow)
                try:
                    images, flags = generate_adaptive(pipe, items, gen, adaptive, on_step=on_step)
                except BaseException:
                    # Ctrl-C or a failure while generating: keep what is already generated (up to
                    # two calls' worth, which under --batch-size auto can be hundreds of images).
                    try:
                        drain(writers)
                    except BaseException:  # noqa: BLE001 - a second failure must not hide the first
                        pass
                    raise
                watch.report(adaptive, len(items))
                generated += len(items)
                submitted = Pending(group, flags, stage.submit(images, [item.prompt for item in items]))
                if writing is not None:
                    commit(writing)
                    writing = None
                if scoring is not None:
                    finish(scoring, writers)
                    writing = scoring
                scoring = submitted
            drain(writers)
    finally:
        stage.close()
    return generated



class _Watch:
    """Time and peak memory of one generation call, for ``Adaptive.observe`` (only while growing)."""

    def __init__(self, device: str, active: bool):
        import time

        self.active = active
        self.cuda = device.startswith("cuda")
        if active and self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        self.start = time.perf_counter()

    def report(self, adaptive: Adaptive, size: int) -> None:
        import time

        if not self.active:
            return
        seconds = time.perf_counter() - self.start  # generate() synchronised: it read the flags
        peak = base = total = 0
        if self.cuda:
            import torch

            peak, base, total = torch.cuda.max_memory_allocated(), self.base, torch.cuda.mem_get_info()[1]
        adaptive.observe(size, seconds, peak, base, total)


def write_png(rundir, name: str, pixels, item) -> None:
    """The image with its provenance (prompt_id, sample, seed, prompt) in an iTXt chunk."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    meta = {"prompt_id": item.prompt_id, "sample": item.sample, "seed": item.seed, "prompt": item.prompt}
    info.add_itxt("clipeval", json.dumps(meta, ensure_ascii=False))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    rundir.save_image(name, buffer.getvalue())
