"""``run``: checkpoint + prompt library → images → CLIP scores → tables and summary in a folder.

Data flows one way: library → work items → batches of uint8 images → scores → journal →
tables → summary. Everything a user can get wrong is checked before any model is loaded.
Importable from a training loop; the CLI is a thin layer over ``run``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clipeval.errors import ClipevalError
from clipeval.score import DEFAULT_CLIP_MODEL


@dataclass
class RunConfig:
    checkpoint: str
    prompt_library: str
    out: Path
    clip_model: str = DEFAULT_CLIP_MODEL
    clip_processor: str | None = None  # tokenizer and image processor from elsewhere (PickScore)
    scorers: tuple[str, ...] = ()  # more scorers after clip_model, each its own column (clipeval.metrics)
    metric: str | None = None  # the scorer --fail-below and a sweep's history decide on; None: clip_model
    base_model: str | None = None
    images_per_prompt: int = 1
    seed: int = 0
    batch_size: int | str = "auto"  # or N; auto grows on CUDA while images/s rises (clipeval.loop)
    steps: int | None = None  # None: the pipeline's own default
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    # A default's negative prompt (SimpleTuner's, from --config): used when no negative_prompt is
    # given and the pipeline takes one, as SimpleTuner's validation does.
    default_negative_prompt: str | None = None
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
    compile: bool = False  # torch.compile the denoiser (and channels-last for UNets on CUDA)
    lora_scale: float | None = None  # LoRA and LyCORIS checkpoints only; None means 1
    ema: bool | None = None  # a checkpoint holding EMA and raw weights: which (None: the EMA)
    attention: str | None = None  # the denoiser's attention backend; None keeps the pipeline's
    scheduler: str | None = None  # a noise scheduler by name (pipelines.SCHEDULERS); None keeps the pipeline's
    trackers: "Any" = None  # clipeval.trackers.Tracking: where and at which step to log the summary
    baseline: str | Path | None = None  # the run folder --until-decided decides against
    until_decided: bool = False  # the library in its seeded order, until the sequence decides (clipeval.decide)
    margin: float = 0.005  # in cosine: the difference that matters to --until-decided
    sequence: str = "betting"  # clipeval.sequential.METHODS
    delta_bound: float | None = None  # in cosine: the declared bound on every paired delta; None, the scorer's default
    order_prefix: int | None = None  # exactly the first N prompts of the seeded order (a sweep extending a baseline)
    progress: bool = True
    command: list[str] | None = None  # recorded in the manifest


@dataclass
class Prepared:
    """What ``run`` has checked and loaded before it claims the folder: everything the generation
    loop and the manifest need, in one record instead of a dozen parameters."""

    config: RunConfig
    rundir: Any  # store.RunDir
    ranks: Any  # distributed.Ranks
    settings: dict[str, Any]
    ref: Any  # pipelines.CheckpointRef
    library: Any  # prompts.PromptLibrary, after --limit
    items: list  # generate.WorkItem, every one of the run
    gen: Any  # generate.GenerationSettings
    pipe: Any
    scorers: list  # the primary (clip_model) first
    columns: list  # metrics.ScoreColumn, one per scorer
    device: str
    clock: dict[str, float]
    adaptive: Any = None  # loop.Adaptive: images per generation call, as the run found it
    decider: Any = None  # decide.Decider under --until-decided: the order, the baseline, when to stop


@dataclass
class RunResult:
    out: Path
    summary: dict[str, Any]
    manifest: dict[str, Any]
    scores: Any = field(repr=False)  # pandas DataFrame, one row per image
    notes: dict[str, list[str]] = field(default_factory=dict)  # worth telling: what was skipped, where it was logged


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run(config: RunConfig) -> RunResult | None:
    """Run the evaluation; returns the result on rank 0 (None on the other ranks of a
    multi-process launch, whose work rank 0 merges)."""
    from clipeval import distributed

    clock = {"start": time.perf_counter()}
    ranks = distributed.ranks()
    try:
        return _run(config, ranks, clock)
    finally:
        ranks.close()


def _run(config: RunConfig, ranks, clock: dict[str, float]) -> RunResult | None:
    from clipeval import distributed, loop, pipelines, prompts, store
    from clipeval.generate import MAX_SAMPLES, MAX_SEED, work_items

    # 1. Everything cheap first: bad input fails before a model is loaded.
    if not 1 <= config.images_per_prompt <= MAX_SAMPLES:
        raise ClipevalError(f"--images-per-prompt must be in [1, {MAX_SAMPLES}]")
    if not 0 <= config.seed <= MAX_SEED:
        raise ClipevalError(f"--seed must be in [0, {MAX_SEED}]")
    if loop.journal_batch(config.batch_size) < 1 or (config.limit is not None and config.limit < 1):
        raise ClipevalError("--batch-size and --limit must be at least 1")
    out = Path(config.out).expanduser()
    store.check_parent(out)
    full_library = prompts.load_library(config.prompt_library)
    library = full_library.head(config.limit)
    if config.limit is not None and config.limit > len(full_library.prompts) and ranks.main:
        print(f"note: --limit {config.limit} is more than the {len(full_library.prompts)} prompts of "
              f"{full_library.name}; all of them are evaluated", file=sys.stderr)
    from clipeval import decide

    decider = decide.prepare(config, library, ranks)
    if decider is not None:  # the library in its seeded order: the work items, their batches and the stops follow it
        by_id = {p.prompt_id: p for p in library.prompts}
        library = replace(library, prompts=tuple(by_id[p] for p in decider.order))
    from clipeval import metrics

    specs = [config.clip_model, *dict.fromkeys(s for s in config.scorers if s != config.clip_model)]
    models = [store.canonical(spec) for spec in specs]
    # Two scorers of one name, or a --metric that is none of them, fail before anything loads.
    metrics.check_metric(config.metric, metrics.columns(specs, models), until_decided=config.until_decided)
    ref = pipelines.resolve_checkpoint(
        config.checkpoint, config.base_model, allow_pickle=config.allow_pickle, revision=config.revision,
        ema=config.ema,
    )
    if config.scheduler:
        pipelines.check_scheduler(config.scheduler)
    if config.lora_scale is not None and ref.kind not in pipelines.ADAPTERS:
        raise ClipevalError(f"--lora-scale applies to LoRA and LyCORIS checkpoints; {config.checkpoint} is not one")
    if config.trackers is not None:
        config.trackers.check(config.checkpoint)  # a missing extra or step fails before the GPU work
    device = pipelines.resolve_device(_rank_device(config.device, ranks))
    dtype = pipelines.resolve_dtype(config.dtype, device, ref.model_index)
    items = work_items(library, images_per_prompt=config.images_per_prompt, seed=config.seed)
    settings = {
        "checkpoint": store.canonical(config.checkpoint),
        "revision": config.revision,
        "base_model": store.canonical(config.base_model),
        "lora_scale": (1.0 if config.lora_scale is None else config.lora_scale) if ref.kind in pipelines.ADAPTERS else None,
        "weights": ref.weights,
        "scheduler": config.scheduler,
        "pipeline": ref.pipeline_class,
        "clip_model": store.canonical(config.clip_model),
        "clip_processor": store.canonical(config.clip_processor),
        "clip_revision": config.clip_revision,
        "scorers": models,
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
    if config.negative_prompt is None and config.default_negative_prompt is not None:
        del settings["negative_prompt"]  # known once the pipeline says whether it takes one
    rundir = store.RunDir(out, rank=ranks.rank)
    moved = _moved_checkpoint(rundir, ref, settings, config.overwrite)
    previous = rundir.check({**settings, **explicit, **moved}, overwrite=config.overwrite)
    if previous and len(models) > 1 and "scorers" not in previous.get("settings", {}):
        raise ClipevalError(f"{out} was made with {config.clip_model} alone, before runs carried several scorers: score "
                            f"it with 'clipeval score {out} --out NEW --scorer ...', or use another --out")
    _check_seed_scheme(previous, out)
    _check_not_shrunk(previous, out, prompts=len(library.prompts), images_per_prompt=config.images_per_prompt)

    # 2. Models, then the settings that depend on them. Nothing is written before they load. In a
    #    multi-process run every rank says whether it loaded, so none waits for a rank that failed.
    load_error = None
    loud = config.progress and ranks.main
    try:
        if loud:
            from clipeval import progress

            what = f"{ref.kind} {ref.location}" if ref.base_model else ref.spec
            base = f" on base model {ref.base_model} ({progress.size_of(ref.base_model)})" if ref.base_model else ""
            progress.say(f"loading checkpoint {what} ({progress.size_of(ref.location)}){base} on {device} ...")
        pipe = pipelines.load_pipeline(
            ref, device=device, dtype=dtype, allow_pickle=config.allow_pickle, revision=config.revision,
            lora_scale=config.lora_scale,
        )
        if config.attention:
            pipelines.set_attention(pipe, config.attention)
        if config.scheduler:
            pipelines.set_scheduler(pipe, config.scheduler)
        if config.compile:
            pipelines.compile_denoiser(pipe)
        defaults = pipelines.call_defaults(pipe)
        gen = generation_settings(
            defaults, steps=config.steps, guidance_scale=config.guidance_scale,
            height=config.height, width=config.width, negative_prompt=_negative_prompt(config, defaults),
        )
        settings.update(steps=gen.steps, guidance_scale=gen.guidance_scale, height=gen.height, width=gen.width,
                        negative_prompt=gen.negative_prompt)
        from clipeval.scorers import make_scorer

        if loud:
            where = config.clip_model
            if where == "demo":
                from clipeval import demo

                where = str(demo.demo_clip_dir())  # built on the spot: its size, not "from the hub"
            progress.say(f"loading CLIP model {config.clip_model} ({progress.size_of(where)}) ...")
        scorers = []
        for i, spec in enumerate(specs):
            if loud and i:
                progress.say(f"loading scorer {spec} ({progress.size_of(spec)}) ...")
            scorers.append(make_scorer(
                spec, device=device, dtype=config.clip_dtype, preprocess=config.preprocess,
                revision=config.clip_revision if i == 0 else None, allow_pickle=config.allow_pickle,
                processor=config.clip_processor if i == 0 else None,
                log=lambda message: print(f"note: {message}", file=sys.stderr),
            ))
        columns = metrics.columns(specs, models, [s.metric for s in scorers])
        if decider is not None:  # the scorer that decides, now that its kind is known
            decider.scorer, decider.kind = columns[0].label, columns[0].kind
    except Exception as err:  # noqa: BLE001 - any failure must reach the other ranks
        if ranks.world == 1:
            raise
        load_error = distributed.report(err)
    ranks.all_ok(load_error)
    clock["loaded"] = time.perf_counter()
    previous = ranks.on_main(lambda: rundir.claim({**settings, **moved}, overwrite=config.overwrite))
    try:
        prepared = Prepared(config, rundir, ranks, settings, ref, library, items, gen, pipe, scorers, columns, device, clock,
                            adaptive=loop.Adaptive.for_run(config.batch_size, device, log=_say), decider=decider)
        return _generate_and_write(prepared, previous)
    finally:
        rundir.release()


def _negative_prompt(config: RunConfig, defaults: dict[str, Any]) -> str | None:
    """The one asked for, else a default's (SimpleTuner's) where the pipeline takes one."""
    if config.negative_prompt is not None or config.default_negative_prompt is None:
        return config.negative_prompt
    return config.default_negative_prompt if defaults["takes_negative_prompt"] else None


def _say(message: str) -> None:
    """A note under the progress bar, on stderr."""
    from tqdm.auto import tqdm

    tqdm.write(f"clipeval: {message}", file=sys.stderr)


def _moved_checkpoint(rundir, ref, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """A checkpoint folder or file that moved since the run in ``rundir`` began: recognised as the
    same when its fingerprint (every file's name and size, and the sha256 of every file up to
    8 MiB: configs, tokenizers, small weights) equals the one in the run's manifest. Then the
    run's recorded location stands for the new one, and the run resumes; returns that override."""
    from clipeval import store

    previous = None if overwrite else rundir.manifest()
    if not previous or ref.kind == "hub":
        return {}
    old = previous.get("settings", {}).get("checkpoint")
    if store.canonical(old) == settings["checkpoint"] or not isinstance(old, str):
        return {}
    recorded = previous.get("checkpoint", {}).get("files")
    if not recorded or recorded != _fingerprint(ref):
        return {}
    print(f"note: the checkpoint moved: {ref.location} holds the same files (names, sizes and hashes) as {old}, "
          f"which {rundir.path} was made from; resuming", file=sys.stderr)
    return {"checkpoint": old}


