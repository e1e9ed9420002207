"""Image files → uint8 RGB pixels as transformers' processor sees them, decoded ahead of the model.

``clipeval score`` spends its first seconds on one core, importing torch and transformers and
loading the model. Decoding in that window is free, if it does not slow the imports: decoder
*threads* do, because every chunk of a PNG passes the GIL back and forth with the importing
thread (measured on 2 cores, 384 PNGs of 512²: the model was ready at 4.2-4.3 s with two threads,
at 3.2 s with one forked process, which had decoded all 384 by then). So where that window exists
(Linux, torch not imported yet, no other threads) the images of the first ``DECODE_AHEAD_BYTES``
are decoded by forked processes into one anonymous shared mapping: nothing is copied or pickled
between processes, nothing is named in ``/dev/shm``, and the memory goes with the last process
that maps it, however the run ends. The rest, and everything elsewhere (a training loop that has
torch loaded, macOS, Windows), is decoded on threads, which is as fast once the model runs: its
kernels release the GIL.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

DECODE_AHEAD_BYTES = 512 << 20  # decoded pixels held ahead of the model, at most (about)
MAX_PROCESSES = 8
_ALIGN = 64  # each image starts on a cache line of the shared mapping


class ImageProblem(Exception):
    pass


def read_rgb(path: Path):
    """uint8 ``(H, W, 3)`` RGB as a numpy array, the way transformers' processor would see the
    file. numpy and PIL only, so that it runs while torch is still being imported."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I;16") or image.mode == "I":
                # 16-bit grayscale: keep the high byte, as Pillow does for 16-bit RGB.
                high = (np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
                image = Image.fromarray(high, mode="L")
            elif image.mode == "F":
                raise ImageProblem("32-bit float images are not supported")
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, rgba)
            return np.array(image if image.mode == "RGB" else image.convert("RGB"))  # convert would copy
    except ImageProblem:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageProblem(str(err).splitlines()[0] if str(err) else type(err).__name__) from err


def load_rgb(path: Path):
    """uint8 ``(3, H, W)`` RGB tensor (channels-last in memory), as the scorers take it."""
    import torch

    return torch.from_numpy(read_rgb(path)).permute(2, 0, 1)


def _decode(path: Path):
    try:
        return read_rgb(path)
    except ImageProblem as err:
        return err


