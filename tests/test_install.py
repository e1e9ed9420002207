"""The package as users install it: a wheel (not the source tree), carrying the built-in libraries."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_wheel_install_carries_the_prompt_libraries_and_runs_the_demo(tmp_path):
    dist, site = tmp_path / "dist", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, REPO], check=True)
    wheel = next(dist.glob("clipeval-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel], check=True)
    env = {**os.environ, "PYTHONPATH": str(site)}

    def clipeval(*args):
        return subprocess.run([sys.executable, "-m", "clipeval", *map(str, args)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import clipeval; print(clipeval.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where  # the wheel, not the checkout
    assert (site / "clipeval" / "libraries" / "smoke.tsv").is_file()
    listed = clipeval("libraries")
    assert listed.returncode == 0 and "parti" in listed.stdout and "smoke" in listed.stdout
    smoke = clipeval("prompts", "smoke")
    assert smoke.returncode == 0 and len(smoke.stdout.splitlines()) == 17
    run = clipeval("run", "--checkpoint", "demo", "--clip-model", "demo", "--prompt-library", "smoke",
                   "--out", tmp_path / "demo", "--limit", "2", "--steps", "2", "--quiet")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "demo" / "summary.json").is_file()
