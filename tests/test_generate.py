"""Seeds and generation: an image depends only on (base seed, prompt_id, sample)."""

from __future__ import annotations

import pytest
import torch

from clipeval.generate import GenerationSettings, WorkItem, generate, image_seed, to_uint8, work_items
from clipeval.pipelines import load_pipeline, resolve_checkpoint
from clipeval.prompts import Prompt, PromptLibrary


def test_seed_formula_known_values():
    # Seed 0 keeps the images of the first scheme: prompt_id·2¹² + sample.
    assert image_seed(0, 0, 0) == 0
    assert image_seed(0, 0, 1) == 1
    assert image_seed(0, 5, 1) == 5 * 4096 + 1 == 20481
    # The base seed's bits, reversed, XOR the high bits: every seed stays below 2³².
    assert image_seed(1, 0, 0) == 2**31
    assert image_seed(1, 5, 1) == 2**31 + 20481
    assert image_seed(2, 0, 0) == 2**30
    assert image_seed(3, 0, 0) == 2**31 + 2**30
    assert image_seed(2**31 - 1, 2**20 - 1, 4095) == (2**32 - 1) ^ (2**32 - 2) == 1
    assert max(image_seed(s, p, k) for s in (0, 1, 2**31 - 1) for p in (0, 2**20 - 1) for k in (0, 4095)) < 2**32
    for base, prompt_id, sample in ((0, 0, 4096), (0, 2**20, 0), (0, -1, 0), (0, 0, -1)):
        with pytest.raises(ValueError, match=rf"^prompt_id {prompt_id} or sample {sample} out of range$"):
            image_seed(base, prompt_id, sample)
    for base in (-1, 2**31):
        with pytest.raises(ValueError, match=rf"^seed {base} outside \[0, 2147483647\]$"):
            image_seed(base, 0, 0)


def test_batches_cut_the_work_in_order_with_a_short_last_one():
    from clipeval.generate import batches

    items = list(range(7))
    assert list(batches(items, 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batches(items, 7)) == [items] and list(batches(items, 10)) == [items] and list(batches([], 4)) == []


@pytest.mark.parametrize("a,b,prompts", [(0, 1, 4096), (41, 42, 4096), (0, 255, 4096), (7, 200, 4096), (0, 2**12, 2)])
def test_runs_with_different_base_seeds_share_no_seed(a, b, prompts):
    """Seeds below 256 are disjoint for every built-in library (≤ 4,096 prompts), at the most
    images per prompt; seeds differing only in high bits are disjoint for small libraries."""
    k = 4096 if prompts <= 2 else 64
    first = {image_seed(a, p, s) for p in range(prompts) for s in range(k)}
    second = {image_seed(b, p, s) for p in range(prompts) for s in range(k)}
    assert len(first) == len(second) == prompts * k
    assert not first & second


@pytest.mark.parametrize("a", [0, 1, 2, 41, 254, 2**30 - 1, 2**31 - 2])
def test_consecutive_base_seeds_share_no_seed_below_524288_prompts(a):
    """The README's bound, at its edge: a run's seeds all carry one value in bit 31 (its base seed's
    lowest bit, reversed) as long as prompt_id < 2**19 = 524,288, so runs a and a + 1 (lowest differing
    bit 0) cannot share a seed there; at prompt 524,288 they do, so the bound is exact. Enumerating
    2**31 seeds would take minutes; the first and last index of the range carry the whole argument,
    since a seed is its index XOR a constant."""
    b = a + 1
    top = [image_seed(base, p, s) >> 31 for base in (a, b) for p, s in ((0, 0), (2**19 - 1, 4095))]
    assert top[0] == top[1] != top[2] == top[3]
    # The first prompt past the bound already collides with a seed of the other run: the image of run b
    # whose index is that seed XOR b's reversed bits (below 2**31, so a prompt below the bound).
    collision = image_seed(a, 2**19, 0)
    index = collision ^ int(f"{b:032b}"[::-1], 2)
    assert index < 2**31 and image_seed(b, index >> 12, index & 4095) == collision


def test_seeds_do_not_depend_on_images_per_prompt_or_limit():
    lib = PromptLibrary("t", "", tuple(Prompt(i, f"p{i}") for i in range(5)))
    two = {w.key: w.seed for w in work_items(lib, images_per_prompt=2, seed=3)}
    four = {w.key: w.seed for w in work_items(lib.head(3), images_per_prompt=4, seed=3)}
    assert all(four[k] == v for k, v in two.items() if k in four)
    assert len(set(four.values())) == 12


def test_to_uint8_matches_diffusers_rounding_and_maps_nan_to_zero():
    x = torch.tensor([0.0, 0.5, 1.0, 0.0019, 0.002, float("nan"), 1.2, -0.1, 0.6])
    got = to_uint8(x)
    assert got.dtype == torch.uint8 and got.tolist() == [0, 128, 255, 0, 1, 0, 255, 0, 153]


def test_to_uint8_equals_the_pixels_diffusers_saves():
    """diffusers' own conversion to PIL (what a user's `pipe(...).images[0].save()` writes) on a grid
    of values, every rounding boundary of the 256 levels included."""
    import numpy as np
    from diffusers.image_processor import VaeImageProcessor

    values = torch.cat([torch.linspace(0, 1, 4097), (torch.arange(256) + 0.5) / 255]).clamp(0, 1)
    images = values.view(1, 1, 1, -1).expand(1, 3, 1, -1).contiguous()
    theirs = np.asarray(VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))[0])
    assert np.array_equal(to_uint8(images)[0].permute(1, 2, 0).numpy(), theirs)


