"""Shared fixtures: tiny random models built once per session, and CLI helpers.

No test downloads anything: the hub is offline, the cache is a temporary folder, and the
public prompt files come from ``../shared/data`` through ``CLIPEVAL_LIBRARY_MIRROR``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Beside the checkout; mutation testing runs the suite from mutants/, one level deeper.
SHARED_DATA = next((p for p in (REPO.parent / "shared" / "data", REPO.parent.parent / "shared" / "data") if p.is_dir()),
                   REPO.parent / "shared" / "data")

# One torch thread per xdist worker, and per mutant under mutmut (--max-children, from mutants/): with one
# process per core, torch's default of a thread per core oversubscribes the machine, and a 2-core machine
# ran test_run and test_training 2.6x slower (108 s against 42 s). The variable reaches the subprocesses
# the tests start, which run beside the other worker.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 or REPO.name == "mutants":
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Before anything imports huggingface_hub: never reach the network, never touch ~/.cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("CLIPEVAL_LIBRARY_MIRROR", None)
_CACHE = tempfile.mkdtemp(prefix="clipeval-test-cache-")
os.environ["CLIPEVAL_CACHE_DIR"] = _CACHE
os.environ["HF_HUB_CACHE"] = os.path.join(_CACHE, "hf-hub")  # an empty hub cache the tests may fill


def pytest_configure(config):
    """Under --dist loadgroup, xdist 3.8 groups a module by a suffix it writes into each node id, which
    pytest 9.2 ignores (pytest-xdist#1386): the marked modules' whole-run fixtures are then built on every
    worker and the suite quietly takes minutes longer. Stop instead."""
    from importlib.metadata import version

    if config.getoption("dist", "no") != "loadgroup" or hasattr(config, "workerinput"):
        return
    major_minor = lambda name: tuple(int(x) for x in version(name).split(".")[:2])  # noqa: E731
    if major_minor("pytest") >= (9, 2) and major_minor("pytest-xdist") <= (3, 8):
        raise pytest.UsageError(f"pytest {version('pytest')} with pytest-xdist {version('pytest-xdist')} does not "
                                "group --dist loadgroup (pytest-xdist#1386): pip install -e '.[test]' for its pytest")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "PartiPrompts.tsv").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide the public prompt files in {SHARED_DATA}")
        pytest.skip(f"public prompt files not found in {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def mirror(shared_data, monkeypatch) -> Path:
    """Built-in downloadable libraries resolve from the shared copies, as from an offline mirror."""
    monkeypatch.setenv("CLIPEVAL_LIBRARY_MIRROR", str(shared_data))
    return shared_data


# Under mutmut every mutant is a pytest session of its own: the tiny models (demo.py and tiny_vlms.py, never
# mutated) are built once into mutants/.tiny-models and reused, not rebuilt (seconds) for each mutant; the
# folder is named by those two files' hash, so models of older code are never reused.
def _builders_hash() -> str:
    import hashlib

    files = (REPO / "clipeval" / "demo.py", Path(__file__).with_name("tiny_vlms.py"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


_KEEP = REPO / ".tiny-models" / _builders_hash() if REPO.name == "mutants" else None


def _built(path: Path, build) -> Path:
    if _KEEP is None:
        return build(path)
    if not path.is_dir():
        part = path.with_name(f".{path.name}-{os.getpid()}")
        shutil.rmtree(part, ignore_errors=True)
        part.parent.mkdir(parents=True, exist_ok=True)
        build(part)
        try:
            part.rename(path)  # whole or not at all; a folder another mutant finished first stays
        except OSError:
            shutil.rmtree(part, ignore_errors=True)
    return path


class TinyModels:
    """Tiny CLIP, tiny SD and tiny SDXL, saved with save_pretrained: every test loads them
    through the same from_pretrained code paths a real checkpoint goes through. Each is built on
    first use, once per session: a test of the scorer alone never pays for two pipelines."""

    def __init__(self, root: Path):
        self.root = root

    @functools.cached_property
    def clip(self) -> Path:
        from clipeval import demo

        return _built(self.root / "clip", demo.build_clip)

    @functools.cached_property
    def clip2(self) -> Path:
        from clipeval import demo

        return _built(self.root / "clip2", functools.partial(demo.build_clip, seed=7))

    @functools.cached_property
    def sd(self) -> Path:
        from clipeval import demo

        return _built(self.root / "sd", demo.build_sd)

    @functools.cached_property
    def sdxl(self) -> Path:
        from clipeval import demo

        return _built(self.root / "sdxl", demo.build_sdxl)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> TinyModels:
    return TinyModels(_KEEP or tmp_path_factory.mktemp("models"))


TRICKY_PROMPTS = [
    'a sign that says "hello, world"',
    "a cat\twith a tab in its description",
    "un café à Paris, 東京の夜景 and a 🐱 emoji",
    "a 'single-quoted' prompt; with; semicolons",
    " leading and trailing spaces ",
    "an extremely long prompt " + " ".join(f"word{i}" for i in range(120)),
]


@pytest.fixture(scope="session")
def vlms(tmp_path_factory) -> dict[str, Path]:
    """Tiny random vision-language models of two families (tests/tiny_vlms.py), saved once."""
    import tiny_vlms

    root = _KEEP or tmp_path_factory.mktemp("vlms")
    return {"llava": _built(root / "llava", tiny_vlms.build_llava), "smolvlm": _built(root / "smolvlm", tiny_vlms.build_smolvlm)}


@pytest.fixture
def tricky_csv(tmp_path) -> Path:
    import csv

    path = tmp_path / "tricky.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["caption", "Category"])
        for i, prompt in enumerate(TRICKY_PROMPTS):
            writer.writerow([prompt, "odd" if i % 2 else "even"])
    return path


@pytest.fixture
def cli():
    """Run the CLI in-process; returns click's Result (stdout and stderr kept apart)."""
    from click.testing import CliRunner

    from clipeval.cli import main

    def invoke(*args: str):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.fixture
def run_tiny(cli, models):
    """``clipeval run`` on the tiny SD and CLIP with fast settings; extra args override."""

    def invoke(out: Path, *extra: str, library: str | Path = "smoke", checkpoint: Path | str | None = None):
        return cli(
            "run",
            "--checkpoint", checkpoint or models.sd,
            "--clip-model", models.clip,
            "--prompt-library", library,
            "--out", out,
            "--steps", "2",
            "--quiet",
            *extra,
        )

    return invoke


def assert_user_error(result, *needles: str) -> None:
    """A user error: exit 2, one line on stderr naming the problem, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 or lines[0].startswith("Usage:"), result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def run_subprocess(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300, prelude: str = ""):
    """``python -c <prelude>; clipeval.cli.entry()`` in a real process (kill -9, exit codes): the
    entry point of the ``clipeval`` executable and of ``python -m clipeval``."""
    code = f"{prelude}\nfrom clipeval.cli import entry\nentry()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def cache_repo(repo_id: str, folder: Path, commit: str = "a" * 40, *, ref: str = "main", skip: tuple[str, ...] = ()) -> str:
    """Lay out one revision of a hub repo in the (test) Hugging Face cache, as a download would have:
    ``folder``'s files but those named in ``skip``, under ``commit``, which ``ref`` points to. A file
    looked for and not in the repo is marked in ``.no_exist``, as huggingface_hub marks it."""
    root = Path(os.environ["HF_HUB_CACHE"], "models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    if not snapshot.is_dir():
        shutil.copytree(folder, snapshot, ignore=lambda _, names: [n for n in names if n in skip])
        for name in skip:
            (root / ".no_exist" / commit).mkdir(parents=True, exist_ok=True)
            (root / ".no_exist" / commit / name).touch()
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return commit


def files_of(run_dir: Path) -> dict[str, bytes]:
    """The result files that must be identical between equivalent runs (not the manifest's times)."""
    names = ["scores.csv", "prompts.csv", "summary.json"]
    out = {name: (run_dir / name).read_bytes() for name in names}
    for image in sorted((run_dir / "images").glob("*.png")):
        out[f"images/{image.name}"] = image.read_bytes()
    return out
