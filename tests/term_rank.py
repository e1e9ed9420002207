"""``clipeval`` under torchrun whose rank 0, after committing its first batch, sends SIGTERM to
the launcher: what Slurm, systemd or Kubernetes do to a job. torchrun passes it on to every
worker. Launched by the multi-process tests."""

import os
import signal

import closed_rank  # noqa: F401 - records its pid, prints its stack on SIGUSR1

import clipeval.store as store

if os.environ.get("RANK") == "0":
    _commit = store.RunDir.commit

    def commit(self, rows):
        _commit(self, rows)
        if not getattr(commit, "sent", False):
            commit.sent = True
            os.kill(os.getppid(), signal.SIGTERM)  # the torchrun agent

    store.RunDir.commit = commit

from clipeval.cli import entry  # noqa: E402

entry()
