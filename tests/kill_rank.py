"""``clipeval`` whose rank 1 kills itself (SIGKILL) after committing its first batch: a node dying
in the middle of a multi-process run. Launched by torchrun or accelerate in tests."""

import os
import signal

import closed_rank  # noqa: F401 - records its pid, prints its stack on SIGUSR1

import clipeval.store as store

if os.environ.get("RANK") == "1":
    _commit = store.RunDir.commit

    def commit(self, rows):
        _commit(self, rows)
        os.kill(os.getpid(), signal.SIGKILL)

    store.RunDir.commit = commit

from clipeval.cli import entry  # noqa: E402

entry()
