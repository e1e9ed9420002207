"""``clipeval`` whose rank 1 raises a plain RuntimeError (not a ClipevalError: what a CUDA error or
a bug looks like): while loading CLIP (FAIL_AT=load) or after committing its first batch
(FAIL_AT=loop, the default). Launched by torchrun in tests."""

import os

import closed_rank  # noqa: F401 - reports at exit whether the process group was destroyed

import clipeval.score as score
import clipeval.store as store

MESSAGE = "CUDA error: an illegal memory access was encountered (injected)"

if os.environ.get("RANK") == "1":
    if os.environ.get("FAIL_AT") == "load":
        def __init__(self, *args, **kwargs):
            raise RuntimeError(MESSAGE)

        score.ClipScorer.__init__ = __init__
    else:
        _commit = store.RunDir.commit

        def commit(self, rows):
            _commit(self, rows)
            raise RuntimeError(MESSAGE)

        store.RunDir.commit = commit

from clipeval.cli import entry  # noqa: E402

entry()