def test_work_items_carry_each_prompt_and_refuse_a_library_past_the_seed_range():
    lib = PromptLibrary("t", "", (Prompt(0, "a cat", "animals", "basic"), Prompt(1, "a dog", "", "hard")))
    items = work_items(lib, images_per_prompt=2, seed=9)
    assert [(i.prompt_id, i.sample, i.seed, i.prompt, i.category, i.challenge) for i in items] == [
        (0, 0, image_seed(9, 0, 0), "a cat", "animals", "basic"), (0, 1, image_seed(9, 0, 1), "a cat", "animals", "basic"),
        (1, 0, image_seed(9, 1, 0), "a dog", "", "hard"), (1, 1, image_seed(9, 1, 1), "a dog", "", "hard")]
    from clipeval.generate import MAX_PROMPTS

    at_cap = PromptLibrary("big", "", (Prompt(0, "x"),) * MAX_PROMPTS)
    assert work_items(at_cap, images_per_prompt=0, seed=0) == []  # 2**20 prompts still fit
    with pytest.raises(ValueError, match=rf"^at most {MAX_PROMPTS} prompts$"):
        work_items(PromptLibrary("big", "", (Prompt(0, "x"),) * (MAX_PROMPTS + 1)), images_per_prompt=0, seed=0)


@pytest.fixture(scope="module")
def pipe(models):
    return load_pipeline(resolve_checkpoint(str(models.sd), None), device="cpu", dtype="float32")


SETTINGS = GenerationSettings(steps=2, guidance_scale=5.0, height=64, width=64, negative_prompt=None)


def _items(n: int) -> list[WorkItem]:
    return [WorkItem(i, 0, image_seed(0, i, 0), f"prompt number {i}", "", "") for i in range(n)]


def test_same_seed_same_pixels(pipe):
    a, flags = generate(pipe, _items(3), SETTINGS)
    b, _ = generate(pipe, _items(3), SETTINGS)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 64, 64)
    assert torch.equal(a, b)
    assert flags == ["", "", ""]


def test_an_image_does_not_depend_on_its_batch(pipe):
    batch = generate(pipe, _items(4), SETTINGS)[0]
    alone = torch.cat([generate(pipe, [item], SETTINGS)[0] for item in _items(4)])
    reversed_batch = generate(pipe, _items(4)[::-1], SETTINGS)[0].flip(0)
    for other in (alone, reversed_batch):
        diff = (batch.int() - other.int()).abs()
        # Float noise (≤ 2e-6) can move a value across a rounding boundary: one level, rarely.
        assert diff.max() <= 1
        assert (diff > 0).float().mean() < 1e-3


def test_every_base_seed_gives_its_own_pixels(pipe):
    """The bug the seed scheme fixes: a CPU Generator drops bits above 32, so clipeval 0.1.0's
    formula (base seed in those bits) gave every --seed the images of --seed 0. Here the images of
    one prompt under base seeds that differ only in a low bit, only in a high bit, and at the top."""
    lib = PromptLibrary("t", "", (Prompt(0, "a red cube"),))
    images = [generate(pipe, work_items(lib, images_per_prompt=1, seed=s), SETTINGS)[0]
              for s in (0, 1, 2**30, 2**31 - 1)]
    assert all(not torch.equal(images[i], images[j]) for i in range(4) for j in range(i + 1, 4))


def test_different_seeds_differ(pipe):
    items = _items(2)
    other = [WorkItem(i.prompt_id, 1, i.seed + 1, i.prompt, "", "") for i in items]
    assert not torch.equal(generate(pipe, items, SETTINGS)[0], generate(pipe, other, SETTINGS)[0])


