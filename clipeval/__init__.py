"""clipeval: does this text-to-image checkpoint follow prompts better than the last one?

The heavy parts (torch, diffusers, transformers) are imported lazily, so ``clipeval --help`` and
``import clipeval`` stay instant; ``evaluate`` and friends load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["evaluate", "run", "RunConfig", "ClipScorer", "load_library"]


def __getattr__(name: str):
    """``from clipeval import evaluate`` without importing torch until it is called for."""
    if name in ("evaluate", "run", "RunConfig"):
        from clipeval import runner

        return getattr(runner, name)
    if name == "ClipScorer":
        from clipeval.score import ClipScorer

        return ClipScorer
    if name == "load_library":
        from clipeval.prompts import load_library

        return load_library
    raise AttributeError(f"module 'clipeval' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy names too, so tab completion and ``dir(clipeval)`` find them."""
    return sorted({*globals(), *__all__})
