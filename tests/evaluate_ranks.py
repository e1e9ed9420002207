"""A training script under torchrun that evaluates its pipeline in memory with
``evaluate(..., across_ranks=True)`` on every rank, after forming its own gloo group. Each rank
counts the images its pipeline made and prints its result as JSON. With ``FAIL_RANK=1`` that
rank's pipeline raises a plain RuntimeError (a CUDA error, a bug) on its second call.
Arguments: pipeline folder, CLIP folder, output folder, folder for each rank's rank<N>.json."""

import functools
import json
import os
import sys
from pathlib import Path

import closed_rank  # noqa: F401 - pid, stacks on SIGUSR1

import torch.distributed as dist
from diffusers import StableDiffusionPipeline

from clipeval import ClipScorer, evaluate

PROMPTS = ["a red cube on a table", "a cat", "the city at night", "a bowl of fruit", "a dog in the snow"]

pipeline, clip, out, said_dir = sys.argv[1:5]
dist.init_process_group("gloo")
rank = dist.get_rank()
pipe = StableDiffusionPipeline.from_pretrained(pipeline)
made, calls = [0], [0]
call = type(pipe).__call__


@functools.wraps(call)  # its signature: clipeval reads the pipeline's defaults from it
def counted(self, *args, **kwargs):
    calls[0] += 1
    if os.environ.get("FAIL_RANK") == str(rank) and calls[0] == 2:
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
    result = call(self, *args, **kwargs)
    made[0] += len(result.images)
    return result


type(pipe).__call__ = counted
try:
    result = evaluate(pipe, PROMPTS, clip=ClipScorer(clip), images_per_prompt=2, steps=2, batch_size=2, out=out,
                      across_ranks=True)
    said = {"rank": rank, "made": made[0], "scores": result.scores["clip_score"].tolist(),
            "mean": result.summary["clip/mean"]}
except Exception as err:  # noqa: BLE001 - what each rank says is the test's to read
    said = {"rank": rank, "made": made[0], "error": f"{type(err).__name__}: {err}"}
Path(said_dir, f"rank{rank}.json").write_text(json.dumps(said))
dist.destroy_process_group()
