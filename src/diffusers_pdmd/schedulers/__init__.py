"""`PhasedDMDScheduler`, imported on first use (diffusers loads only then)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes


_LAZY = {"PhasedDMDScheduler": ".scheduling_phased_dmd", "PhasedDMDSchedulerOutput": ".scheduling_phased_dmd"}

__all__ = ["PhasedDMDScheduler", "PhasedDMDSchedulerOutput"]

if TYPE_CHECKING:
    from .scheduling_phased_dmd import PhasedDMDScheduler, PhasedDMDSchedulerOutput


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
