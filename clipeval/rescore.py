"""``score``: CLIP scores for images that already exist, from a run folder or any image folder.

Sources:

- a run folder: its saved images, re-scored in the very batches the run scored them (read from
  its journal), so re-scoring with the run's own CLIP model reproduces its scores bit for bit;
- an image folder with ``--prompts``: a table with ``image`` and ``prompt`` columns, or a prompt
  library whose rows match images named by prompt_id (``00012.png``, ``00012_01.png``).

Images are decoded once, ahead of the model (see ``decode``), and scored by every requested CLIP
model. Grayscale, palette, alpha (composited on white, as transformers does) and 16-bit
images are converted; unreadable ones are skipped and listed, never paired with a wrong prompt.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipeval.decode import Decoder, ImageProblem
from clipeval.errors import ClipevalError
from clipeval.loop import journal_batch
from clipeval.score import DEFAULT_CLIP_MODEL

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_STEM = re.compile(r"^(\d+)(?:_(\d+))?$")
IMAGE_COLUMNS = ("image", "file", "filename", "path")
DEFAULT_BATCH = 16
REPORTED = 5  # names listed in a warning line; the manifest holds them all


@dataclass(frozen=True)
class ImageRow:
    prompt_id: int
    sample: int
    seed: int | str  # "" when unknown (images not made by clipeval)
    prompt: str
    category: str
    challenge: str
    image: str  # as written to scores.csv
    path: Path  # where it is read from
    flag: str = ""  # a run's flag, carried over (see stats.FLAGS)


@dataclass
class Source:
    kind: str  # "run" or "images"
    path: Path
    batches: list[list[ImageRow]]
    settings: dict[str, Any]
    problems: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ScoreConfig:
    source: Path
    out: Path
    prompts: str | None = None
    clip_models: tuple[str, ...] = (DEFAULT_CLIP_MODEL,)
    clip_processor: str | None = None  # for the first model
    device: str = "auto"
    clip_dtype: str = "float32"
    preprocess: str = "fast"
    batch_size: int | None = None  # None: the run's own batches, or DEFAULT_BATCH
    allow_pickle: bool = False
    overwrite: bool = False
    progress: bool = True
    command: list[str] | None = None


# -- sources --------------------------------------------------------------------------------------

def is_run(folder: Path) -> bool:
    """A run folder, finished or not (an unfinished one is refused by ``load_run``, saying why)."""
    from clipeval.store import STATE

    return (folder / "manifest.json").is_file() or (folder / STATE).is_dir()


def from_run(folder: Path, batch_size: int | None) -> Source:
    from clipeval.store import RunDir, load_run

    record = load_run(folder)
    manifest, scores = record.manifest, record.scores
    if (scores["image"] == "").all():
        raise ClipevalError(f"{folder}: the run saved no images (--no-save-images); nothing to re-score")
    rows = {
        (int(r.prompt_id), int(r.sample)): ImageRow(int(r.prompt_id), int(r.sample), r.seed, r.prompt, r.category,
                                                    r.challenge, r.image, folder / r.image, r.flag)
        for r in scores.itertuples(index=False)
        if r.image
    }
    if batch_size is None:
        batches = [[rows[key] for key in batch if key in rows] for batch in RunDir(folder).batches()]
        batches = [b for b in batches if b]
        covered = {(r.prompt_id, r.sample) for b in batches for r in b}
        leftover = [row for key, row in sorted(rows.items()) if key not in covered]
        batches += _chunks(leftover, journal_batch(manifest.get("generation", {}).get("batch_size") or DEFAULT_BATCH))
    else:
        batches = _chunks([rows[k] for k in sorted(rows)], batch_size)
    settings = {k: v for k, v in manifest.get("settings", {}).items()}
    settings["rescored_from"] = str(folder)
    return Source("run", folder, batches, settings)


def from_images(folder: Path, prompts_spec: str | None, batch_size: int | None) -> Source:
    from clipeval import prompts

    if prompts_spec is None:
        raise ClipevalError(f"{folder} is not a run folder: pass --prompts (a table with image and prompt columns, or a prompt library)")
    mapping = Path(prompts_spec).expanduser()
    records = None
    if mapping.is_file() and prompts.format_of(mapping.name) in ("csv", "tsv", "jsonl", "json"):
        data = mapping.read_bytes()
        records = prompts.read_records(data, prompts.format_of(mapping.name), origin=str(mapping))
        if not any(_image_key(list(fields)) is not None for _, fields in records[:1]):
            records = None  # no image column: a prompt library
    if records is not None:
        rows, problems = _rows_from_mapping(folder, mapping, records)
        library_hash = _hash_rows(rows)
    else:
        library = prompts.load_library(prompts_spec)
        rows, problems = _rows_from_library(folder, library)
        library_hash = library.sha256
    if not rows:
        detail = "; ".join(f"{len(v)} {k}" for k, v in problems.items() if v)
        raise ClipevalError(f"no image in {folder} matches a prompt of {prompts_spec}" + (f" ({detail})" if detail else ""))
    settings = {"library_sha256": library_hash, "seed": None, "images": str(folder), "prompts": prompts_spec}
    return Source("images", folder, _chunks(rows, batch_size or DEFAULT_BATCH), settings, problems)


def _image_key(keys: list[str]) -> str | None:
    lowered = {k.strip().lower(): k for k in keys}
    return next((lowered[c] for c in IMAGE_COLUMNS if c in lowered), None)


def _rows_from_mapping(folder: Path, mapping: Path, records) -> tuple[list[ImageRow], dict[str, list[str]]]:
    """One row per mapping line; prompt_id numbers distinct prompts in order of appearance."""
    from clipeval.prompts import CATEGORY_COLUMNS, CHALLENGE_COLUMNS, PROMPT_COLUMNS, pick_column, text_field

    ids: dict[tuple[str, str, str], int] = {}
    samples: dict[int, int] = {}
    rows, missing = [], []
    root = folder.resolve()
    for where, fields in records:
        keys = list(fields)
        image_key = _image_key(keys)
        if image_key is None:
            raise ClipevalError(f"{mapping}: {where}: no image column (looked for {', '.join(IMAGE_COLUMNS)})")
        picks = [pick_column(keys, None, aliases, f"{mapping}: {where}", what) for aliases, what in
                 ((PROMPT_COLUMNS, "prompt"), (CATEGORY_COLUMNS, "category"), (CHALLENGE_COLUMNS, "challenge"))]
        prompt, category, challenge = (text_field(fields, keys[i], str(mapping), where) if i is not None else "" for i in picks)
        name = text_field(fields, image_key, str(mapping), where)
        if not prompt.strip():
            raise ClipevalError(f"{mapping}: {where}: empty prompt")
        path = (folder / name).resolve()
        if not path.is_relative_to(root):
            raise ClipevalError(f"{mapping}: {where}: image {name!r} is outside {folder}")
        if not path.is_file():
            missing.append(name)
            continue
        prompt_id = ids.setdefault((prompt, category, challenge), len(ids))
        sample = samples.get(prompt_id, 0)
        samples[prompt_id] = sample + 1
        rows.append(ImageRow(prompt_id, sample, "", prompt, category, challenge, name, path))
    rows.sort(key=lambda r: (r.prompt_id, r.sample))
    listed = {row.path for row in rows}
    left_out = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                      and p not in listed)
    return rows, {"missing images": missing, "images the table leaves out": left_out}


def _rows_from_library(folder: Path, library) -> tuple[list[ImageRow], dict[str, list[str]]]:
    """Images named by prompt_id (and sample): 00012.png, 00012_01.png, 12.jpg ..."""
    by_id = {p.prompt_id: p for p in library.prompts}
    rows, unmatched, seen = [], [], set()
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        match = IMAGE_STEM.match(path.stem)
        if path.suffix.lower() not in IMAGE_SUFFIXES or not match or int(match.group(1)) not in by_id:
            unmatched.append(path.name)
            continue
        prompt_id, sample = int(match.group(1)), int(match.group(2) or 0)
        if (prompt_id, sample) in seen:
            raise ClipevalError(f"{folder}: two images for prompt {prompt_id} sample {sample} (e.g. {path.name})")
        seen.add((prompt_id, sample))
        p = by_id[prompt_id]
        rows.append(ImageRow(prompt_id, sample, "", p.prompt, p.category, p.challenge, path.name, path))
    rows.sort(key=lambda r: (r.prompt_id, r.sample))
    scored = {r.prompt_id for r in rows}
    missing = [f"{p.prompt_id:05d}" for p in library.prompts if p.prompt_id not in scored]
    return rows, {"prompts without an image": missing, "files matching no prompt": unmatched}


def _hash_rows(rows: list[ImageRow]) -> str:
    import hashlib

    distinct = sorted({(r.prompt_id, r.prompt, r.category, r.challenge) for r in rows})
    return hashlib.sha256(json.dumps(distinct, ensure_ascii=False).encode()).hexdigest()


def _chunks(rows: list[ImageRow], size: int) -> list[list[ImageRow]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


# -- the command ----------------------------------------------------------------------------------

def score(config: ScoreConfig):
    from clipeval import pipelines, store
    from clipeval.runner import RunResult

    source_dir = Path(config.source).expanduser()
    out = Path(config.out).expanduser()
    if not source_dir.is_dir():
        raise ClipevalError(f"{config.source}: no such folder")
    if out.resolve() == source_dir.resolve():
        raise ClipevalError("--out must not be the source folder (its files would be replaced)")
    if config.batch_size is not None and config.batch_size < 1:
        raise ClipevalError("--batch-size must be at least 1")
    models = tuple(dict.fromkeys(config.clip_models))
    store.check_parent(out)
    if is_run(source_dir):
        if config.prompts is not None:
            raise ClipevalError(f"{source_dir} is a run folder, which carries its prompts: drop --prompts")
        source = from_run(source_dir, config.batch_size)
    else:
        source = from_images(source_dir, config.prompts, config.batch_size)
    from clipeval import metrics

    canonical = [store.canonical(m) for m in models]
    metrics.columns(list(models), canonical)  # two scorers of one name fail before anything loads
    settings = {**source.settings, "clip_model": canonical[0], "scorers": canonical,
                "clip_processor": store.canonical(config.clip_processor), "clip_dtype": config.clip_dtype, "preprocess": config.preprocess}
    rundir = store.RunDir(out)
    rundir.check(settings, overwrite=config.overwrite)
    with Decoder(source.batches, workers=min(32, os.cpu_count() or 1), path=lambda row: row.path) as decoded:  # before torch
        device = pipelines.resolve_device(config.device)
        from clipeval.scorers import make_scorer

        scorers = [
            make_scorer(m, device=device, dtype=config.clip_dtype, preprocess=config.preprocess, allow_pickle=config.allow_pickle,
                        processor=config.clip_processor if i == 0 else None, log=_note)
            for i, m in enumerate(models)
        ]
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        # Nothing is resumed: the files are recomputed whole. A folder of the same settings keeps
        # its set until the new one replaces it (a kill in between loses nothing); --overwrite
        # (other settings) clears it first, as it does for run.
        rundir.claim(settings, overwrite=config.overwrite)
        try:
            results, skipped = _score_batches(source.batches, decoded, scorers, config.progress)
            if not results:
                raise ClipevalError(f"no image could be scored ({len(skipped)} unreadable, e.g. {skipped[0]['image']}: {skipped[0]['reason']})")
            scores, summary, manifest = _write(out, config, source, settings, scorers, results, skipped, device=device, started=started)
        finally:
            rundir.release()
    notes = {**source.problems, "unreadable images": [s["image"] for s in skipped]}
    return RunResult(out, summary, manifest, scores, notes)


def _write(out: Path, config: ScoreConfig, source: Source, settings: dict, scorers, results, skipped, *,
           device: str, started: str):
    """The tables, summary and manifest of a finished scoring, written atomically."""
    from clipeval import metrics, store
    from clipeval.runner import scorer_records, summarize, versions

    columns = metrics.columns([s.name for s in scorers], settings["scorers"], [s.metric for s in scorers])
    scores = _table(results, columns)
    summary = summarize(scores, scorers, columns)
    per_prompt = metrics.prompts_table(scores, columns)
    manifest = {
        "kind": "score",
        "status": "complete",
        "command": config.command,
        "settings": settings,
        "source": {"kind": source.kind, "path": str(source.path), "prompts": config.prompts,
                   "batches": len(source.batches)},
        "scorers": scorer_records(scorers, columns, config.clip_dtype),
        "skipped": skipped,
        "problems": source.problems,
        "device": {"name": device},
        "versions": versions(),
        "started_at": started,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest = store.write_results(out, scores=scores, prompts=per_prompt, summary=summary, manifest=manifest)
    return scores, summary, manifest


def _note(message: str) -> None:
    import sys

    print(f"note: {message}", file=sys.stderr)


def _score_batches(batches, decoded: Decoder, scorers, progress: bool):
    from tqdm.auto import tqdm

    from clipeval.scorers import Ahead
    from clipeval.stats import score_value

    results: list[tuple[ImageRow, list[tuple[float | None, bool]], str]] = []
    skipped: list[dict[str, str]] = []
    total = sum(len(b) for b in batches)
    with tqdm(total=total, unit="img", desc="scoring", disable=not progress, dynamic_ncols=True) as bar:
        ahead = [Ahead(scorer, (row.prompt for batch in batches for row in batch)) for scorer in scorers]
        for batch, images in decoded:
            good = [(row, img) for row, img in zip(batch, images) if not isinstance(img, ImageProblem)]
            skipped += [{"image": row.image, "reason": str(img)} for row, img in zip(batch, images)
                        if isinstance(img, ImageProblem)]
            if good:
                rows, tensors = zip(*good)
                per_model = []
                for scorer in ahead:
                    cosines, truncated = scorer.score(list(tensors), [r.prompt for r in rows])
                    # A run's NaN image has no score (its PNG holds zeros where the NaNs were).
                    per_model.append([(None if r.flag == "nan" else score_value(c), t)
                                      for r, c, t in zip(rows, cosines, truncated)])
                flags = [r.flag or ("black" if int(t.max()) == 0 else "") for r, t in zip(rows, tensors)]
                results += [(row, [m[i] for m in per_model], flag) for i, (row, flag) in enumerate(zip(rows, flags))]
            bar.update(len(batch))
    return results, skipped


def _table(results, columns):
    from clipeval import metrics
    from clipeval.stats import scores_table

    records = []
    for row, per_model, flag in results:
        record = {"prompt_id": row.prompt_id, "sample": row.sample, "seed": row.seed, "prompt": row.prompt,
                  "category": row.category, "challenge": row.challenge, "image": row.image, "flag": flag}
        for col, (value, cut) in zip(columns, per_model):
            record[col.column], record[col.truncated] = value, cut
        records.append(record)
    return scores_table(records, metrics.extra_columns(columns))
