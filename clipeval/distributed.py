"""Several processes (``accelerate launch``, ``torchrun``, Slurm through accelerate's config).

A run is cut into fixed batches once, from the full list of work items; the batches still to do
are dealt round-robin to the ranks. Each rank journals its batches in its own file; rank 0 claims
the folder, and merges all journals at the end. Because a batch is the same whoever computes it,
the result equals a single-process run, and a run resumes with any number of processes.

Every collective step also carries errors: when rank 0 cannot claim the folder, or any rank fails
to load its models or in its loop, with any exception, every rank raises the same
``ClipevalError`` naming the failing rank, instead of waiting at a collective. A rank that fails
in the loop also leaves a note in the run folder's state (``failed-<rank>``), which the other
ranks look for between batches: they stop within one batch, keeping what they committed, and the
same command resumes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from clipeval.errors import ClipevalError

T = TypeVar("T")


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    state: Any = None  # accelerate.PartialState when launched in several processes
    settled: bool = False  # every rank passed the last all_ok: close() waits for all

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> str:
        if self.state is None:
            return "auto"
        device = str(self.state.device)
        return "cpu" if device.startswith("cpu") else device

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0; every rank gets its result, or raises its error."""
        outcome: list[Any] = [None]
        if self.main:
            try:
                outcome = [("ok", fn())]
            except Exception as err:  # noqa: BLE001 - every rank must hear of it
                if self.state is None:
                    raise
                outcome = [("error", report(err))]
        if self.state is not None:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(outcome, from_process=0)
        kind, value = outcome[0]
        if kind == "error":
            raise ClipevalError(value if self.main else f"rank 0: {value}")
        return value

    def close(self) -> None:
        """Once every rank has passed the last ``all_ok(..., last=True)``, they all wait here for
        each other (rank 0 writes the tables meanwhile), as torch advises before a group is
        destroyed: a rank that tore its group down while its peer was still writing left that peer
        hanging once in CI (two nodes). After an error no rank waits: a peer may be dead, or
        stopped elsewhere. The group itself is destroyed at exit (see ``ranks``)."""
        if self.state is not None and self.settled:
            try:
                self.state.wait_for_everyone()
            except RuntimeError:  # a peer died meanwhile (killed while writing): nobody left to wait for
                pass

    def all_ok(self, error: str | None, *, last: bool = False) -> None:
        """Every rank says whether its part failed; if any did, every rank raises. After the
        ``last`` one passes, the only collective left is ``close``'s barrier."""
        errors = [error] if self.state is None else gather(error, self.rank, resumable=True)
        if self.world == 1 and error:
            raise ClipevalError(error)
        raise_first(errors)
        self.settled = last


def joined() -> tuple[int, int]:
    """(rank, world size) in the process group the caller formed, or (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(value: Any, rank: int, *, resumable: bool = False) -> list[Any]:
    """Every rank's ``value``, on every rank, over the process group."""
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(values, value)
    except RuntimeError as err:  # a peer died without a word (kill -9, out of host memory)
        raise ClipevalError(
            f"rank {rank}: another process of this run died without a word (killed, or out of host memory?); "
            "the launcher's log says which" + ("; rerun the same command to resume" if resumable else "")
        ) from err
    return values


def raise_first(errors: list[str | None]) -> None:
    """The first rank's error, raised on every rank, with that rank's number."""
    failed = [(rank, e) for rank, e in enumerate(errors) if e]
    if failed:
        rank, message = failed[0]
        raise ClipevalError(f"rank {rank}: {message}")


def report(err: BaseException) -> str:
    """A failure on this rank, for every rank: a bug's or a device error's traceback on this rank's
    stderr, for the bug report (a user error's message is the whole story), and the one line
    every rank will print."""
    if not isinstance(err, ClipevalError):
        import sys
        import traceback

        traceback.print_exception(err, file=sys.stderr)
    return describe(err)


def describe(err: BaseException) -> str:
    """One line for another rank to print: a user error as it is, anything else with its type
    (its traceback is printed by the rank it happened on)."""
    if isinstance(err, ClipevalError):
        return str(err)
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def ranks() -> Ranks:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    formed = dist.is_available() and dist.is_initialized()  # by a training script that calls run
    # Without cpu=True, accelerate ignores torchrun's environment on a machine with no CUDA and
    # every process would think it is alone; with it, the processes form a gloo group.
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    state = PartialState(cpu=cpu)
    if not formed and dist.is_initialized():
        # Ours: destroyed at exit, not after each run, so a script may call run again (accelerate
        # keeps its state, and would not form a group twice). Left to interpreter exit, gloo's
        # threads were torn down by static destructors, and a rank could abort ("terminate called
        # without an active exception", exit status 134) after its work was done. A group a
        # training script formed is its own: it stays up for its training.
        import atexit

        atexit.register(_destroy_group)
    return Ranks(state.process_index, state.num_processes, state)


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