def _check_not_shrunk(previous: dict[str, Any] | None, out: Path, *, prompts: int, images_per_prompt: int) -> None:
    """A smaller --limit or --images-per-prompt into a folder would rewrite its results over fewer
    images: a typo would lose the summary of the larger run. Only --overwrite does that."""
    if previous is None:
        return
    selection = previous.get("selection", {})
    had_prompts, had_images = selection.get("prompts", 0), selection.get("images_per_prompt", 0)
    if had_prompts > prompts or had_images > images_per_prompt:
        raise ClipevalError(
            f"{out} holds results for {had_prompts} prompts x {had_images} images; this command asks for "
            f"{prompts} x {images_per_prompt} and would rewrite them as fewer: give --limit {had_prompts} "
            f"--images-per-prompt {had_images} (or more) to keep and extend them, another --out, or --overwrite"
        )


def _check_seed_scheme(previous: dict[str, Any] | None, out: Path) -> None:
    """Images made under the first seed scheme (clipeval 0.1.0) are those of seed 0 whatever the
    base seed was; only a seed-0 run of that scheme may be resumed or extended."""
    from clipeval.generate import SEED_SCHEME

    if previous is None:
        return
    scheme = previous.get("generation", {}).get("seed_scheme", 1)
    if scheme != SEED_SCHEME and previous.get("settings", {}).get("seed", 0) != 0:
        raise ClipevalError(
            f"{out} was made under seed scheme {scheme}, whose images ignored --seed; "
            "its images cannot be extended: use --overwrite to redo it, or another --out"
        )


