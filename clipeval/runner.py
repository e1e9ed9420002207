"""``run``: checkpoint + prompt library → images → CLIP scores → tables and summary in a folder.

Data flows one way: library → work items → batches of uint8 images → scores → journal →
tables → summary. Everything a user can get wrong is checked before any model is loaded.
Importable from a training loop; the CLI is a thin layer over ``run``.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import io
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipeval.errors import ClipevalError
from clipeval.score import DEFAULT_CLIP_MODEL

SEED_FORMULA = "seed = base_seed * 2**32 + prompt_id * 2**12 + sample"


@dataclass
class RunConfig:
    checkpoint: str
    prompt_library: str
    out: Path
    clip_model: str = DEFAULT_CLIP_MODEL
    base_model: str | None = None
    images_per_prompt: int = 1
    seed: int = 0
    batch_size: int = 4
    steps: int | None = None  # None: the pipeline's own default
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    clip_dtype: str = "float32"
    preprocess: str = "fast"
    limit: int | None = None
    revision: str | None = None  # of a hub checkpoint
    clip_revision: str | None = None  # of a hub CLIP model
    allow_pickle: bool = False
    save_images: bool = True
    overwrite: bool = False
    progress: bool = True
    command: list[str] | None = None  # recorded in the manifest


@dataclass
class RunResult:
    out: Path
    summary: dict[str, Any]
    manifest: dict[str, Any]
    scores: Any = field(repr=False)  # pandas DataFrame, one row per image
    problems: dict[str, list[str]] = field(default_factory=dict)  # what was skipped, by kind


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def score_value(x: float) -> float:
    """Scores are float32: keep the shortest decimal that identifies the float32, everywhere."""
    import numpy as np

    return float(str(np.float32(x)))


def run(config: RunConfig) -> RunResult:
    from clipeval import pipelines, prompts, store
    from clipeval.generate import MAX_SAMPLES, MAX_SEED, work_items

    clock = {"start": time.perf_counter()}

    # 1. Everything cheap first: bad input fails before a model is loaded.
    if not 1 <= config.images_per_prompt <= MAX_SAMPLES:
        raise ClipevalError(f"--images-per-prompt must be in [1, {MAX_SAMPLES}]")
    if not 0 <= config.seed <= MAX_SEED:
        raise ClipevalError(f"--seed must be in [0, {MAX_SEED}]")
    if config.batch_size < 1 or (config.limit is not None and config.limit < 1):
        raise ClipevalError("--batch-size and --limit must be at least 1")
    out = Path(config.out).expanduser()
    store.check_parent(out)
    full_library = prompts.load_library(config.prompt_library)
    library = full_library.head(config.limit)
    ref = pipelines.resolve_checkpoint(
        config.checkpoint, config.base_model, allow_pickle=config.allow_pickle, revision=config.revision
    )
    device = pipelines.resolve_device(config.device)
    dtype = pipelines.resolve_dtype(config.dtype, device, ref.model_index)
    items = work_items(library, images_per_prompt=config.images_per_prompt, seed=config.seed)
    settings = {
        "checkpoint": config.checkpoint,
        "revision": config.revision,
        "base_model": config.base_model,
        "pipeline": ref.pipeline_class,
        "clip_model": config.clip_model,
        "clip_revision": config.clip_revision,
        # The whole library's hash (before --limit): runs with other limits may share a folder.
        "library_sha256": full_library.sha256,
        "seed": config.seed,
        "negative_prompt": config.negative_prompt,
        "dtype": dtype,
        "device_type": device.split(":")[0],
        "clip_dtype": config.clip_dtype,
        "preprocess": config.preprocess,
    }
    explicit = {
        k: v
        for k, v in {
            "steps": config.steps,
            "guidance_scale": config.guidance_scale,
            "height": config.height,
            "width": config.width,
        }.items()
        if v is not None
    }
    rundir = store.RunDir(out)
    rundir.check({**settings, **explicit}, overwrite=config.overwrite)

    # 2. Models, then the settings that depend on them. Nothing is written before they load.
    pipe = pipelines.load_pipeline(
        ref, device=device, dtype=dtype, allow_pickle=config.allow_pickle, revision=config.revision
    )
    gen = _generation_settings(config, pipelines.call_defaults(pipe))
    settings.update(steps=gen.steps, guidance_scale=gen.guidance_scale, height=gen.height, width=gen.width)
    from clipeval.score import ClipScorer

    scorer = ClipScorer(
        config.clip_model,
        device=device,
        dtype=config.clip_dtype,
        preprocess=config.preprocess,
        revision=config.clip_revision,
        allow_pickle=config.allow_pickle,
    )
    clock["loaded"] = time.perf_counter()
    previous = rundir.claim(settings, overwrite=config.overwrite)
    try:
        return _generate_and_write(config, rundir, previous, settings, ref, library, items, gen, pipe, scorer, device, clock)
    finally:
        rundir.release()


def _generate_and_write(config, rundir, previous, settings, ref, library, items, gen, pipe, scorer, device, clock):
    from clipeval import store

    out = rundir.path
    manifest = _manifest(config, settings, ref, library, gen, device, scorer, previous)
    store.write_json(out / "manifest.json", manifest)

    # 3. Generate and score what the journal does not hold yet.
    done = rundir.done()
    clock["loop"] = time.perf_counter()
    generated = _generate_and_score(pipe, scorer, gen, items, done, rundir, config)
    clock["looped"] = time.perf_counter()

    # 4. Tables and summary from the journal: the same files however often the run was cut.
    from clipeval import stats

    scores = stats.scores_table([done[item.key] for item in items])
    store.write_csv(out / "scores.csv", scores)
    store.write_csv(out / "prompts.csv", stats.prompts_table(scores))
    try:
        summary = stats.summarize(scores)
    except ClipevalError:  # every image flagged: the tables above say which and why
        manifest.update(status="no usable image", finished_at=_now())
        store.write_json(out / "manifest.json", manifest)
        raise
    store.write_json(out / "summary.json", summary)
    manifest.update(
        status="complete",
        finished_at=_now(),
        timings={  # this invocation's, in seconds; a resumed run times only what it did
            "load_s": round(clock["loaded"] - clock["start"], 3),
            "generate_and_score_s": round(clock["looped"] - clock["loop"], 3),
            "images_generated": generated,
            "write_s": round(time.perf_counter() - clock["looped"], 3),
        },
    )
    store.write_json(out / "manifest.json", manifest)
    return RunResult(out, summary, manifest, scores)


def _generation_settings(config: RunConfig, defaults: dict[str, Any]):
    from clipeval.generate import GenerationSettings

    if config.negative_prompt is not None and not defaults["takes_negative_prompt"]:
        raise ClipevalError("this pipeline takes no negative prompt; drop --negative-prompt")
    missing = [k for k in ("num_inference_steps", "guidance_scale", "height") if k not in defaults]
    if missing and None in (config.steps, config.guidance_scale, config.height, config.width):
        raise ClipevalError(f"the pipeline has no default for {', '.join(missing)}; pass it explicitly")
    gen = GenerationSettings(
        steps=config.steps if config.steps is not None else int(defaults["num_inference_steps"]),
        guidance_scale=float(config.guidance_scale if config.guidance_scale is not None else defaults["guidance_scale"]),
        height=config.height if config.height is not None else int(defaults["height"]),
        width=config.width if config.width is not None else int(defaults["width"]),
        negative_prompt=config.negative_prompt,
    )
    multiple = defaults["size_multiple"]
    if gen.height % multiple or gen.width % multiple:
        raise ClipevalError(f"--height and --width must be multiples of {multiple} for this pipeline")
    return gen


def _generate_and_score(pipe, scorer, gen, items, done, rundir, config: RunConfig) -> int:
    """The hot loop; returns the number of images generated. PNG encoding and writing run on worker threads while the next batch is
    generated; a batch is committed to the journal only once its images are on disk."""
    from tqdm.auto import tqdm

    from clipeval.generate import batches, generate
    from clipeval.store import image_name

    remaining = sum(1 for item in items if item.key not in done)
    bar = tqdm(
        total=len(items),
        initial=len(items) - remaining,
        unit="img",
        desc="generating + scoring",
        disable=not config.progress,
        dynamic_ncols=True,
    )
    if config.save_images:
        rundir.images.mkdir(parents=True, exist_ok=True)
    pending: tuple[list[dict[str, Any]], list[concurrent.futures.Future]] | None = None

    def commit(batch_rows, futures) -> None:
        for future in futures:
            future.result()  # re-raises a failed write (disk full, ...)
        rundir.commit(batch_rows)
        for row in batch_rows:
            done[(row["prompt_id"], row["sample"])] = row

    with concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="png") as writers:
        for batch in batches(items, config.batch_size):
            batch = [item for item in batch if item.key not in done]
            if not batch:
                continue
            images, flags = generate(pipe, batch, gen)
            cosines, truncated = scorer.score(images, [item.prompt for item in batch])
            scorer.forget(keep=[batch[-1].prompt])
            host = images.permute(0, 2, 3, 1).cpu().numpy()
            rows, futures = [], []
            for item, pixels, cosine, cut, flag in zip(batch, host, cosines, truncated, flags):
                name = image_name(item.prompt_id, item.sample) if config.save_images else ""
                if name:
                    futures.append(writers.submit(_write_png, rundir, name, pixels, item))
                rows.append(
                    {
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
                    }
                )
            if pending:
                commit(*pending)
            pending = (rows, futures)
            bar.update(len(batch))
        if pending:
            commit(*pending)
    bar.close()
    return remaining


def _write_png(rundir, name: str, pixels, item) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    meta = {"prompt_id": item.prompt_id, "sample": item.sample, "seed": item.seed, "prompt": item.prompt}
    info.add_itxt("clipeval", json.dumps(meta, ensure_ascii=False))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    rundir.save_image(name, buffer.getvalue())


def versions() -> dict[str, str]:
    """Versions of what computed the results (diffusers only where it was used)."""
    import sys

    import torch
    import transformers

    import clipeval

    out = {
        "clipeval": clipeval.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda or "",
    }
    if "diffusers" in sys.modules:
        out["diffusers"] = sys.modules["diffusers"].__version__
    return out


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def _fingerprint(ref) -> list[dict[str, Any]]:
    """Names, sizes and (for small files: configs, tokenizers) sha256 of the checkpoint's files."""
    root = Path(ref.location)
    if ref.kind == "hub" or not root.exists():
        return []
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    out = []
    for path in files:
        size = path.stat().st_size
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if size <= 8 << 20 else None
        out.append({"file": path.name if root.is_file() else str(path.relative_to(root)), "bytes": size, "sha256": digest})
    return out


