"""A training script under torchrun that calls ``clipeval.run`` twice, as an evaluation between
steps, on every rank: with its own process group formed first (``FORM_GROUP=1``, then an
all_reduce after each evaluation, as training goes on), or with none (clipeval forms its own,
each time). Arguments: checkpoint, CLIP model, output folder."""

import os
import sys
from pathlib import Path

import closed_rank  # noqa: F401 - pid, stacks on SIGUSR1, group state at exit

import clipeval

checkpoint, clip, out = sys.argv[1:4]
formed = os.environ.get("FORM_GROUP") == "1"
if formed:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
rank = os.environ["RANK"]
for step in (1, 2):
    result = clipeval.run(clipeval.RunConfig(
        checkpoint=checkpoint, clip_model=clip, prompt_library="smoke", out=Path(out) / f"step{step}", limit=3,
        images_per_prompt=2, batch_size=2, steps=2, progress=False))
    said = f"rank {rank}: evaluation {step}: " + ("no result" if result is None else f"{result.summary['clip/mean']:.6f}")
    if formed:
        total = torch.ones(1)
        dist.all_reduce(total)  # training goes on with its own group
        said += f", all_reduce {total.item():.0f}"
    print(said, file=sys.stderr, flush=True)
if formed:
    dist.destroy_process_group()