def _rank_device(spec: str, ranks) -> str:
    """In a multi-process launch each rank takes its own accelerator (accelerate's choice)."""
    if ranks.world > 1 and spec in ("auto", "cuda"):
        return ranks.device() if spec == "auto" or ranks.device().startswith("cuda") else spec
    return spec


def _generate_and_write(run: Prepared, previous: dict[str, Any] | None):
    config, rundir, ranks, items, clock = run.config, run.rundir, run.ranks, run.items, run.clock
    from clipeval import distributed, loop
    from clipeval.generate import batches

    out = rundir.path
    manifest = _manifest(run, previous)
    # Also the barrier after which rank 0 has claimed (and, with --overwrite, cleared) the folder.
    ranks.on_main(lambda: rundir.start(manifest))

    # 3. Generate and score what the journals do not hold yet. The batches are cut from the full
    #    list, so each is the same whichever rank, or whichever earlier run, computes it.
    done = rundir.done()
    todo = [[i for i in b if i.key not in done] for b in batches(items, loop.journal_batch(config.batch_size))]
    todo = [b for b in todo if b]
    mine = todo[ranks.rank :: ranks.world]
    clock["loop"] = time.perf_counter()
    error = None
    try:
        generated = _generate_and_score(run, mine, done)
    except Exception as err:  # noqa: BLE001 - any failure must reach the other ranks
        if ranks.world == 1:
            raise
        error, generated = distributed.report(err), 0
        rundir.signal_failure(error)
    clock["looped"] = time.perf_counter()
    ranks.all_ok(error, last=True)
    if not ranks.main:
        return None

    # 4. Tables and summary from the journals: the same files however often the run was cut.

    done = rundir.done()
    if run.decider is not None:  # a prefix of the seeded order: what was generated before the sequence decided
        from clipeval.sequential import ORDER

        items = [item for item in items if item.key in done]
        manifest["selection"].update(prompts=len({item.prompt_id for item in items}), images=len(items),
                                     order=ORDER, library_prompts=run.decider.population)

    scores, per_prompt = tables([done[item.key] for item in items], run.library, run.columns)
    try:
        summary = summarize(scores, run.scorers, run.columns)
    except ClipevalError:  # every image flagged: the tables say which and why
        manifest.update(status="no usable image", finished_at=_now())
        rundir.finish(scores=scores, prompts=per_prompt, summary=None, manifest=manifest)
        raise
    manifest.update(
        status="complete",
        finished_at=_now(),
        timings={  # this invocation's, in seconds; a resumed run times only what it did
            "load_s": round(clock["loaded"] - clock["start"], 3),
            "generate_and_score_s": round(clock["looped"] - clock["loop"], 3),
            "images_generated": generated,
            "images_per_generation_call": run.adaptive.limit,
            "write_s": round(time.perf_counter() - clock["looped"], 3),
        },
    )
    decided = None
    if run.decider is not None:
        decided = run.decider.sequential_block(done, out)
        if decided is not None:
            summary["sequential"] = decided
    manifest = rundir.finish(scores=scores, prompts=per_prompt, summary=summary, manifest=manifest)
    result = RunResult(out, summary, manifest, scores)
    if decided is not None:
        run.decider.check_reached(done, decided)  # every file is written first
    if config.trackers is not None:  # after every file is written: a tracker problem loses nothing
        result.notes["tracking"] = [config.trackers.log(result, checkpoint=config.checkpoint)]
    return result


