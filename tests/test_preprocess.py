"""The fast preprocessing against the model's own image processor, on processors whose crop sits
well inside the resize, crops that need padding, odd margins (where a centre is rounded), straight
resizes and both resampling filters. No model: the processors are built here, as configured by the
families clipeval scores."""

from __future__ import annotations

import pytest
import torch

from clipeval.preprocess import ImageTransform, exact

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def clip_processor(shortest: int, crop: tuple[int, int], resample: int = 3):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": shortest}, crop_size={"height": crop[0], "width": crop[1]},
                                 resample=resample, image_mean=list(MEAN), image_std=list(STD))


def siglip_processor(height: int, width: int, resample: int = 2):
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": height, "width": width}, resample=resample)


def images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Every pixel distinct in all three channels, so a crop one pixel off, or a channel swapped, shows."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, height, width, generator=g) * 255).round().to(torch.uint8)


CASES = [
    # (processor, image height, width): what each exercises
    (lambda: clip_processor(40, (24, 28)), 40, 40),  # no resize; a crop well inside, margins 8 and 6
    (lambda: clip_processor(40, (23, 27)), 41, 57),  # resize, then odd margins: the centre is rounded
    (lambda: clip_processor(30, (21, 30)), 30, 30),  # no resize, crop inside on one side only
    (lambda: clip_processor(16, (24, 20)), 16, 16),  # a crop larger than the image: padded with zeros
    (lambda: clip_processor(15, (20, 22)), 15, 15),  # odd padding on both sides
    (lambda: clip_processor(16, (24, 12)), 16, 40),  # padded on one side, cropped on the other
    (lambda: clip_processor(16, (13, 24)), 40, 16),  # the same, the other way round
    (lambda: clip_processor(24, (24, 24), resample=2), 60, 33),  # bilinear
    (lambda: siglip_processor(24, 32), 50, 20),  # a straight resize to (height, width), no crop
    (lambda: siglip_processor(24, 24, resample=3), 24, 24),  # already the size: untouched
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_fast_equals_the_processor_on_the_cpu(case):
    make, height, width = CASES[case]
    processor = make()
    transform = ImageTransform.from_processor(processor)
    batch = images(3 if case % 2 else 1, height, width, seed=case)  # one image alone, too
    ours = transform(batch)
    theirs = exact(processor, batch)["pixel_values"]
    assert ours.shape == theirs.shape
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert (ours - theirs).abs().max() < 1e-5  # the same pixels; float rounding of the normalisation only


@pytest.mark.parametrize("case", range(len(CASES)))
def test_the_accelerators_path_is_within_a_level(case):
    """A float batch takes the accelerator's path (torch's resize in PIL's two rounded passes)."""
    make, height, width = CASES[case]
    processor = make()
    transform = ImageTransform.from_processor(processor)
    batch = images(2, height, width, seed=case + 100)
    ours = transform(batch.float())
    theirs = exact(processor, batch)["pixel_values"]
    assert ours.shape == theirs.shape
    levels = (ours - theirs).abs() * torch.tensor(processor.image_std).view(1, 3, 1, 1) * 255
    assert levels.max() <= 1 + 1e-3


def test_padding_is_zeros_in_pixels_not_in_normalised_values():
    processor = clip_processor(16, (24, 20))
    batch = torch.full((1, 3, 16, 16), 255, dtype=torch.uint8)
    ours = ImageTransform.from_processor(processor)(batch)
    zero = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(ours[0, :, 0, 0], zero)  # a padded corner: pixel 0
    assert torch.allclose(ours[0, :, 12, 10], (1 - torch.tensor(MEAN)) / torch.tensor(STD))  # the image: 255
    rows = (ours[0, 0] > 0).any(dim=1).nonzero().flatten().tolist()
    cols = (ours[0, 0] > 0).any(dim=0).nonzero().flatten().tolist()
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (4, 19, 2, 17)  # 8 rows and 4 columns of padding, centred


def test_resized_shape_is_transformers_rule():
    transform = ImageTransform.from_processor(clip_processor(32, (32, 32)))
    assert transform.resized_shape(64, 64) == (32, 32)
    assert transform.resized_shape(100, 60) == (53, 32)  # int(32 * 100 / 60) = 53: truncated, not rounded
    assert transform.resized_shape(60, 100) == (32, 53)
    assert transform.resized_shape(33, 1000) == (32, 969)
    square = ImageTransform.from_processor(siglip_processor(24, 32))
    assert square.resized_shape(100, 7) == (24, 32) and square.crop is None
    assert (square.mean, square.std, square.resample) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 2)


def test_what_the_fast_path_cannot_reproduce_is_refused():
    with pytest.raises(ValueError, match="PIL resample mode 1"):
        ImageTransform.from_processor(clip_processor(32, (32, 32), resample=1))
    no_crop = clip_processor(32, (24, 24))
    no_crop.do_center_crop = False
    assert ImageTransform.from_processor(no_crop).crop is None


