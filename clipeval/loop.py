"""The hot loop: generate a batch, score it, write its PNGs, commit it; keep the accelerator busy.

On CUDA, batch i is scored by CLIP on a worker thread and its own stream while batch i+1 is
generated; PNGs are encoded and written on worker threads; the journal line of a batch is written
once its images are on disk. Between two generations the main thread only hands work over, so the
GPU waits for neither CLIP, nor PNG encoding, nor the journal. On the CPU the scoring stays inline
(threads would only fight over the same cores).

A CUDA out-of-memory error halves the number of images generated at once (said once), down to
one; the batch stays the unit of the journal.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from clipeval.errors import ClipevalError


@dataclass
class Adaptive:
    """How many images are generated at once; shrinks on out-of-memory."""

    limit: int
    said: bool = False
    log: Any = None  # callable(str) for the one message

    def shrink(self, size: int) -> None:
        if size <= 1:
            raise ClipevalError(
                "out of GPU memory even for one image at a time: lower --height/--width, use --dtype float16 "
                "or bfloat16, or a GPU with more memory"
            )
        self.limit = max(1, size // 2)
        if not self.said and self.log is not None:
            self.log(f"out of GPU memory at {size} images at once; continuing with {self.limit}")
            self.said = True


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(err, oom) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def generate_adaptive(pipe, batch, gen, adaptive: Adaptive):
    """``generate`` in sub-batches of at most ``adaptive.limit`` images, shrinking on OOM."""
    import torch

    from clipeval.generate import generate

    images, flags, start = [], [], 0
    while start < len(batch):
        size = min(adaptive.limit, len(batch) - start)
        try:
            part, part_flags = generate(pipe, batch[start : start + size], gen)
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
    """CLIP scoring of a batch, on a worker thread and side stream when the images are on CUDA."""

    def __init__(self, scorer, overlap: bool):
        self.scorer = scorer
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
        cosines, truncated = self.scorer.score(images, prompts)
        self.scorer.forget(keep=[prompts[-1]])
        return cosines, truncated, images.permute(0, 2, 3, 1).cpu().numpy()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


@dataclass
class Pending:
    batch: list
    flags: list[str]
    scored: concurrent.futures.Future
    writes: list[concurrent.futures.Future] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)


def run_batches(batches: Sequence[list], *, pipe, scorer, gen, rundir, done: dict, save_images: bool,
                batch_size: int, bar, log, stop=None) -> int:
    """Generate, score, write and commit ``batches``; returns the number of images generated.
    With ``rundir`` None (``evaluate`` without a folder) nothing is written: rows only fill ``done``.
    ``stop()``, asked before each batch, ends the loop early (another rank failed); what was
    generated is still committed."""
    from clipeval.store import image_name

    overlap = str(getattr(pipe, "device", "cpu")).startswith("cuda")
    stage = ScoreStage(scorer, overlap)
    adaptive = Adaptive(batch_size, log=log)
    if save_images and rundir is not None:
        rundir.images.mkdir(parents=True, exist_ok=True)
    generated = 0

    def finish(p: Pending, writers) -> None:
        """Scores → rows and PNG writes (batch i), while the GPU works on batch i+1."""
        from clipeval.stats import score_value

        cosines, truncated, host = p.scored.result()
        for item, pixels, cosine, cut, flag in zip(p.batch, host, cosines, truncated, p.flags):
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

    def commit(p: Pending) -> None:
        for write in p.writes:
            write.result()  # re-raises a failed write (disk full, ...)
        if rundir is not None:
            rundir.commit(p.rows)
        for row in p.rows:
            done[(row["prompt_id"], row["sample"])] = row
        bar.update(len(p.batch))

    scoring: Pending | None = None  # generated, being scored
    writing: Pending | None = None  # scored, PNGs being written
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="png") as writers:
            for batch in batches:
                if stop is not None and stop():
                    break
                images, flags = generate_adaptive(pipe, batch, gen, adaptive)
                generated += len(batch)
                submitted = Pending(batch, flags, stage.submit(images, [item.prompt for item in batch]))
                if writing is not None:
                    commit(writing)
                    writing = None
                if scoring is not None:
                    finish(scoring, writers)
                    writing = scoring
                scoring = submitted
            if writing is not None:  # the last two batches: one scored, one still being scored
                commit(writing)
            if scoring is not None:
                finish(scoring, writers)
                commit(scoring)
    finally:
        stage.close()
    return generated


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
