"""Work items and batched generation with one seed per image.

A CPU ``torch.Generator`` (mt19937) keeps only the low 32 bits of its seed, so the whole seed of an
image must live in 32 bits. It depends only on ``--seed``, its prompt_id and its sample index::

    seed = (prompt_id · 2¹² + sample) XOR bitreverse32(base_seed)

- ``--seed 0`` gives ``prompt_id · 2¹² + sample``: the images of runs made before this scheme
  (whose formula put the base seed in bits the generator drops) are unchanged for seed 0.
- Within a run every image has its own seed (XOR with a constant is a bijection).
- The base seed's low bits land in the seed's high bits, which prompt ids only reach in huge
  libraries: two base seeds whose lowest differing bit is ``j`` share no seed among images with
  ``prompt_id < 2^(19 − j)``. Consecutive seeds (j = 0) never share one below 524,288 prompts; any
  two seeds below 256 never share one below 4,096 prompts (every built-in library but ``hpsv2``
  needs fewer, and seeds below 128 cover it).

An image is therefore the same whatever the batch size, order, ``--limit``,
``--images-per-prompt`` or number of processes. Each image gets its own CPU ``torch.Generator``,
so its initial noise is identical on every device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from clipeval.errors import ClipevalError
from clipeval.prompts import PromptLibrary

MAX_SEED = 2**31 - 1
MAX_PROMPTS = 2**20
MAX_SAMPLES = 2**12
# Version of the formula above, recorded in the manifest. Scheme 1 (clipeval 0.1.0) was
# base_seed·2³² + prompt_id·2¹² + sample: the generator dropped the base seed, so every --seed
# gave the images of --seed 0. Runs made under it are resumed only when their seed was 0.
SEED_SCHEME = 2
SEED_FORMULA = "seed = (prompt_id * 2**12 + sample) XOR bitreverse32(base_seed)"


def bitreverse32(value: int) -> int:
    return int(f"{value:032b}"[::-1], 2)


def image_seed(base_seed: int, prompt_id: int, sample: int) -> int:
    """The seed of one image, below 2³²: every bit of it reaches the CPU generator."""
    if not 0 <= base_seed <= MAX_SEED:
        raise ValueError(f"seed {base_seed} outside [0, {MAX_SEED}]")
    if not 0 <= prompt_id < MAX_PROMPTS or not 0 <= sample < MAX_SAMPLES:
        raise ValueError(f"prompt_id {prompt_id} or sample {sample} out of range")
    return ((prompt_id << 12) | sample) ^ bitreverse32(base_seed)


@dataclass(frozen=True)
class WorkItem:
    prompt_id: int
    sample: int
    seed: int
    prompt: str
    category: str
    challenge: str

    @property
    def key(self) -> tuple[int, int]:
        return (self.prompt_id, self.sample)


def work_items(library: PromptLibrary, *, images_per_prompt: int, seed: int) -> list[WorkItem]:
    """Every (prompt, sample) in prompt order, the order of every output file."""
    if len(library.prompts) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts")
    return [
        WorkItem(p.prompt_id, s, image_seed(seed, p.prompt_id, s), p.prompt, p.category, p.challenge)
        for p in library.prompts
        for s in range(images_per_prompt)
    ]


def batches(items: Sequence[WorkItem], size: int) -> Iterator[list[WorkItem]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


@dataclass(frozen=True)
class GenerationSettings:
    steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompt: str | None


def generate(pipe: Any, batch: Sequence[WorkItem], settings: GenerationSettings, on_step=None):
    """Images of ``batch`` as uint8 ``(B, 3, H, W)`` on the pipeline's device, as they will be saved,
    and a flag per image: "nan" (non-finite pixels, e.g. a float16 overflow), "nsfw" (the pipeline's
    safety checker blanked it), "black" (every pixel 0), or "" for a usable image."""
    import torch

    kwargs: dict[str, Any] = {}
    if settings.negative_prompt is not None:
        kwargs["negative_prompt"] = [settings.negative_prompt] * len(batch)
    if on_step is not None and _takes_step_callback(pipe):
        # ``on_step(step, steps)`` after each denoising step: progress inside a batch
        kwargs["callback_on_step_end"] = lambda _pipe, i, _t, tensors: (on_step(i + 1, settings.steps), tensors)[1]
    with torch.inference_mode():
        try:
            output = pipe(
                prompt=[item.prompt for item in batch],
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                height=settings.height,
                width=settings.width,
                generator=[torch.Generator("cpu").manual_seed(item.seed) for item in batch],
                output_type="pt",
                **kwargs,
            )
        except ValueError as err:  # diffusers' check_inputs: settings this pipeline cannot take
            raise ClipevalError(f"the pipeline refused the generation settings: {err}") from err
    images = output.images
    nonfinite = (~torch.isfinite(images.float())).flatten(1).any(dim=1).tolist()
    nsfw = getattr(output, "nsfw_content_detected", None) or [False] * len(batch)
    pixels = to_uint8(images)
    black = (pixels.flatten(1).amax(dim=1) == 0).tolist()
    flags = ["nan" if n else "nsfw" if s else "black" if b else "" for n, s, b in zip(nonfinite, nsfw, black)]
    return pixels, flags


def _takes_step_callback(pipe) -> bool:
    import inspect

    try:
        return "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return False


def to_uint8(images):
    """[0, 1] floats → uint8 the way diffusers' ``numpy_to_pil`` does (×255, round); NaN → 0."""
    import torch

    images = torch.nan_to_num(images.float(), nan=0.0)
    return (images * 255).round().clamp(0, 255).to(torch.uint8)
