"""`PhasedMoEPipeline` and its `ExpertSwitcher`, imported on first use (diffusers loads only then)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes


_LAZY = {"ExpertSwitcher": ".expert_swap", "PhasedMoEPipeline": ".pipeline_phased_moe"}

__all__ = ["ExpertSwitcher", "PhasedMoEPipeline"]

if TYPE_CHECKING:
    from .expert_swap import ExpertSwitcher
    from .pipeline_phased_moe import PhasedMoEPipeline


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