def tables(rows: list[dict[str, Any]], library, columns: list):
    """scores.csv and prompts.csv from the rows of every image, each scorer in its columns."""
    from clipeval import metrics, stats

    scores = stats.scores_table(rows, metrics.extra_columns(columns))
    return scores, metrics.prompts_table(scores, columns, {p.prompt_id: p.name for p in library.prompts})


def summarize(scores, scorers: list, columns: list) -> dict[str, Any]:
    from clipeval import metrics

    return metrics.summarize(scores, columns, [(s.definition, s.scale) for s in scorers])


def generation_settings(defaults: dict[str, Any], *, steps, guidance_scale, height, width, negative_prompt):
    """The settings actually used: what was asked for, else the pipeline's own defaults."""
    from clipeval.generate import GenerationSettings

    if negative_prompt is not None and not defaults["takes_negative_prompt"]:
        raise ClipevalError("this pipeline takes no negative prompt; drop --negative-prompt")
    missing = [k for k in ("num_inference_steps", "guidance_scale", "height") if k not in defaults]
    if missing and None in (steps, guidance_scale, height, width):
        raise ClipevalError(f"the pipeline has no default for {', '.join(missing)}; pass it explicitly")
    gen = GenerationSettings(
        steps=steps if steps is not None else int(defaults["num_inference_steps"]),
        guidance_scale=float(guidance_scale if guidance_scale is not None else defaults["guidance_scale"]),
        height=height if height is not None else int(defaults["height"]),
        width=width if width is not None else int(defaults["width"]),
        negative_prompt=negative_prompt,
    )
    multiple = defaults["size_multiple"]
    if gen.height % multiple or gen.width % multiple:
        raise ClipevalError(f"--height and --width must be multiples of {multiple} for this pipeline")
    return gen


