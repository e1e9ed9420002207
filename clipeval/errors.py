"""The one exception type users see, and the exit codes the CLI documents.

Anything raised as ``ClipevalError`` is a problem the user can fix (bad input, missing file,
model not found). The CLI prints its message as a single line and exits with ``EXIT_ERROR``;
every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1  # a quality gate (--fail-below, compare --fail-if-worse) was not met
EXIT_ERROR = 2  # bad input or environment: nothing was evaluated, or the run stopped
EXIT_INTERRUPTED = 130  # Ctrl-C; rerunning the same command resumes
EXIT_TERMINATED = 143  # SIGTERM (Slurm, systemd, Kubernetes, timeout); rerunning resumes


class ClipevalError(Exception):
    """A user-facing error: its message is the whole story, so no traceback is shown."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so every path that keeps finished work on
    Ctrl-C keeps it on SIGTERM too (what schedulers send before they kill)."""
