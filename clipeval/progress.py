"""Progress that says something from the first second: what is loading and how big it is, the
denoising step inside a batch, and, where stderr is a log file rather than a terminal, a line
every so often with images/s and the time left instead of carriage returns a log cannot show."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

EVERY_S = 30.0  # a log line at most this often; CLIPEVAL_PROGRESS_SECONDS overrides it


def size_of(location: str) -> str:
    """The bytes of a local file or folder, readably; "from the hub" for a hub id."""
    path = Path(location).expanduser()
    if not path.exists():
        return "from the hub or its cache"
    total = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    for unit in ("B", "kB", "MB", "GB"):
        if total < 1000 or unit == "GB":
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1000
    return f"{total:.1f} TB"


def say(message: str) -> None:
    print(f"clipeval: {message}", file=sys.stderr, flush=True)


def bar(*, total: int, initial: int, desc: str, enabled: bool):
    """tqdm on a terminal; ``LogLines`` when stderr is a file or a pipe (cron, Slurm, CI)."""
    from tqdm.auto import tqdm

    if enabled and not _tty():
        return LogLines(total=total, initial=initial, desc=desc)
    return tqdm(total=total, initial=initial, unit="img", desc=desc, disable=not enabled, dynamic_ncols=True)


def _tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class LogLines:
    """The part of tqdm's interface the run uses, writing whole lines: ``desc: 12/64 images (19%),
    0.80 img/s, ETA 1m05s`` at most every ``every`` seconds, and once at the end."""

    def __init__(self, *, total: int, initial: int = 0, desc: str = "", every: float | None = None) -> None:
        self.total, self.n, self.start_n, self.desc = total, initial, initial, desc
        self.every = float(os.environ.get("CLIPEVAL_PROGRESS_SECONDS", EVERY_S)) if every is None else every
        self.started = self.last = time.monotonic()
        self.postfix = ""
        say(f"{desc}: {self.n}/{self.total} images to start with")

    def update(self, n: float = 1) -> None:
        self.n += n
        self._maybe_say()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text
        self._maybe_say()

    def _maybe_say(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        done, elapsed = self.n - self.start_n, now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else None
        eta = "?" if left is None else _duration(left)
        share = 100 * self.n / self.total if self.total else 100
        extra = f", {self.postfix}" if self.postfix and self.n < self.total else ""
        say(f"{self.desc}: {self.n}/{self.total} images ({share:.0f}%), {rate:.2f} img/s, ETA {eta}{extra}")

    def close(self) -> None:
        # Once, and only when something was done: a resume with nothing left said it at the start.
        if self.n != getattr(self, "_closed_at", None) and self.n > self.start_n:
            self._closed_at = self.n
            self.postfix = ""
            self._maybe_say(force=True)

    def __enter__(self) -> "LogLines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
