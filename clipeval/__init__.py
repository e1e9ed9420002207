"""clipeval: does this text-to-image checkpoint follow prompts better than the last one?

The heavy parts (torch, diffusers, transformers) are imported lazily, so ``clipeval --help`` and
``import clipeval`` stay instant; ``evaluate`` and friends load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"