def _generate_and_score(run: Prepared, mine: list[list], done: dict) -> int:
    """This rank's batches through the hot loop (``clipeval.loop``), under one progress bar."""
    pipe, scorer, gen, items, rundir, config, ranks = run.pipe, run.scorers, run.gen, run.items, run.rundir, run.config, run.ranks
    from clipeval import loop, progress

    remaining = sum(1 for item in items if item.key not in done)
    bar = progress.bar(
        total=len(items) if ranks.world == 1 else sum(len(b) for b in mine),
        initial=len(items) - remaining if ranks.world == 1 else 0,
        desc="generating + scoring" + (f" (rank {ranks.rank} of {ranks.world})" if ranks.world > 1 else ""),
        enabled=config.progress and ranks.main,
    )
    with bar:
        return loop.run_batches(
            mine, pipe=pipe, scorer=scorer, gen=gen, rundir=rundir, done=done, save_images=config.save_images,
            batch_size=config.batch_size, bar=bar, log=_say,
            stop=(lambda: run.decider.should_stop(done)) if run.decider is not None else
            rundir.peer_failed if ranks.world > 1 else None,
            adaptive=run.adaptive,
        )


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
    if device.startswith("cpu"):
        try:  # Linux: the processor's name, not only its architecture
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
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


def _manifest(run: Prepared, previous: dict[str, Any] | None) -> dict[str, Any]:
    config, settings, ref, library, gen, device, scorer, ranks = (
        run.config, run.settings, run.ref, run.library, run.gen, run.device, run.scorers[0], run.ranks)
    from clipeval.generate import SEED_FORMULA, SEED_SCHEME

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
            "weights": ref.weights,
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
            "seed_scheme": SEED_SCHEME,
            "seed_formula": SEED_FORMULA,
            "generator": "one torch.Generator('cpu') per image",
            "batch_size": config.batch_size,
            "processes": ranks.world,
            "compile": config.compile,
            "attention": config.attention,
            "scheduler": type(run.pipe.scheduler).__name__,
            "dtype": settings["dtype"],
            "save_images": config.save_images,
        },
        "clip": {
            "model": config.clip_model,
            "class": scorer.model_class,
            "processor": config.clip_processor,
            "dtype": config.clip_dtype,
            "preprocess": scorer.preprocess,
            "max_text_tokens": scorer.max_length,
        },
        "scorers": scorer_records(run.scorers, run.columns, config.clip_dtype),
        "device": {"name": device, "hardware": _device_name(device)},
        "versions": versions(),
        "started_at": (previous or {}).get("started_at") or _now(),
        "resumed": previous.get("resumed", 0) + 1 if previous else 0,
        "finished_at": None,
    }


