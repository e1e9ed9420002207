"""Decoding ahead of the model: threads, and forked processes writing into shared memory."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

import clipeval.decode as decode

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="early processes are Linux's")


def _images(folder, n: int, size: int = 16) -> list:
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.png"
        Image.fromarray(np.full((size, size, 3), i, np.uint8)).save(path)
        paths.append(path)
    return paths


def _mixed_images(folder, n: int, size, seed: int = 0) -> list:
    """PNGs of the sizes ``size(i)``: RGB, but one RGBA (5), one gray (8) and one broken file (3)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.png"
        if i == 3:
            path.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
        elif i == 5:
            Image.fromarray(rng.integers(0, 255, (*size(i), 4), dtype=np.uint8), "RGBA").save(path)
        elif i == 8:
            Image.fromarray(rng.integers(0, 255, size(i), dtype=np.uint8), "L").save(path)
        else:
            Image.fromarray(rng.integers(0, 255, (*size(i), 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _logging_prelude(log, delay: float = 0.0) -> str:
    """Code for a subprocess: read_rgb appends the pid of whoever decodes to ``log``, then sleeps
    ``delay``."""
    return f"""
import os, time, clipeval.decode as decode
_read = decode.read_rgb
def read(path):
    with open({str(log)!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    time.sleep({delay})
    return _read(path)
decode.read_rgb = read
"""


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def _logged(monkeypatch, log, delay: float = 0.0, die_at: str | None = None):
    """read_rgb that appends ``pid name`` to ``log`` (from any process), sleeps ``delay``, and
    ends its process without a word at the image named ``die_at``."""
    original = decode.read_rgb

    def read(path):
        if path.name == die_at and os.getpid() != parent:
            os._exit(1)
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {path.name}\n")
        time.sleep(delay)
        return original(path)

    parent = os.getpid()
    monkeypatch.setattr(decode, "read_rgb", read)
    return lambda: [tuple(line.split()) for line in log.read_text().splitlines()] if log.exists() else []


def test_threads_decode_at_once_and_stay_within_their_memory_budget(tmp_path, monkeypatch):
    """Without early processes: as far ahead as the budget allows before anyone asks, then that
    far ahead of what was taken, every image in order; the GIL switches fast only until then."""
    paths = _images(tmp_path, 12)
    decoded = _logged(monkeypatch, tmp_path / "log")
    batches = [paths[i : i + 2] for i in range(0, 12, 2)]  # 16·16·3·2 = 1536 bytes a batch
    before = sys.getswitchinterval()
    with decode.Decoder(batches, workers=2, ahead_bytes=3 * 1536, processes=0) as decoder:
        assert sys.getswitchinterval() == pytest.approx(1e-4)  # decoders get the GIL while the caller imports
        _wait_for(lambda: len(decoded()) == 6)
        assert sorted(name for _, name in decoded()) == [p.name for p in paths[:6]]  # three batches, unasked
        assert {pid for pid, _ in decoded()} == {str(os.getpid())}
        got = []
        for batch, images in decoder:
            assert sys.getswitchinterval() == before
            assert len(decoded()) <= 6 + 2 * (len(got) + 1)  # at most three batches beyond what was taken
            got += [(path.name, int(img[0, 0, 0]), tuple(img.shape)) for path, img in zip(batch, images)]
    assert got == [(p.name, i, (3, 16, 16)) for i, p in enumerate(paths)]
    assert sys.getswitchinterval() == before


def test_leaving_the_threads_early_stops_their_work(tmp_path, monkeypatch):
    """A model that fails to load must not leave the process decoding the rest of the folder."""
    paths = _images(tmp_path, 40)
    started, release = [], threading.Event()
    original = decode.read_rgb

    def slow(path):
        started.append(path.name)
        release.wait(10)
        return original(path)

    monkeypatch.setattr(decode, "read_rgb", slow)
    batches = [paths[i : i + 4] for i in range(0, 40, 4)]
    with pytest.raises(RuntimeError):
        with decode.Decoder(batches, workers=2, processes=0):
            _wait_for(lambda: len(started) == 2)
            threading.Timer(0.2, release.set).start()
            raise RuntimeError("the model did not load")
    assert len(started) == 2  # the two in progress finished; the 38 queued never started


@pytest.mark.parametrize("processes", [1, 3])
def test_early_processes_decode_the_first_batches_and_give_the_same_pixels(tmp_path, monkeypatch, processes):
    """The budget's batches are decoded by other processes before anyone asks, the rest on the
    caller's threads; every image arrives in order, byte for byte what read_rgb gives, whatever
    its mode or size, and an unreadable file is its ImageProblem in its place."""
    paths = _mixed_images(tmp_path, 14, lambda i: (16, 16 + i % 3))
    expected = [decode._decode(p) for p in paths]
    decoded = _logged(monkeypatch, tmp_path / "log")
    batches = [paths[i : i + 2] for i in range(0, 14, 2)]
    with decode.Decoder(batches, workers=2, ahead_bytes=4 * 2 * 16 * 16 * 3, processes=processes) as decoder:
        _wait_for(lambda: len(decoded()) == 8)  # four batches, by the first image's size
        time.sleep(0.1)
        assert sorted(name for pid, name in decoded()) == [p.name for p in paths[:8]]
        assert len({pid for pid, _ in decoded()}) == processes and str(os.getpid()) not in dict(decoded())
        got = [img for _, images in decoder for img in images]
    assert sorted(name for pid, name in decoded() if pid == str(os.getpid())) == [p.name for p in paths[8:]]
    assert len(got) == 14
    for image, want in zip(got, expected):
        if isinstance(want, decode.ImageProblem):
            assert isinstance(image, decode.ImageProblem) and str(image) == str(want)
        else:
            assert np.array_equal(image.permute(1, 2, 0).numpy(), want)


def test_an_early_process_that_dies_or_runs_out_of_room_leaves_its_images_to_the_caller(tmp_path, monkeypatch):
    """Images bigger than the first leave the shared mapping short, and a process that dies
    says nothing: the caller decodes what is missing, and every image still arrives right."""
    paths = _images(tmp_path, 6, size=8)  # the first sets the guess
    for i in range(6, 12):
        path = tmp_path / f"{i:05d}.png"
        Image.fromarray(np.full((40, 40, 3), i, np.uint8)).save(path)  # 25× the first: no room
        paths.append(path)
    decoded = _logged(monkeypatch, tmp_path / "log", die_at="00004.png")
    batches = [paths[i : i + 2] for i in range(0, 12, 2)]
    with decode.Decoder(batches, workers=2, ahead_bytes=6 * 2 * 8 * 8 * 3, processes=2) as decoder:
        got = [(int(img[0, 0, 0]), tuple(img.shape)) for _, images in decoder for img in images]
    assert got == [(i, (3, 8, 8)) for i in range(6)] + [(i, (3, 40, 40)) for i in range(6, 12)]
    by_caller = {name for pid, name in decoded() if pid == str(os.getpid())}
    # process 0 (images 0, 2, 4, ...) died at 4; process 1 (1, 3, 5, ...) had no room from 7 on
    assert by_caller == {"00004.png", "00006.png", "00008.png", "00010.png", "00007.png", "00009.png", "00011.png"}


def test_leaving_early_stops_the_processes_at_once(tmp_path, monkeypatch):
    import multiprocessing

    paths = _images(tmp_path, 20)
    decoded = _logged(monkeypatch, tmp_path / "log", delay=5.0)
    started = time.monotonic()
    with pytest.raises(RuntimeError):
        with decode.Decoder([paths[i : i + 4] for i in range(0, 20, 4)], workers=2, processes=2):
            _wait_for(lambda: len(decoded()) == 2)
            raise RuntimeError("the model did not load")
    assert time.monotonic() - started < 4  # not the 5 s of the images in progress
    assert not multiprocessing.active_children()  # killed and reaped


def test_early_processes_end_with_a_killed_parent(tmp_path):
    """kill -9 of the command: its decoding processes stop by themselves (nothing is left running)."""
    import signal
    import subprocess

    _images(tmp_path, 30)
    log = tmp_path / "log"
    code = _logging_prelude(log, delay=0.2) + f"""
import pathlib
paths = sorted(pathlib.Path({str(tmp_path)!r}).glob("*.png"))
with decode.Decoder([paths[i : i + 3] for i in range(0, 30, 3)], workers=1):
    time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        _wait_for(lambda: log.exists() and len(log.read_text().split()) >= 2)
        children = set(log.read_text().split()) - {str(parent.pid)}
        assert len(children) >= 1, "no early process decoded"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        _wait_for(lambda: not any(_running(pid) for pid in children), seconds=5)
        assert not any(_running(pid) for pid in children)
    finally:
        parent.kill()


def _running(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_the_executable_decodes_in_early_processes_and_scores_as_threads_do(cli, models, tmp_path):
    """`clipeval score` as a fresh process (early processes, as users run it) writes the same
    scores.csv, byte for byte, as the same command in a process that already has torch (threads):
    mixed sizes, RGBA, gray, a broken file, quotes, a tab and emoji in the prompts."""
    import json

    from conftest import run_subprocess

    images = tmp_path / "images"
    images.mkdir()
    prompts = ['a "quoted" cube,\ton a table', "東京の夜景 🌃", "Ελληνικά", "x"]
    paths = _mixed_images(images, 24, lambda i: (40 + 8 * (i % 3), 32 + 4 * (i % 5)), seed=3)
    rows = [{"image": p.name, "prompt": prompts[i % 4]} for i, p in enumerate(paths)]
    mapping = tmp_path / "map.jsonl"
    mapping.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    log = tmp_path / "pids"
    prelude = _logging_prelude(log) + f"""
with open({str(log)!r}, "a") as f:
    f.write(f"main {{os.getpid()}}\\n")
"""
    args = ["score", images, "--prompts", mapping, "--clip-model", models.clip, "--batch-size", "4", "--quiet"]
    done = run_subprocess([*args, "--out", tmp_path / "fresh"], prelude=prelude)
    assert done.returncode == 0, done.stderr
    main, *decoders = log.read_text().splitlines()
    assert len(decoders) == 24 and main.split()[1] not in decoders  # all decoded by other processes
    assert cli(*args, "--out", tmp_path / "warm").exit_code == 0
    assert (tmp_path / "fresh" / "scores.csv").read_bytes() == (tmp_path / "warm" / "scores.csv").read_bytes()
