"""Scorers: what the run loop, ``score`` and ``evaluate()`` need of a model, and the short names
of well-known ones (``scorers.toml``, data beside this module)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

# Distinct prompts a scorer embeds together ahead of their images (see Ahead).
TEXT_WINDOW = 512


class Scorer(Protocol):
    """What the run loop, ``score``, ``evaluate()``, the statistics and the manifest need of a
    scorer; ``ClipScorer`` (a dual encoder's cosine) and ``VqaScorer`` (VQAScore) implement it.

    It takes uint8 RGB images as saved, ``(B, 3, H, W)`` or a list of ``(3, H, W)`` of any sizes,
    with one prompt each, and returns one float per image and whether its prompt was cut to fit
    the model. ``metric`` ("clip" or "vqa"), ``definition`` and ``scale`` say what the number is
    (summary.json), ``describe()`` what else the manifest records (VQAScore: the question and the
    answer token it reads)."""

    name: str  # as the user gave it: a short name, hub id or folder (its label names its column)
    metric: str
    definition: str
    scale: str
    model_class: str
    processor_name: str | None
    dtype: str
    max_length: int | None  # the model's text positions

    def score(self, images: Any, prompts: Sequence[str]) -> tuple[list[float], list[bool]]: ...

    def prepare(self, prompts: Sequence[str]) -> None:
        """The prompts of the coming batches: embed them now, together, and forget the others."""
        ...

    def describe(self) -> dict[str, Any]: ...


class Ahead:
    """Scores batches through ``scorer``, preparing the prompts of the coming ones
    ``TEXT_WINDOW`` distinct prompts at a time. One batch rarely holds two prompts of a length,
    so text forwards batch by batch ran mostly copies (300 rows for 96 prompts); ahead, they are
    full, and the scorer's cache stays bounded by the window."""

    def __init__(self, scorer: Scorer, prompts: Iterable[str], window: int | None = None):
        self.scorer = scorer
        self.order = list(dict.fromkeys(prompts))  # in the order the batches will ask for them
        self.position = {p: i for i, p in enumerate(self.order)}
        self.window = window or TEXT_WINDOW
        self.ready: set[str] = set()

    def score(self, images: Any, prompts: Sequence[str]) -> tuple[list[float], list[bool]]:
        missing = [p for p in prompts if p not in self.ready]
        if missing:
            start = min(self.position.get(p, len(self.order)) for p in missing)
            coming = list(dict.fromkeys([*prompts, *self.order[start : start + self.window]]))
            self.scorer.prepare(coming)
            self.ready = set(coming)
        return self.scorer.score(images, prompts)


KINDS = ("clip", "vqa")


@dataclass(frozen=True)
class KnownScorer:
    name: str
    model: str
    processor: str | None
    scale: str
    kind: str = "clip"  # "clip": a dual encoder's cosine; "vqa": VQAScore of a vision-language model
    needs: str | None = None  # a package its processor needs beyond clipeval's own


def known() -> dict[str, KnownScorer]:
    import tomllib
    from importlib import resources

    data = tomllib.loads(resources.files("clipeval").joinpath("scorers.toml").read_text(encoding="utf-8"))
    return {name: KnownScorer(name, v["model"], v.get("processor"), v["scale"], v.get("kind", "clip"), v.get("needs"))
            for name, v in data.items()}


def resolve(spec: str) -> KnownScorer | None:
    """A short name, unless a local folder of that name exists (a path always means the path)."""
    if Path(spec).expanduser().exists():
        return None
    return known().get(spec)


def make_scorer(spec: str, *, device: str = "cpu", dtype: str = "float32", preprocess: str = "fast",
                revision: str | None = None, allow_pickle: bool = False, processor: str | None = None,
                log: Any = None) -> Scorer:
    """The one place scorers are built: a model id, folder, short name or 'demo'. A CLIP-family
    dual encoder gives ``ClipScorer`` (cosine), a vision-language model ``VqaScorer`` (VQAScore):
    the short name's kind says which, else the model's own config."""
    from clipeval.errors import ClipevalError
    from clipeval.score import ClipScorer
    from clipeval.vqa import VqaScorer, is_vision_language

    entry = resolve(spec)
    model, processor = (entry.model, processor or entry.processor) if entry else (spec, processor)
    try:
        if (entry.kind == "vqa") if entry else is_vision_language(model, revision, allow_pickle):
            return VqaScorer(model, device=device, dtype=dtype, revision=revision, allow_pickle=allow_pickle,
                             processor=processor, name=spec, log=log)
        return ClipScorer(model, device=device, dtype=dtype, preprocess=preprocess, revision=revision,
                          allow_pickle=allow_pickle, processor=processor, name=spec, log=log)
    except ClipevalError as err:
        close = [] if entry or "/" in spec else difflib.get_close_matches(spec, known(), n=3)
        if not close:
            raise
        raise ClipevalError(f"{err}; did you mean {' or '.join(close)}? ('clipeval scorers' lists them)") from err
