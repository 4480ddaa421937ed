"""`PhasedDMDScheduler`, imported on first use (diffusers loads only then)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING


_LAZY = {"PhasedDMDScheduler": ".scheduling_phased_dmd", "PhasedDMDSchedulerOutput": ".scheduling_phased_dmd"}

__all__ = ["PhasedDMDScheduler", "PhasedDMDSchedulerOutput"]

if TYPE_CHECKING:
    from .scheduling_phased_dmd import PhasedDMDScheduler, PhasedDMDSchedulerOutput


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})
