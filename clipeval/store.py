"""The run directory: what is written where, atomically, so that a killed run loses nothing.

Layout (the contract other commands build on)::

    DIR/images/{prompt_id:05d}_{sample:02d}.png
    DIR/scores.csv  DIR/prompts.csv  DIR/summary.json  DIR/manifest.json   the result set
    DIR/.clipeval/lock                 held (flock) by the live run; the kernel frees it on death
    DIR/.clipeval/journal-<rank>.jsonl one JSON line per finished batch
    DIR/.clipeval/run.json             the manifest of the invocation in progress

A batch is committed by appending one line to the journal (then fsync), after its images are on
disk. A line cut short by a kill is ignored, so a batch is either wholly done or redone. The
final tables are derived from the journal and written by temp file + rename: readers never see
half a file, and a rerun of the same command resumes from the journal.

The four result files are one set. ``manifest.json`` is written last and holds the sha256 of the
other three: it is the commit record. A failure anywhere in the final write leaves either the
previous set intact or files whose hashes disagree with the manifest, and ``load_run`` (the one
reader every command uses) refuses those, saying to rerun; rerunning completes the set.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from clipeval.errors import ClipevalError

STATE = ".clipeval"
IMAGE_NAME = re.compile(r"^\d+_\d+\.png$")
RESULT_FILES = ("scores.csv", "prompts.csv", "summary.json", "manifest.json")
PENDING = "run.json"
# How every reader parses scores.csv: empty strings stay strings (a prompt may be "NA"), an empty
# clip_score is a missing score (a NaN image).
SCORES_DTYPES = {"prompt": str, "category": str, "challenge": str, "image": str, "flag": str}


def image_name(prompt_id: int, sample: int) -> str:
    return f"{prompt_id:05d}_{sample:02d}.png"


@contextlib.contextmanager
def io_errors(path: Path):
    """An OSError while writing results (disk full, I/O error, permissions) becomes one line that
    says what to do; every write is atomic, so what was written before is intact."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err)
        if err.errno == errno.ENOSPC:
            reason += " (disk full)"
        raise ClipevalError(
            f"cannot write {path}: {reason}; files written before are intact: "
            "fix it, then rerun the same command to resume"
        ) from err


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync, rename: ``path`` is old or new, never half.
    (Not mkstemp: its files are 0600; results get the user's umask like any other file.)"""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    with io_errors(path):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def csv_bytes(frame) -> bytes:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, lineterminator="\n")
    return buffer.getvalue().encode("utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json_bytes(obj))


def write_csv(path: Path, frame) -> None:
    write_atomic(path, csv_bytes(frame))


def write_results(folder: Path, *, scores, prompts, summary: dict[str, Any] | None, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the result set; returns the manifest as written (with ``results``: file → sha256).

    ``summary`` None (no usable image) removes a previous summary.json, so no old summary stands
    beside new tables. The manifest goes last: until it is replaced, the hashes of the previous
    manifest no longer match whatever was already replaced, and readers refuse the folder."""
    files = {"scores.csv": csv_bytes(scores), "prompts.csv": csv_bytes(prompts)}
    if summary is not None:
        files["summary.json"] = json_bytes(summary)
    for name, data in files.items():
        write_atomic(folder / name, data)
    if summary is None:
        with io_errors(folder / "summary.json"):
            (folder / "summary.json").unlink(missing_ok=True)
    manifest = {**manifest, "results": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    write_json(folder / "manifest.json", manifest)
    return manifest


@dataclass
class RunRecord:
    """A finished run folder (``run``, ``score`` or ``evaluate(out=...)``), as every command reads it."""

    path: Path
    manifest: dict[str, Any]
    summary: dict[str, Any] | None
    scores: Any  # DataFrame: every row of scores.csv, flagged images included

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest.get("settings", {})

    @property
    def image_root(self) -> Path:
        """Where the ``image`` column is relative to: a ``score`` output points at what it scored."""
        if self.manifest.get("kind") != "score":
            return self.path
        source = self.manifest.get("source") or {}
        return Path(self.settings.get("rescored_from") or source.get("path") or self.path)


def load_run(path: str | Path) -> RunRecord:
    """Read a run folder whose result files are one complete set, or raise one line saying why
    and what to do."""
    import pandas as pd

    folder = Path(path).expanduser()
    rerun = "rerun the command that made it to complete it"
    if not folder.is_dir():
        raise ClipevalError(f"{path}: no such run folder")
    raw: dict[str, bytes] = {}
    try:
        raw["manifest.json"] = (folder / "manifest.json").read_bytes()
        manifest = json.loads(raw["manifest.json"])
        status = manifest.get("status")
        if status != "complete":  # 0.1.0 kept a running run's manifest here
            raise ClipevalError(f"{path}: the run is not finished (status: {status}); {rerun}")
        expected = manifest.get("results")
        # A 0.1.0 folder has no hashes: its scores.csv, and its summary.json where there is one.
        legacy = ["scores.csv"] + (["summary.json"] if (folder / "summary.json").exists() else [])
        for name in expected or legacy:
            raw[name] = (folder / name).read_bytes()
            if expected is not None and hashlib.sha256(raw[name]).hexdigest() != expected[name]:
                raise ClipevalError(
                    f"{path}: {name} does not belong with manifest.json (a final write was interrupted or failed); {rerun}"
                )
        header = pd.read_csv(io.BytesIO(raw["scores.csv"]), nrows=0).columns
        numeric = ["clip_score"] + [c for c in header if c.startswith("score:")]  # other scorers' columns
        scores = pd.read_csv(io.BytesIO(raw["scores.csv"]), keep_default_na=False, na_values={c: [""] for c in numeric},
                             dtype=SCORES_DTYPES)
        summary = json.loads(raw["summary.json"]) if "summary.json" in raw else None
    except FileNotFoundError as err:
        unfinished = (folder / STATE / PENDING).exists()
        raise ClipevalError(
            f"{path}: not a finished clipeval run ({Path(err.filename).name} missing)" + (f"; {rerun}" if unfinished else "")
        ) from err
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise ClipevalError(f"{path}: unreadable run files ({err}); {rerun}") from err
    missing = {"prompt_id", "sample", "seed", "prompt", "category", "challenge", "clip_score"} - set(scores.columns)
    if missing:
        raise ClipevalError(f"{path}/scores.csv: missing columns {', '.join(sorted(missing))}")
    if not pd.api.types.is_numeric_dtype(scores["clip_score"]):
        raise ClipevalError(f"{path}/scores.csv: clip_score is not numeric")
    for column in ("flag", "image"):
        if column not in scores.columns:
            scores[column] = ""
    return RunRecord(folder, manifest, summary, scores)


def check_parent(out: Path) -> None:
    """Fail before any model is loaded when the output folder cannot be created or written."""
    parent = out if out.exists() else out.parent
    while not parent.exists():
        parent = parent.parent
    if out.exists() and not out.is_dir():
        raise ClipevalError(f"--out {out}: exists and is not a folder")
    try:  # a real probe: permission bits say nothing for root or on a read-only mount
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise ClipevalError(f"--out {out}: {parent} is not writable ({err.strerror})") from err


@dataclass
class RunDir:
    path: Path
    rank: int = 0

    @property
    def images(self) -> Path:
        return self.path / "images"

    @property
    def state(self) -> Path:
        return self.path / STATE

    def manifest(self) -> dict[str, Any] | None:
        """The latest manifest: of an unfinished invocation if there is one, else the result set's."""
        for path in (self.state / PENDING, self.path / "manifest.json"):
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as err:
                raise ClipevalError(f"{path} is unreadable ({err}); use --overwrite") from err
        return None

    def start(self, manifest: dict[str, Any]) -> None:
        """Record the invocation in progress; the previous result set stays as it was."""
        with io_errors(self.state):
            self.state.mkdir(parents=True, exist_ok=True)
        write_json(self.state / PENDING, manifest)

    def finish(self, **results: Any) -> dict[str, Any]:
        """Commit the result set (see ``write_results``), then forget the invocation in progress."""
        manifest = write_results(self.path, **results)
        (self.state / PENDING).unlink(missing_ok=True)
        return manifest

    # -- claiming the folder ---------------------------------------------------------------------
    def lock(self) -> None:
        """Refuse a second live run into the same folder; a dead run's lock is free (flock)."""
        self.state.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ClipevalError(f"{self.path} is in use by a running clipeval (pid {holder}); wait for it to finish")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def check(self, settings: dict[str, Any], *, overwrite: bool) -> dict[str, Any] | None:
        """Read-only checks before any model is loaded: DIR is new, or a clipeval run made with the
        same settings (or ``overwrite``). Returns the previous manifest when there is progress to keep."""
        if not (self.path.exists() and any(self.path.iterdir())):
            return None
        if not ((self.path / "manifest.json").exists() or self.state.is_dir()):
            raise ClipevalError(f"--out {self.path} is not empty and is not a clipeval run folder; choose a new folder")
        if overwrite:
            return None
        existing = self.manifest()
        if existing is not None:
            self.check_settings(existing, settings)
        return existing

    def claim(self, settings: dict[str, Any], *, overwrite: bool) -> dict[str, Any] | None:
        """Take the folder once the models are loaded: lock it, check again under the lock (another
        run may have written meanwhile), and clear a previous run when ``overwrite``."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock()
        try:
            previous = self.check(settings, overwrite=overwrite)
            if overwrite:
                self.clear()
            self._remove_stale_temp_files()
            return previous
        except BaseException:
            self.release()
            raise

    def check_settings(self, manifest: dict[str, Any], settings: dict[str, Any]) -> None:
        diff = settings_diff(manifest.get("settings", {}), settings)
        if diff:
            raise ClipevalError(
                f"{self.path} holds a run with other settings ({'; '.join(diff)}): "
                "use another --out, or --overwrite to replace it"
            )

    def _remove_stale_temp_files(self) -> None:
        """Temp files of writes a kill interrupted, and failure notes of a previous multi-process
        invocation; safe under the lock, no writer is alive."""
        for note in self.state.glob("failed-*"):
            note.unlink(missing_ok=True)
        for folder in (self.path, self.images, self.state):
            if folder.is_dir():
                for tmp in folder.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove what a previous run wrote (and only that)."""
        for name in RESULT_FILES:
            (self.path / name).unlink(missing_ok=True)
        (self.state / PENDING).unlink(missing_ok=True)
        for journal in self.state.glob("journal-*.jsonl") if self.state.is_dir() else ():
            journal.unlink()
        if self.images.is_dir():
            for image in self.images.iterdir():
                if IMAGE_NAME.match(image.name):
                    image.unlink()

    # -- progress --------------------------------------------------------------------------------
    def done(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Rows of every committed batch, from every rank's journal; torn last lines are ignored."""
        return {(row["prompt_id"], row["sample"]): row for batch in self._journal() for row in batch}

    def _journal(self) -> list[list[dict[str, Any]]]:
        batches = []
        if self.state.is_dir():
            for journal in sorted(self.state.glob("journal-*.jsonl")):
                for line in journal.read_bytes().split(b"\n"):
                    try:
                        batches.append(json.loads(line)["rows"])
                    except (ValueError, KeyError, TypeError):
                        continue  # the torn tail of a killed write
        return batches

    def batches(self) -> list[list[tuple[int, int]]]:
        """The (prompt_id, sample) keys of each committed batch, in commit order: re-scoring in
        the same batches reproduces the run's scores bit for bit (embeddings depend, in the last
        float bits, on which images share a batch)."""
        return [[(row["prompt_id"], row["sample"]) for row in batch] for batch in self._journal()]

    def commit(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append one batch as one line, then fsync: the batch is done exactly when this returns."""
        path = self.state / f"journal-{self.rank}.jsonl"
        line = json.dumps({"rows": list(rows)}, ensure_ascii=False, allow_nan=False) + "\n"
        with io_errors(path):
            self.state.mkdir(exist_ok=True)
        with io_errors(path), open(path, "ab") as f:
            if f.tell() and not _ends_with_newline(path):
                f.write(b"\n")  # seal a torn line left by a kill, so this batch parses
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    # -- a failing rank tells the others ---------------------------------------------------------
    def signal_failure(self, message: str) -> None:
        """Best effort: the collective after the loop carries the message anyway, this only lets
        the other ranks stop at their next batch instead of finishing theirs first."""
        try:
            write_atomic(self.state / f"failed-{self.rank}", message.encode("utf-8"))
        except ClipevalError:
            pass

    def peer_failed(self) -> bool:
        return self.state.is_dir() and any(self.state.glob("failed-*"))

    def save_image(self, name: str, png: bytes) -> None:
        write_atomic(self.images / name, png)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


# Settings that name a file or folder: the same place is the same setting, however it is spelled.
PATH_SETTINGS = ("checkpoint", "base_model", "clip_model", "clip_processor", "clip_models", "scorers")


def canonical(spec: Any) -> Any:
    """A local path as its resolved absolute location (``models/sd-a/``, ``./models/sd-a`` and
    ``/abs/models/sd-a`` are one); hub ids, ``demo`` and None as they are; a list item by item."""
    if isinstance(spec, list):
        return [canonical(item) for item in spec]
    if not isinstance(spec, str) or spec in ("", "demo"):
        return spec
    path = Path(spec).expanduser()
    try:
        return str(path.resolve()) if path.exists() else spec
    except OSError:
        return spec


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two runs' settings (keys present in ``new``). Paths are
    compared by location, so a folder run made before paths were resolved still matches."""
    out = []
    for key, value in new.items():
        if key not in old:
            continue
        same = canonical(old[key]) == canonical(value) if key in PATH_SETTINGS else old[key] == value
        if not same:
            out.append(f"{key} {value!r} (was {old[key]!r})")
    return out
