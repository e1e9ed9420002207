"""Scorers: what the run loop, ``score`` and ``evaluate()`` need of a model, and the short names
of well-known ones (``scorers.toml``, data beside this module)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence


class Scorer(Protocol):
    """A loaded image-text model. ``score`` returns, per image, the cosine of the normalised image
    and text embeddings in float32, and whether its prompt was truncated to ``max_length``."""

    name: str
    max_length: int

    def score(self, images: Any, prompts: Sequence[str]) -> tuple[list[float], list[bool]]: ...

    def forget(self, keep: Sequence[str] = ()) -> None: ...


@dataclass(frozen=True)
class KnownScorer:
    name: str
    model: str
    processor: str | None
    scale: str


def known() -> dict[str, KnownScorer]:
    import tomllib
    from importlib import resources

    data = tomllib.loads(resources.files("clipeval").joinpath("scorers.toml").read_text(encoding="utf-8"))
    return {name: KnownScorer(name, v["model"], v.get("processor"), v["scale"]) for name, v in data.items()}


def resolve(spec: str) -> KnownScorer | None:
    """A short name, unless a local folder of that name exists (a path always means the path)."""
    if Path(spec).expanduser().exists():
        return None
    return known().get(spec)


def make_scorer(spec: str, *, device: str = "cpu", dtype: str = "float32", preprocess: str = "fast",
                revision: str | None = None, allow_pickle: bool = False, processor: str | None = None,
                log: Any = None) -> Scorer:
    """The one place scorers are built: a model id, folder, short name or 'demo'."""
    from clipeval.score import ClipScorer

    from clipeval.errors import ClipevalError

    entry = resolve(spec)
    model, processor = (entry.model, processor or entry.processor) if entry else (spec, processor)
    try:
        return ClipScorer(model, device=device, dtype=dtype, preprocess=preprocess, revision=revision,
                          allow_pickle=allow_pickle, processor=processor, name=spec, log=log)
    except ClipevalError as err:
        close = [] if entry or "/" in spec else difflib.get_close_matches(spec, known(), n=3)
        if not close:
            raise
        raise ClipevalError(f"{err}; did you mean {' or '.join(close)}? ('clipeval scorers' lists them)") from err