def scorer_records(scorers: list, columns: list, dtype: str) -> list[dict[str, Any]]:
    """Each scorer as the manifest records it: its model, where its numbers are, and what it asked
    (VQAScore: the question and the answer token it read)."""
    return [{"label": col.label, "kind": col.kind, "model": col.model, "column": col.column, "class": s.model_class,
             "processor": s.processor_name, "dtype": getattr(s, "dtype", dtype), "max_text_tokens": s.max_length,
             "definition": s.definition,
             **s.describe()} for s, col in zip(scorers, columns)]


@dataclass
class Evaluation:
    """What ``evaluate`` returns: one row per image, one per prompt, and the summary."""

    scores: Any  # DataFrame, the columns of scores.csv
    prompts: Any  # DataFrame, the columns of prompts.csv
    summary: dict[str, Any]

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.scores.to_dict("records")


def evaluate(
    pipe: Any,
    prompts: Any,
    *,
    clip: Any = DEFAULT_CLIP_MODEL,
    images_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int | str = 4,
    steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    preprocess: str = "fast",
    clip_processor: str | None = None,
    out: str | Path | None = None,
    progress: bool = False,
    across_ranks: bool = False,
    limit: int | None = None,
) -> Evaluation:
    """The evaluation of ``run`` on a pipeline already in memory, e.g. inside a training loop.

    ``prompts``: a library name or file, a ``PromptLibrary``, or a list of strings, of which
    ``limit`` takes the first N (as ``run --limit``: a quick look at Parti mid-training). ``clip``: a
    model id, folder or short name, or a loaded scorer (``clipeval.scorers.make_scorer``) to reuse
    across calls (load it once per training run, not once per evaluation); or a list of them, the
    first the primary, each its own column as in ``run --scorer``. Seeds, scores and statistics are those of ``run``.
    Nothing is written unless ``out`` names a folder (then: images, scores.csv, prompts.csv and
    summary.json). The pipeline's modules are put in eval mode for the call and restored after.

    ``across_ranks``: called on every rank of the caller's process group (a training script under
    torchrun or accelerate, each rank with its own pipeline and CLIP), the batches are dealt over
    the ranks as ``run`` deals them, and every rank returns the whole, identical result (rank 0
    writes ``out``). Off by default: a script that evaluates on its main process alone must not
    wait for ranks that never call.
    """
    from tqdm.auto import tqdm

    from clipeval import distributed, loop, metrics, pipelines, store
    from clipeval.generate import SEED_FORMULA, SEED_SCHEME, batches, work_items
    from clipeval.prompts import Prompt, PromptLibrary, load_library
    from clipeval.scorers import make_scorer

    if isinstance(prompts, PromptLibrary):
        library = prompts
    elif isinstance(prompts, (str, Path)):
        library = load_library(str(prompts))
    else:
        texts = list(prompts)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ClipevalError("prompts: give a library name or file, or a non-empty list of non-empty strings")
        library = PromptLibrary("in-memory", "prompts given to evaluate()", tuple(Prompt(i, t) for i, t in enumerate(texts)))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ClipevalError("limit must be a positive integer")
    library = library.head(limit)
    device = str(getattr(pipe, "device", "cpu"))
    items = work_items(library, images_per_prompt=images_per_prompt, seed=seed)
    rank, world = distributed.joined() if across_ranks else (0, 1)
    # Cut from the full list on every rank alike, so a batch is the same whoever computes it.
    mine = list(batches(items, loop.journal_batch(batch_size)))[rank::world]
    rundir = None
    if out is not None:
        store.check_parent(Path(out).expanduser())
        rundir = store.RunDir(Path(out).expanduser(), rank=rank)
        rundir.path.mkdir(parents=True, exist_ok=True)
    done: dict = {}
    error = None
    modules = [m for m in getattr(pipe, "components", {}).values() if hasattr(m, "training") and hasattr(m, "eval")]
    training = [m.training for m in modules]
    bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:  # from here on, a failure on one rank must reach the others, which wait in gather
        given = list(clip) if isinstance(clip, (list, tuple)) else [clip]
        scorers = [c if not isinstance(c, (str, Path)) else
                   make_scorer(str(c), device=device, preprocess=preprocess, processor=clip_processor if i == 0 else None)
                   for i, c in enumerate(given)]
        columns = metrics.columns([s.name for s in scorers], [store.canonical(s.name) for s in scorers],
                                  [s.metric for s in scorers])
        gen = generation_settings(pipelines.call_defaults(pipe), steps=steps, guidance_scale=guidance_scale,
                                  height=height, width=width, negative_prompt=negative_prompt)
        for module in modules:
            module.eval()
        with tqdm(total=sum(len(b) for b in mine), unit="img", desc="evaluating", disable=not progress) as bar:
            loop.run_batches(mine, pipe=pipe, scorer=scorers, gen=gen, rundir=rundir, done=done,
                             save_images=rundir is not None, batch_size=batch_size, bar=bar, log=_say)
    except Exception as err:  # noqa: BLE001 - any failure must reach the other ranks
        if world == 1:
            raise
        error = distributed.report(err)
    finally:
        for module, was_training in zip(modules, training):
            module.train(was_training)
        pipe.set_progress_bar_config(**bar_config)
    if world > 1:  # every rank's rows, or its error, to every rank
        parts = distributed.gather((error, done), rank)
        distributed.raise_first([e for e, _ in parts])
        done = {key: row for _, part in parts for key, row in part.items()}
    scores, per_prompt = tables([done[item.key] for item in items], library, columns)
    summary = summarize(scores, scorers, columns)
    if rundir is not None and rank == 0:  # a folder compare, report and score read like a run's
        manifest = {
            "kind": "evaluate", "status": "complete",
            "settings": {"library_sha256": library.sha256, "seed": seed, "clip_model": columns[0].model,
                         "scorers": [c.model for c in columns]},
            "scorers": scorer_records(scorers, columns, getattr(scorers[0], "dtype", "float32")),
            "library": {"name": library.name, "sha256": library.sha256},
            "generation": {"steps": gen.steps, "guidance_scale": gen.guidance_scale, "height": gen.height,
                           "width": gen.width, "negative_prompt": gen.negative_prompt, "seed": seed,
                           "seed_scheme": SEED_SCHEME, "seed_formula": SEED_FORMULA, "batch_size": batch_size},
            "versions": versions(), "finished_at": _now(),
        }
        try:
            store.write_results(rundir.path, scores=scores, prompts=per_prompt, summary=summary, manifest=manifest)
        except Exception as err:  # noqa: BLE001 - the other ranks wait for the files
            if world == 1:
                raise
            error = distributed.report(err)
    if world > 1 and rundir is not None:  # every rank returns once the files are there
        distributed.raise_first([e for e, _ in distributed.gather((error, None), rank)])
    return Evaluation(scores, per_prompt, summary)