class Decoder:
    """Batches of image paths decoded in order, as far ahead of the model as ``ahead_bytes``
    allow (at least two batches), starting when made: make it before torch is imported. Without
    early processes, the interpreter switches threads every 0.1 ms instead of 5 until the first
    batch is taken, so that decoder threads waiting for the GIL between chunks of a PNG are not
    held up by the importing thread. Use it as a context manager: leaving stops the work, whatever
    was not consumed.

    ``processes``: how many forked processes decode the first batches (None: one a core but one,
    at most ``MAX_PROCESSES``, where forking is safe and useful; 0: threads only)."""

    def __init__(self, batches: Sequence[Sequence[Any]], workers: int, ahead_bytes: int = DECODE_AHEAD_BYTES,
                 *, path=lambda item: item, processes: int | None = None):
        import collections

        self._path = path
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self._batches = iter(batches)
        self._pending: collections.deque = collections.deque()
        self._window = max(2, ahead_bytes // max(1, _batch_bytes([path(i) for i in batches[0]] if batches else [])))
        processes = _processes() if processes is None else processes
        first = [path(item) for batch in batches[: self._window] for item in batch]
        self._early = None
        if processes > 0 and first:
            try:
                self._early = _Early(first, processes, 2 * ahead_bytes)
            except OSError:  # no room for the mapping (strict overcommit) or no process to be had: threads
                pass
        self._next = 0  # the next image's index among the early ones
        self._interval = sys.getswitchinterval()
        if self._early is None:
            sys.setswitchinterval(min(self._interval, 1e-4))
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._window and (batch := next(self._batches, None)) is not None:
            # Each batch's images, once asked for: map(getter, keys).
            if self._early is not None and self._next < self._early.count:
                keys, getter = range(self._next, self._next + len(batch)), self._early.get
                self._next += len(batch)
            else:
                keys = [self._pool.submit(_decode, self._path(item)) for item in batch]
                getter = concurrent.futures.Future.result
            self._pending.append((batch, getter, keys))

    def __iter__(self) -> Iterator[tuple[Sequence[Any], list[Any]]]:
        """Batches with their images: uint8 ``(3, H, W)`` tensors, or the ImageProblem."""
        import torch

        self._restore()
        while self._pending:
            batch, getter, keys = self._pending.popleft()
            self._fill()
            decoded = list(map(getter, keys))
            missing = {i: self._pool.submit(_decode, self._path(batch[i])) for i, d in enumerate(decoded) if d is None}
            for i, future in missing.items():  # early images that did not fit, or whose process died
                decoded[i] = future.result()
            yield batch, [d if isinstance(d, ImageProblem) else torch.from_numpy(d).permute(2, 0, 1) for d in decoded]
        if self._early is not None:
            self._early.close()

    def _restore(self) -> None:
        sys.setswitchinterval(self._interval)

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
        if self._early is not None:
            self._early.close()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _processes() -> int:
    """Early processes where they pay: on Linux (fork is cheap there), before torch is imported
    (the import window they fill; afterwards threads are as fast), with no other Python thread
    alive (a fork copies none of them, but copies any lock one holds). The children only read
    files, decode with PIL and copy with numpy: no BLAS, no torch, nothing of the parent's."""
    import threading

    if not sys.platform.startswith("linux") or "torch" in sys.modules or threading.active_count() > 1:
        return 0
    return max(1, min(MAX_PROCESSES, len(os.sched_getaffinity(0)) - 1))


class _Early:
    """Forked processes decoding ``paths`` into one anonymous shared mapping, process k taking
    every k-th image into its k-th part. Each tells the parent, through its pipe and in order,
    where an image lies, or why it could not be read; an image that does not fit, and every image
    after a process has died, is decoded by the caller instead."""

    def __init__(self, paths: list[Path], processes: int, arena_bytes: int):
        import mmap
        import multiprocessing

        import numpy  # noqa: F401 -- imported once here, not in every child
        import PIL.Image  # noqa: F401

        self.count = len(paths)
        self._arena = mmap.mmap(-1, max(_ALIGN, arena_bytes))  # MAP_SHARED | MAP_ANONYMOUS
        n = max(1, min(processes, len(paths)))
        part = len(self._arena) // n // _ALIGN * _ALIGN
        context = multiprocessing.get_context("fork")
        self._pipes, self._procs, self._got = [], [], [[] for _ in range(n)]
        try:
            for k in range(n):
                receive, send = context.Pipe(duplex=False)
                self._pipes.append(receive)
                args = (paths[k::n], self._arena, k * part, (k + 1) * part, send)
                proc = context.Process(target=_early_main, args=args, name=f"decode_{k}", daemon=True)
                proc.start()
                send.close()
                self._procs.append(proc)
        except BaseException:
            self.close()
            raise

    def get(self, index: int):
        """The ``index``-th image: a numpy view of the mapping, the ImageProblem, or None where
        the caller must decode it."""
        import numpy as np

        k, j = index % len(self._pipes), index // len(self._pipes)
        got = self._got[k]
        while len(got) <= j and self._pipes[k] is not None:
            try:
                got.append(self._pipes[k].recv())
            except (EOFError, OSError):  # the process is done (or gone): the caller decodes the rest
                self._pipes[k].close()
                self._pipes[k] = None
        message = got[j] if j < len(got) else ("missing",)
        if message[0] == "ok":
            _, offset, shape = message
            return np.frombuffer(self._arena, np.uint8, count=int(np.prod(shape)), offset=offset).reshape(shape)
        if message[0] == "problem":
            return ImageProblem(message[1])
        return None  # it did not fit, or its process died

    def close(self) -> None:
        """Stops the processes that are still decoding and reaps them all. The mapping stays
        while the images taken from it are in use, and goes with the last of them."""
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
            proc.close()
        self._procs = []
        for pipe in self._pipes:
            if pipe is not None:
                pipe.close()
        self._pipes = [None] * len(self._pipes)
        self._arena = None  # unmapped when the last image taken from it is dropped


def _early_main(paths: list[Path], arena, start: int, end: int, pipe) -> None:
    """One early process: decode, copy into its part of the mapping, say where. Quiet whatever
    happens (the parent decodes what it did not), and gone with Ctrl-C or with its parent."""
    import signal

    import numpy as np

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: a child just goes
    parent = os.getppid()
    offset = start
    try:
        for path in paths:
            if os.getppid() != parent:  # the parent was killed: nobody will read these
                break
            try:
                pixels = read_rgb(path)
            except ImageProblem as err:
                pipe.send(("problem", str(err)))
                continue
            if offset + pixels.nbytes > end:
                break  # full: the parent decodes this one and the rest
            np.frombuffer(arena, np.uint8, count=pixels.nbytes, offset=offset).reshape(pixels.shape)[...] = pixels
            pipe.send(("ok", offset, pixels.shape))
            offset += -(-pixels.nbytes // _ALIGN) * _ALIGN
    except BaseException:  # noqa: BLE001 -- a child says nothing; the parent falls back
        pass
    finally:
        pipe.close()


def _batch_bytes(paths: Sequence[Path]) -> int:
    """A batch's decoded size, guessed from the first readable image's header (no decoding)."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as image:
                return image.width * image.height * 3 * len(paths)
        except Exception:  # unreadable: the decoder will say why
            continue
    return 1
