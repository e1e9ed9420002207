"""VQAScore (Lin et al., ECCV 2024): the probability that a vision-language model answers "Yes" to
``Does this figure show "{prompt}"? Please answer yes or no.``, in [0, 1].

The question goes through the model's own chat template with the generation prompt, and the score
is the softmax, over the whole vocabulary and in float32, of the logits at the first answer
position, read at the answer token: exactly what ``generate(max_new_tokens=1, output_scores=True)``
would see, from one forward per image with no generation loop and no cache. Batches are left
padded (the last position is every row's answer position; transformers derives positions from the
attention mask, so a padded row computes what it computes alone). Images go to the model's own
processor at its own resolution.

Any model ``AutoModelForImageTextToText`` loads without remote code works (LLaVA, LLaVA-OneVision,
SmolVLM / Idefics3, Qwen2.5-VL / Qwen3-VL where torchvision is installed, PaliGemma 2, ...).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

from clipeval.errors import ClipevalError
from clipeval.hub import torch_dtype

QUESTION = 'Does this figure show "{}"? Please answer yes or no.'
ANSWER = "Yes"
DEFINITION = ("VQAScore: P(\"Yes\") of a vision-language model asked 'Does this figure show \"{prompt}\"? Please answer "
              "yes or no.' through its chat template, the softmax over its vocabulary at the first answer token, in float32, "
              "in [0, 1]")


@dataclass(frozen=True)
class Question:
    text: str  # the chat-templated prompt, up to the answer
    truncated: bool


class VqaScorer:
    """A loaded vision-language model and processor, ready to score batches with VQAScore."""

    metric = "vqa"
    definition = DEFINITION
    scale = "probability"

    def __init__(self, model: str, *, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
                 allow_pickle: bool = False, processor: str | None = None, name: str | None = None, log: Any = None,
                 question: str = QUESTION, answer: str = ANSWER) -> None:
        from clipeval.hub import hub_error, quiet_hf
        from clipeval.score import _local

        quiet_hf(with_diffusers=False)
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.name = name or model
        location = _local(model, "--scorer", revision, allow_pickle)
        processor_location = _local(processor, "--clip-processor", None, True) if processor else location
        check_vision_language(location, self.name, revision)
        try:
            self.processor = AutoProcessor.from_pretrained(processor_location, revision=None if processor else revision)
        except ImportError as err:
            raise ClipevalError(f"{self.name}: its processor needs a package that is not installed ({err}); Qwen-VL "
                                "processors need torchvision: pip install torchvision") from err
        except Exception as err:
            raise ClipevalError(f"could not load the processor of {self.name}: {hub_error(err)}") from err
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None or not hasattr(self.processor, "image_processor"):
            raise ClipevalError(f"{self.name}: its processor ({type(self.processor).__name__}) has no tokenizer and image "
                                "processor; VQAScore needs a vision-language model's processor")
        if not (getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)):
            raise ClipevalError(f"{self.name}: its processor has no chat template, so clipeval cannot ask it a question "
                                "as the model was trained to be asked")
        self.tokenizer.padding_side = "left"
        # Half weights on an accelerator (a 7B model in float32 is 28 GB, and twice as slow):
        # bfloat16 unless --clip-dtype asks float16; float32 on the CPU unless asked, where half
        # precision is emulated and slower.
        if dtype == "float32" and not str(device).startswith("cpu"):
            dtype = "bfloat16"
        weights = torch.float32 if dtype == "float32" else torch_dtype(dtype)
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(
                location, dtype=weights, use_safetensors=None if allow_pickle else True, revision=revision,
                attn_implementation="sdpa",
            )
        except Exception as err:
            raise ClipevalError(f"could not load vision-language model {self.name}: {hub_error(err)}") from err
        self.model.eval().to(device)
        self.model_class = type(self.model).__name__
        self.processor_name = processor
        self.device = device
        self.dtype = dtype
        self.preprocess = "processor"
        self.question = question
        text_config = self.model.config.get_text_config()
        self.max_length = int(getattr(text_config, "max_position_embeddings", 0) or 0) or None
        self.answer_text, self.answer_id = answer_token(self.processor, self._chat("a photo"), answer, self.name)
        self.answer_token = self.tokenizer.convert_ids_to_tokens(self.answer_id)
        self._cache: dict[str, Question] = {}
        self._torch = torch

    def describe(self) -> dict[str, Any]:
        """What the manifest records: the question, the answer and its token."""
        return {"question": self.question, "answer": self.answer_text, "answer_token": self.answer_token,
                "answer_token_id": self.answer_id, "chat_template": "the processor's own"}

    def _chat(self, prompt: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question.format(prompt)}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def questions(self, prompts: Sequence[str]) -> list[Question]:
        """Each prompt's templated question, cut (and flagged) where the question alone would not
        leave the image and answer room in the model's positions."""
        for prompt in dict.fromkeys(p for p in prompts if p not in self._cache):
            self._cache[prompt] = self._question(prompt)
        return [self._cache[p] for p in prompts]

    def _question(self, prompt: str) -> Question:
        text = self._chat(prompt)
        if self.max_length is None:
            return Question(text, False)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        budget = self.max_length - self._overhead
        # Near the limit the real length decides (the template's tokens next to the prompt's may
        # merge otherwise than alone); far from it, the count of the prompt's own tokens does.
        if len(ids) < budget - 8 or self._length(text) + 1 <= self.max_length:
            return Question(text, False)
        kept = ids[: max(budget, 0)]
        while True:  # the template's tokens next to the prompt's may merge otherwise than alone: measure
            text = self._chat(self.tokenizer.decode(kept, skip_special_tokens=True))
            excess = self._length(text) + 1 - self.max_length
            if excess <= 0 or not kept:
                return Question(text, True)
            kept = kept[:-excess]

    def _length(self, text: str) -> int:
        """Tokens of a templated question with one image (a small square one)."""
        import numpy as np

        image = np.zeros((64, 64, 3), np.uint8)
        return int(self.processor(text=[text], images=[[image]], return_tensors="pt")["input_ids"].shape[-1])

    @functools.cached_property
    def _overhead(self) -> int:
        """Tokens around the prompt: template, question and one image's tokens, plus the answer's
        position; measured once, with an empty prompt (the cut checks the real length)."""
        return self._length(self._chat("")) + 1

    def prepare(self, prompts: Sequence[str]) -> None:
        kept = set(prompts)
        self._cache = {k: v for k, v in self._cache.items() if k in kept}
        self.questions(prompts)

    def score(self, images, prompts: Sequence[str]) -> tuple[list[float], list[bool]]:
        """Per image, P(answer) for its own prompt, and whether the prompt was cut."""
        torch = self._torch
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        questions = self.questions(prompts)
        arrays = [img.permute(1, 2, 0).cpu().numpy() for img in images]  # uint8 HWC, as the processor takes it
        inputs = self.processor(text=[q.text for q in questions], images=[[a] for a in arrays], padding=True,
                                return_tensors="pt")
        half = None if self.dtype == "float32" else torch_dtype(self.dtype)
        inputs = {k: (v.to(self.device, half) if half is not None and v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        with torch.inference_mode():
            logits = self.model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        probabilities = (logits[:, self.answer_id] - logits.logsumexp(dim=-1)).exp()
        return probabilities.cpu().tolist(), [q.truncated for q in questions]


def answer_token(processor, templated: str, answer: str, name: str) -> tuple[str, int]:
    """The one token the model would emit to start ``answer`` right after the generation prompt:
    the token that tokenizing the templated question plus the answer adds. "Yes" directly, or " Yes"
    where the template ends without a space and the tokenizer marks word starts (SentencePiece's
    "▁Yes" after LLaVA-1.5's "ASSISTANT:"). Refused when neither is one token."""
    tokenizer = processor.tokenizer
    base = tokenizer(templated, add_special_tokens=False)["input_ids"]
    for text in (answer, " " + answer):
        ids = tokenizer(templated + text, add_special_tokens=False)["input_ids"]
        if len(ids) == len(base) + 1 and ids[: len(base)] == base:
            return text, int(ids[-1])
    pieces = tokenizer.tokenize(answer)
    raise ClipevalError(f"{name}: its tokenizer has no single token for the answer {answer!r} after its chat template "
                        f"(it splits it into {pieces}); VQAScore reads one logit")


def is_vision_language(model: str, revision: str | None, allow_pickle: bool = False) -> bool:
    """Whether ``model`` (a folder or hub id) is a vision-language model, from its config alone; a
    config that cannot be read says so through the CLIP loader's error, except one that needs
    remote code, which is refused here."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from clipeval.score import _local

    if model == "demo":
        return False
    location = _local(model, "--scorer", revision, allow_pickle)
    try:
        config = AutoConfig.from_pretrained(location, revision=revision)
    except ValueError as err:
        if "trust_remote_code" in str(err) or "remote code" in str(err):
            check_vision_language(location, model, revision)  # raises, saying so
        return False
    except Exception:  # noqa: BLE001 - unreadable here: the CLIP loader says why, in its words
        return False
    if getattr(config, "auto_map", None) and config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        check_vision_language(location, model, revision)
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def check_vision_language(location: str, name: str, revision: str | None) -> None:
    """Refuse, before loading weights, a model that is not an image-text-to-text model or that
    needs remote code (clipeval never runs a repository's code)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from clipeval.hub import hub_error

    try:
        config = AutoConfig.from_pretrained(location, revision=revision)
    except ValueError as err:
        if "trust_remote_code" in str(err) or "remote code" in str(err):
            raise ClipevalError(f"{name} needs remote code (trust_remote_code), which clipeval never runs; use a model "
                                "transformers supports natively") from err
        raise ClipevalError(f"could not read the configuration of {name}: {hub_error(err)}") from err
    except Exception as err:
        raise ClipevalError(f"could not read the configuration of {name}: {hub_error(err)}") from err
    if getattr(config, "auto_map", None) and config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ClipevalError(f"{name} needs remote code (its config maps to its own classes), which clipeval never runs")
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ClipevalError(f"{name} is a {config.model_type} model, not a vision-language model that "
                            "AutoModelForImageTextToText loads (LLaVA, SmolVLM, Qwen2.5-VL, PaliGemma, ...)")

