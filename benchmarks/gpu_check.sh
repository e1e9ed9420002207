#!/usr/bin/env bash
# The GPU checks, for a lent H100/H200 (see benchmarks/gpu_check.py). The device image has torch,
# transformers, torchmetrics and NVML but not diffusers: its wheel travels in .whl/ (ignored),
# fetched here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform any -d .whl diffusers==0.42.1 importlib_metadata
# clipeval runs from the source tree; prompts/ is mapped to clipeval/libraries by a link, as the
# wheel would install it.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
ln -sfn ../prompts clipeval/libraries
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 CLIPEVAL_CACHE_DIR=/tmp/clipeval-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 benchmarks/gpu_check.py --out "${OUT:-.}" "$@" 2>&1 | tee "${OUT:-.}/gpu_log.txt"
