"""CLIP score: the cosine of the L2-normalised image and text embeddings, in float32, in [-1, 1].

Not ×100 and not clamped (torchmetrics reports ``max(100·mean(cos), 0)``: the clamp comes after
its batch mean). The model is loaded once; each distinct prompt is embedded once; embeddings are
normalised and dotted in float32 even when the model runs in half precision. Prompts longer than
the model's text positions are truncated by its tokenizer, which keeps the end-of-text token that
CLIP pools on (torchmetrics slices it off), and are flagged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from clipeval.errors import ClipevalError
from clipeval.hub import torch_dtype
from clipeval.preprocess import MODES, ImageTransform, exact

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14-336"


def _features(output: Any):
    """transformers 5 returns an output object whose ``pooler_output`` is the projected embedding."""
    import torch

    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass(frozen=True)
class TextEmbedding:
    vector: Any  # float32, unit norm, on the scorer's device
    truncated: bool


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
# Families whose text tower pools the last position: the padding to max_length is part of the model.
PAD_TO_MAX_LENGTH = ("siglip", "siglip2")
# CLIP text lengths are rounded up to a multiple of this: few shapes, so full forwards.
TEXT_BUCKET = 8


class ClipScorer:
    """A loaded dual encoder (CLIP, SigLIP, ...) plus its tokenizer and image preprocessing, ready
    to score batches. Any model ``AutoModel`` loads with ``get_image_features`` and
    ``get_text_features`` works; ``processor`` takes the tokenizer and image processor from another
    folder or hub id (PickScore ships none: it uses laion's CLIP-H processor)."""

    metric = "clip"
    scale = "cosine"

    def __init__(
        self,
        model: str = DEFAULT_CLIP_MODEL,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        preprocess: str = "fast",
        revision: str | None = None,
        allow_pickle: bool = False,
        processor: str | None = None,
        name: str | None = None,
        log: Any = None,
    ) -> None:
        import torch

        if preprocess not in MODES:
            raise ClipevalError(f"--preprocess {preprocess}: use one of {', '.join(MODES)}")
        self.name = name or model  # what the user called it: a short name, an id or a folder
        self.model, self.tokenizer, self.processor = self._load(model, revision, allow_pickle, processor)
        self.model.eval().to(device)
        self.model_class = type(self.model).__name__
        self.processor_name = processor
        self.device = device
        self.dtype = dtype
        self.preprocess = preprocess
        text_config = getattr(self.model.config, "text_config", self.model.config)
        # The model's own text length (77 for CLIP, 248 for LongCLIP, 64 for SigLIP), not the tokenizer's default.
        self.max_length = int(text_config.max_position_embeddings)
        self.pad_to_max_length = getattr(self.model.config, "model_type", "") in PAD_TO_MAX_LENGTH
        self.transform = None
        if preprocess == "fast":
            try:
                self.transform = ImageTransform.from_processor(self.processor)
            except ValueError as err:
                self.preprocess = "exact"
                if log is not None:
                    log(f"{self.name}: {err}; using --preprocess exact")
        self._cache: dict[str, TextEmbedding] = {}
        # Rows per text forward: on a CPU extra rows cost their compute (4 measured best for
        # ViT-B/32's text tower); on an accelerator a short forward costs its launches, not its rows.
        self.text_group = 4 if device == "cpu" else 32
        # CLIP's text tower is causal and pools the first end-of-text token: end padding with that
        # token changes nothing the embedding sees (see embed_texts). Others: exact lengths.
        eos = self.tokenizer.eos_token_id
        causal = getattr(self.model.config, "model_type", "") == "clip"
        self.end_pad = eos if causal and eos is not None and not self.pad_to_max_length else None
        self._torch = torch

    def _load(self, model: str, revision: str | None, allow_pickle: bool, processor: str | None):
        """The model, its tokenizer and its image processor (from ``processor`` where given), or one
        line saying what is missing or why it did not load."""
        from clipeval.hub import hub_error, quiet_hf

        quiet_hf(with_diffusers=False)
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        location = _local(model, "--clip-model", revision, allow_pickle)
        processor_location = _local(processor, "--clip-processor", None, True) if processor else location
        if processor is None and Path(location).is_dir():
            missing = [what for what, files in (("image processor", PROCESSOR_FILES), ("tokenizer", TOKENIZER_FILES))
                       if not any(Path(location, f).is_file() for f in files)]
            if missing:
                raise ClipevalError(
                    f"--clip-model {self.name} has no {' and no '.join(missing)} files: pass --clip-processor with the "
                    "folder or hub id of the model it was trained from (PickScore: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"
                )
        try:
            # SDPA explicitly: whatever attention backend the denoiser is given, CLIP's stays PyTorch's.
            loaded = AutoModel.from_pretrained(
                # float32 weights always: half precision is autocast (float32 norms, softmax and
                # accumulation), which keeps scores within 1e-3 of float32 where half weights do not.
                location, dtype=torch.float32, use_safetensors=None if allow_pickle else True, revision=revision,
                attn_implementation="sdpa",
            )
            processor_revision = revision if processor is None else None
            tokenizer = AutoTokenizer.from_pretrained(processor_location, revision=processor_revision)
            # The PIL processor on every machine (transformers 5 would pick a torchvision one where
            # torchvision is installed): "exact" must mean the same computation everywhere.
            try:
                images = AutoImageProcessor.from_pretrained(processor_location, backend="pil", revision=processor_revision)
            except (TypeError, ValueError):  # transformers before the backend argument
                images = AutoImageProcessor.from_pretrained(processor_location, use_fast=False, revision=processor_revision)
        except Exception as err:
            named = self.name if self.name == model else f"{self.name} ({model})"
            raise ClipevalError(f"could not load CLIP model {named}: {hub_error(err)}") from err
        if not all(callable(getattr(loaded, f, None)) for f in ("get_image_features", "get_text_features")):
            raise ClipevalError(
                f"--clip-model {self.name} is a {type(loaded).__name__}, neither a dual encoder with image and text "
                "features (CLIP, SigLIP, ...) nor a vision-language model (LLaVA, SmolVLM, Qwen2.5-VL, ...)"
            )
        return loaded, tokenizer, images

    @property
    def definition(self) -> str:
        from clipeval.stats import SCORE_DEFINITION

        return SCORE_DEFINITION

    def describe(self) -> dict[str, Any]:
        """What the manifest records beyond the model: how images reach it."""
        return {"preprocess": self.preprocess}

    def _autocast(self):
        """Mixed precision for --clip-dtype bfloat16/float16 on the image tower: matmuls in half,
        the rest in float32."""
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return self._torch.autocast(device_type=self.device.split(":")[0], dtype=torch_dtype(self.dtype))

    # -- text ------------------------------------------------------------------------------
    def embed_texts(self, prompts: Sequence[str]) -> list[TextEmbedding]:
        """Embeddings for ``prompts``, computing each distinct text once and caching it.

        Texts run in forwards of a fixed shape: exactly ``text_group`` rows (the last forward
        filled with copies) of one token length. CLIP's text tower is causal and pools its first
        end-of-text token, so a row padded at the end with end-of-text tokens computes the same
        embedding: its lengths are rounded up to ``TEXT_BUCKET`` tokens, which fills the groups of
        a library of varied lengths. Other towers see their exact length (SigLIP: its fixed
        length, as it was trained). A row's result depends only on its own tokens when the shape
        is fixed (the same kernels, the same summation order; checked bit for bit in the tests),
        so an embedding is a pure function of its text: the same bits whichever prompts share its
        forward, after a resume, or in a re-score."""
        torch = self._torch
        padding = "max_length" if self.pad_to_max_length else False
        by_shape: dict[int, list[tuple[str, list[int], bool]]] = {}
        for text in dict.fromkeys(p for p in prompts if p not in self._cache):
            length = len(self.tokenizer(text, truncation=False)["input_ids"])
            ids = self.tokenizer(text, truncation=True, max_length=self.max_length, padding=padding)["input_ids"]
            if self.end_pad is not None:
                shape = min(self.max_length, -(-len(ids) // TEXT_BUCKET) * TEXT_BUCKET)
                ids = ids + [self.end_pad] * (shape - len(ids))
            by_shape.setdefault(len(ids), []).append((text, ids, length > self.max_length))
        size = self.text_group
        for group in by_shape.values():
            for start in range(0, len(group), size):
                chunk = group[start : start + size]
                rows = [ids for _, ids, _ in chunk] + [chunk[0][1]] * (size - len(chunk))
                # No attention mask: SigLIP was trained without one (its padding is input), and
                # CLIP's causal attention never lets a token see the end padding after it.
                tokens = torch.tensor(rows, device=self.device)
                # Float32 whatever --clip-dtype says: the text tower runs once per prompt, not per
                # image, and under bf16 it carried most of the error (8.6e-4 of 1.2e-3 on ViT-B/32).
                with torch.inference_mode():
                    vectors = _features(self.model.get_text_features(input_ids=tokens)).float()
                vectors = vectors / vectors.norm(dim=-1, keepdim=True)
                for (text, _, truncated), vector in zip(chunk, vectors):
                    self._cache[text] = TextEmbedding(vector, truncated)
        return [self._cache[p] for p in prompts]

    def prepare(self, prompts: Sequence[str]) -> None:
        """Embed the prompts of the coming batches together and drop every other cached one: the
        forwards are full, and memory does not grow with the library."""
        kept = set(prompts)
        self._cache = {k: v for k, v in self._cache.items() if k in kept}
        self.embed_texts(prompts)

    # -- images ----------------------------------------------------------------------------
    def pixel_values(self, images):
        """uint8 ``(B, 3, H, W)``, or a list of ``(3, H, W)`` of any sizes → pixel values."""
        return self.image_inputs(images)["pixel_values"]

    def image_inputs(self, images) -> dict[str, Any]:
        """uint8 ``(B, 3, H, W)``, or a list of ``(3, H, W)`` of any sizes → the image tower's
        keyword arguments (with the exact path, all the processor gives it)."""
        torch = self._torch
        if isinstance(images, (list, tuple)):
            if len({tuple(img.shape) for img in images}) == 1:
                images = _stacked(images) if str(self.device).startswith("cpu") else torch.stack(list(images))
            elif self.transform is not None:
                return {"pixel_values": torch.cat([self.transform(img[None].to(self.device)) for img in images])}
        if self.transform is not None:
            return {"pixel_values": self.transform(images.to(self.device))}
        return exact(self.processor, images)

    def embed_images(self, images):
        """uint8 images (see ``pixel_values``) → unit-norm float32 embeddings on our device."""
        torch = self._torch
        with torch.inference_mode(), self._autocast():
            inputs = {k: v.to(self.device) for k, v in self.image_inputs(images).items()}  # pixel values in float32
            vectors = _features(self.model.get_image_features(**inputs)).float()
        return vectors / vectors.norm(dim=-1, keepdim=True)

    def score(self, images, prompts: Sequence[str]) -> tuple[list[float], list[bool]]:
        """Per-image cosine with its own prompt, and whether that prompt was truncated."""
        torch = self._torch
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        texts = self.embed_texts(prompts)
        image_vectors = self.embed_images(images)
        text_vectors = torch.stack([t.vector for t in texts])  # both on our device
        cosines = (image_vectors * text_vectors).sum(dim=-1).cpu().tolist()
        return cosines, [t.truncated for t in texts]


def _stacked(images):
    """Same-shape ``(3, H, W)`` images as one channels-last batch: a decoded PNG is channels-last
    in memory, so this copies rows where ``torch.stack`` would move every pixel, and the CPU
    resize (PIL's, channels-last) takes the batch as it is."""
    import torch

    return torch.stack([img.permute(1, 2, 0) for img in images]).permute(0, 3, 1, 2)


def _local(spec: str, option: str, revision: str | None, allow_pickle: bool) -> str:
    """A local folder (checked), the demo model, or a hub id as given."""
    if spec == "demo":
        from clipeval import demo

        return str(demo.demo_clip_dir())
    path = Path(spec).expanduser()
    if not path.exists():
        return spec
    if not Path(path, "config.json").is_file() and option == "--clip-model":
        raise ClipevalError(f"{option} {spec}: not a transformers model folder (no config.json)")
    if revision is not None:
        raise ClipevalError(f"--clip-revision applies to hub ids; {spec} is local")
    if not allow_pickle and not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        from clipeval.hub import PICKLE_HINT

        raise ClipevalError(f"{option} {spec} holds only pickle weights: {PICKLE_HINT}")
    return str(path)
