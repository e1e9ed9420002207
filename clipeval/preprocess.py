"""CLIP image preprocessing, in one place: a fast batched tensor path and the exact processor path.

Both start from uint8 RGB, the image exactly as it is saved, so re-scoring a saved PNG gives the
same score as scoring it during the run.

- ``fast``: resize the short side, centre crop, normalise, on batched tensors on the model's
  device. On an accelerator the resize is torch's (bicubic, antialiased: PIL's kernel, in PIL's
  two rounded passes; no host copies). On the CPU it is PIL's own, image by image, which is what
  the processor calls: the same pixels, and cheaper than the float two-pass resize there.
- ``exact``: the model's own transformers image processor, image by image on the CPU.

The fast path follows the processor's own configuration (sizes, mean, std), so the two cannot
disagree on what to compute, only on rounding; ``tests/test_score.py`` bounds that difference.
"""

from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass
from typing import Any

MODES = ("fast", "exact")
_TORCH_MODES = {2: "bilinear", 3: "bicubic"}  # PIL resample codes the fast path reproduces


@dataclass(frozen=True)
class ImageTransform:
    shortest_edge: int | None  # resize so the short side has this length ...
    size: tuple[int, int] | None  # ... or to exactly (height, width)
    crop: tuple[int, int] | None  # (height, width) centre crop
    resample: int  # PIL resample code, and the torch interpolation mode that reproduces it
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_processor(cls, processor: Any) -> "ImageTransform":
        """The processor's own configuration, switches included (a resize, crop, rescale or
        normalisation it turns off is off here too); what this class cannot reproduce pixel for
        pixel is refused, and the scorer then takes the exact path."""
        try:
            return cls._from_processor(processor)
        except AttributeError as err:  # a processor class this was not written for
            raise ValueError(f"the fast path cannot read {type(processor).__name__}'s configuration (no {err.name})") from err

    @classmethod
    def _from_processor(cls, processor: Any) -> "ImageTransform":
        if "spatial_shapes" in processor.model_input_names:
            raise ValueError("the fast path cannot reproduce NaFlex patching (each image on its own patch grid)")
        if getattr(processor, "rescale_offset", False):  # EfficientNet's (ALIGN's) [-1, 1] rescale
            raise ValueError("the fast path cannot reproduce rescale_offset")
        size = _as_dict(processor.size) if processor.do_resize else {}
        if size and set(size) not in ({"shortest_edge"}, {"height", "width"}):
            raise ValueError(f"the fast path cannot reproduce a resize to {size}")
        # transformers 4's SigLIP processors have no crop attributes at all
        crop = _as_dict(processor.crop_size) if getattr(processor, "do_center_crop", False) else {}
        resample = int(processor.resample)
        if resample not in _TORCH_MODES:
            raise ValueError(f"the fast path cannot reproduce PIL resample mode {resample}")
        normalise = processor.do_normalize
        return cls(
            shortest_edge=size.get("shortest_edge"),
            size=(size["height"], size["width"]) if "height" in size else None,
            crop=(crop["height"], crop["width"]) if crop else None,
            resample=resample,
            rescale=float(processor.rescale_factor) if processor.do_rescale else 1.0,
            mean=tuple(processor.image_mean) if normalise else (0.0, 0.0, 0.0),
            std=tuple(processor.image_std) if normalise else (1.0, 1.0, 1.0),
        )

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """transformers' rule: the short side becomes ``shortest_edge``, the long one is truncated."""
        if self.size is not None:
            return self.size
        if self.shortest_edge is None:
            return height, width
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, images):
        """uint8 ``(B, 3, H, W)`` on any device → normalised float32 pixel values on that device."""
        import torch

        h, w = images.shape[-2:]
        new_h, new_w = self.resized_shape(h, w)
        if images.device.type == "cpu" and images.dtype == torch.uint8:
            x = _pil_resized(images, new_h, new_w, self.resample)
        else:
            x = self._torch_resized(images.to(torch.float32), new_h, new_w)
        if self.crop is not None:
            x = _centre_crop(x, *self.crop)
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x * self.rescale - mean) / std

    def _torch_resized(self, x, new_h: int, new_w: int):
        import torch.nn.functional as F

        h, w = x.shape[2:]  # (B, 3, H, W)
        # PIL resizes in two passes, horizontal then vertical, rounding to uint8 after each.
        # Doing the same brings the fast path from ~20% of pixels one level off to ~0.02%.
        if new_w != w:
            x = F.interpolate(x, size=(h, new_w), mode=_TORCH_MODES[self.resample], antialias=True)
            x = x.round_().clamp_(0, 255)
        if new_h != h:
            x = F.interpolate(x, size=(new_h, new_w), mode=_TORCH_MODES[self.resample], antialias=True)
            x = x.round_().clamp_(0, 255)
        return x


def _pil_resized(images, new_h: int, new_w: int, resample: int):
    """uint8 ``(B, 3, H, W)`` on the CPU → uint8 ``(B, 3, new_h, new_w)``, resized as the
    processor resizes (``PIL.Image.resize``), channels-last in memory."""
    import numpy as np
    import torch
    from PIL import Image

    h, w = images.shape[2:]  # (B, 3, H, W)
    if (new_h, new_w) == (h, w):
        return images

    def resize(plane):
        return np.asarray(Image.fromarray(np.ascontiguousarray(plane)).resize((new_w, new_h), resample=resample))

    planes = images.permute(0, 2, 3, 1).numpy()
    # PIL releases the GIL while it resizes: one thread a core (~1 s of 384 images of 512² is
    # otherwise spent on one core while the others wait for the image tower).
    with concurrent.futures.ThreadPoolExecutor(min(len(planes), os.cpu_count() or 1)) as pool:
        resized = list(pool.map(resize, planes))
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)


def _centre_crop(x, crop_h: int, crop_w: int):
    import torch.nn.functional as F

    h, w = x.shape[2:]  # (B, 3, H, W)
    pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
    if pad_h or pad_w:  # transformers pads small images with zeros before cropping
        top, left = (pad_h + 1) // 2, (pad_w + 1) // 2
        x = F.pad(x, (left, pad_w - left, top, pad_h - top))
        h, w = x.shape[2:]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return x[..., top : top + crop_h, left : left + crop_w]


def exact(processor: Any, images) -> dict[str, Any]:
    """The model's own processor on PIL images made from uint8 tensors (a batch or a list): the
    image tower's inputs, on the CPU where the processor works: pixel values (float32, as every
    processor returns them), and whatever else the tower takes (a NaFlex tower: each image's
    patch mask and grid shape)."""
    from PIL import Image

    pil = [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in images]
    out = processor(images=pil, return_tensors="pt")
    return {k: out[k] for k in processor.model_input_names if k in out}


def _as_dict(value: Any) -> dict[str, int]:
    """A size as transformers 5 keeps it (a ``SizeDict`` with every key, most None) or as 4 did
    (a plain dict of the keys set) → the keys that are set."""
    if value is None:
        return {}
    items = value.items() if isinstance(value, dict) else vars(value).items()
    return {k: v for k, v in items if v is not None}