def test_the_accelerators_path_keeps_to_uint8_levels_at_hard_edges():
    """Bicubic overshoots a hard edge; like PIL, each pass clamps to [0, 255] before the next."""
    processor = clip_processor(24, (24, 24))
    batch = torch.zeros(2, 3, 12, 12)  # upscaled: the widest overshoot (about 18 levels) on both passes
    batch[:, :, 6:, 3:6] = 255
    batch[:, :, :3, 8:] = 255
    batch[1] = 255 - batch[1]
    x = ImageTransform.from_processor(processor)(batch)
    levels = (x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255
    assert levels.min().abs() < 1e-3 and (levels.max() - 255).abs() < 1e-3  # black stays 0, white 255, no overshoot
    theirs = exact(processor, batch.to(torch.uint8))["pixel_values"]
    # On these flat regions and hard edges the two rounded passes are PIL's exactly (not just within a level).
    assert ((x - theirs).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255).max() < 1e-3


SWITCHES = ["do_resize", "do_center_crop", "do_rescale", "do_normalize"]


@pytest.mark.parametrize("switch", SWITCHES)
def test_a_step_the_processor_turns_off_is_off_in_the_fast_path(switch):
    """A processor configured without a step (a custom scorer's preprocessor_config.json) must get
    the processor's pixels, not CLIP's usual ones."""
    processor = clip_processor(40, (23, 27))
    setattr(processor, switch, False)
    batch = images(2, 41, 57, seed=7)
    ours = ImageTransform.from_processor(processor)(batch)
    theirs = exact(processor, batch)["pixel_values"]
    assert ours.shape == theirs.shape == ((2, 3, 40, 55) if switch == "do_center_crop" else (2, 3, 23, 27))
    # values reach 255 / 0.26 without the rescale: float32 rounding of the normalisation, relative
    assert ((ours - theirs).abs() / theirs.abs().clamp(min=1)).max() < 1e-5


def test_sizes_kept_as_transformers_4_kept_them_give_the_same_transform():
    """transformers 4 kept sizes as plain dicts of the keys set, and its SigLIP processors had no
    crop attributes at all; the fast path built from either equals the one from transformers 5's."""
    from types import SimpleNamespace

    current = clip_processor(40, (23, 27))
    old = clip_processor(40, (23, 27))
    old.size, old.crop_size = {"shortest_edge": 40}, {"height": 23, "width": 27}
    assert ImageTransform.from_processor(old) == ImageTransform.from_processor(current)
    assert ImageTransform.from_processor(current).shortest_edge == 40

    siglip = siglip_processor(24, 32, resample=3)
    siglip.rescale_factor = 1 / 127.5  # not the default, so a transform that ignores it differs
    siglip_4 = SimpleNamespace(
        size={"height": 24, "width": 32}, resample=3, do_resize=True, do_rescale=True, rescale_factor=1 / 127.5,
        do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], model_input_names=["pixel_values"],
    )
    transform = ImageTransform.from_processor(siglip_4)
    assert transform == ImageTransform.from_processor(siglip)
    assert (transform.size, transform.crop, transform.rescale) == ((24, 32), None, 1 / 127.5)
    batch = images(1, 30, 20, seed=3)
    assert (transform(batch) - exact(siglip, batch)["pixel_values"]).abs().max() < 1e-5


def test_what_else_the_fast_path_cannot_reproduce_is_refused_in_one_line():
    def refusal(processor) -> str:
        with pytest.raises(ValueError) as err:
            ImageTransform.from_processor(processor)
        return str(err.value)

    from transformers import Siglip2ImageProcessorPil

    assert refusal(Siglip2ImageProcessorPil()) == (
        "the fast path cannot reproduce NaFlex patching (each image on its own patch grid)")
    assert refusal(clip_processor(32, (32, 32), resample=1)) == "the fast path cannot reproduce PIL resample mode 1"
    longest = clip_processor(32, (32, 32))
    longest.size = {"longest_edge": 32}
    assert refusal(longest) == "the fast path cannot reproduce a resize to {'longest_edge': 32}"
    offset = siglip_processor(24, 24)
    offset.rescale_offset = True
    assert refusal(offset) == "the fast path cannot reproduce rescale_offset"
    offset.rescale_offset = False
    assert ImageTransform.from_processor(offset).size == (24, 24)
    from types import SimpleNamespace

    unknown = SimpleNamespace(model_input_names=["pixel_values"], size={"height": 8, "width": 8}, do_resize=True)
    assert refusal(unknown) == "the fast path cannot read SimpleNamespace's configuration (no resample)"


def test_the_fast_path_stays_on_the_images_device():
    """On the meta device any CPU tensor mixed into the computation is an error, so this is the
    accelerator's path without an accelerator: resize, crop and normalisation all on the batch's device."""
    transform = ImageTransform.from_processor(clip_processor(40, (23, 27)))
    out = transform(torch.zeros(2, 3, 41, 57, device="meta"))
    assert out.device.type == "meta" and tuple(out.shape) == (2, 3, 23, 27) and out.dtype == torch.float32