def _manifest(config, settings, ref, library, gen, device, scorer, previous) -> dict[str, Any]:
    return {
        "status": "running",
        "command": config.command,
        "settings": settings,
        "selection": {
            "images_per_prompt": config.images_per_prompt,
            "limit": config.limit,
            "prompts": len(library.prompts),
            "images": len(library.prompts) * config.images_per_prompt,
        },
        "checkpoint": {
            "spec": ref.spec,
            "kind": ref.kind,
            "location": ref.location,
            "pipeline": ref.pipeline_class,
            "base_model": ref.base_model,
            "files": _fingerprint(ref),
        },
        "library": {
            "name": library.name,
            "description": library.description,
            "sha256": settings["library_sha256"],
            "files": [vars(f) for f in library.files],
        },
        "generation": {
            "steps": gen.steps,
            "guidance_scale": gen.guidance_scale,
            "height": gen.height,
            "width": gen.width,
            "negative_prompt": gen.negative_prompt,
            "seed": config.seed,
            "seed_formula": SEED_FORMULA,
            "generator": "one torch.Generator('cpu') per image",
            "batch_size": config.batch_size,
            "dtype": settings["dtype"],
            "save_images": config.save_images,
        },
        "clip": {
            "model": config.clip_model,
            "dtype": config.clip_dtype,
            "preprocess": config.preprocess,
            "max_text_tokens": scorer.max_length,
        },
        "device": {"name": device, "hardware": _device_name(device)},
        "versions": versions(),
        "started_at": (previous or {}).get("started_at") or _now(),
        "resumed": previous.get("resumed", 0) + 1 if previous else 0,
        "finished_at": None,
    }
