"""`PhasedMoEPipeline` and its `ExpertSwitcher`, imported on first use (diffusers loads only then)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING


_LAZY = {"ExpertSwitcher": ".expert_swap", "PhasedMoEPipeline": ".pipeline_phased_moe"}

__all__ = ["ExpertSwitcher", "PhasedMoEPipeline"]

if TYPE_CHECKING:
    from .expert_swap import ExpertSwitcher
    from .pipeline_phased_moe import PhasedMoEPipeline


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})