# -- generate() against a stand-in pipeline: what it asks of the pipeline and what it makes of the answer --

class StandIn:
    """A pipeline that draws each image's pixels from its own generator, records what it was asked,
    and can put NaNs, zeros or a safety flag into chosen images."""

    def __init__(self, nan=(), black=(), nsfw=None, refuse: str | None = None):
        self.calls: list[dict] = []
        self.nan, self.black, self.nsfw, self.refuse = set(nan), set(black), nsfw, refuse

    def __call__(self, *, prompt, num_inference_steps, guidance_scale, height, width, generator, output_type,
                 callback_on_step_end=None, **kwargs):
        self.calls.append(dict(prompt=prompt, steps=num_inference_steps, guidance=guidance_scale, height=height,
                               width=width, output_type=output_type, **kwargs))
        if self.refuse:
            raise ValueError(self.refuse)
        if callback_on_step_end is not None:
            for i in range(num_inference_steps):
                assert callback_on_step_end(self, i, 999 - i, {"latents": i}) == {"latents": i}
        images = torch.stack([torch.rand(3, height, width, generator=g) for g in generator])
        for i in self.black:
            images[i] *= 0.0015  # below half a uint8 level everywhere: black as saved, not as floats
        for i in self.nan:
            images[i, 0, 0, 0] = float("nan")
        from types import SimpleNamespace

        return SimpleNamespace(images=images, nsfw_content_detected=self.nsfw)


class NoCallback(StandIn):
    def __call__(self, *, prompt, num_inference_steps, guidance_scale, height, width, generator, output_type, **kwargs):
        return super().__call__(prompt=prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                height=height, width=width, generator=generator, output_type=output_type, **kwargs)


def test_generate_asks_the_pipeline_for_exactly_the_settings_and_seeds():
    items = [WorkItem(i, s, image_seed(3, i, s), f"p{i}", "", "") for i, s in ((0, 0), (0, 1), (5, 2))]
    settings = GenerationSettings(steps=3, guidance_scale=6.5, height=16, width=24, negative_prompt="blurry")
    pipe = StandIn()
    steps = []
    pixels, flags = generate(pipe, items, settings, on_step=lambda i, n: steps.append((i, n)))
    assert pipe.calls == [dict(prompt=["p0", "p0", "p5"], steps=3, guidance=6.5, height=16, width=24, output_type="pt",
                               negative_prompt=["blurry"] * 3)]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    # Each image's pixels come from a CPU generator seeded with that image's own seed.
    expected = torch.stack([torch.rand(3, 16, 24, generator=torch.Generator("cpu").manual_seed(i.seed)) for i in items])
    assert torch.equal(pixels, to_uint8(expected)) and pixels.dtype == torch.uint8
    assert flags == ["", "", ""]
    plain = StandIn()
    generate(plain, items[:1], GenerationSettings(2, 1.0, 8, 8, None))
    assert "negative_prompt" not in plain.calls[0]  # no negative prompt: none sent (a pipeline may take none)
    quiet = NoCallback()
    generate(quiet, items[:1], settings, on_step=lambda i, n: steps.append("never"))
    assert "never" not in steps and quiet.calls  # a pipeline without the callback still runs


def test_each_image_is_flagged_for_what_is_wrong_with_it():
    items = [WorkItem(i, 0, i, f"p{i}", "", "") for i in range(5)]
    settings = GenerationSettings(1, 1.0, 8, 8, None)
    pipe = StandIn(nan={0, 1}, black={1, 2, 3}, nsfw=[False, True, False, True, False])
    pixels, flags = generate(pipe, items, settings)
    assert flags == ["nan", "nan", "black", "nsfw", ""]  # non-finite first, then the safety checker, then black
    assert pixels[0, 0, 0, 0] == 0 and pixels[0].flatten()[1:].max() > 0  # a NaN is 0 in the saved image
    assert generate(StandIn(nsfw=None), items[:2], settings)[1] == ["", ""]  # no safety checker


def test_a_setting_the_pipeline_refuses_is_one_line():
    from clipeval.errors import ClipevalError

    with pytest.raises(ClipevalError) as err:
        generate(StandIn(refuse="`height` and `width` have to be divisible by 8 but are 12 and 8."),
                 _items(1), GenerationSettings(1, 1.0, 12, 8, None))
    assert str(err.value) == ("the pipeline refused the generation settings: `height` and `width` have to be divisible "
                              "by 8 but are 12 and 8.")
