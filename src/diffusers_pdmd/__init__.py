"""diffusers-pdmd: Phased DMD (few-step distribution matching distillation with one expert per SNR subinterval).

The public classes are imported on first use (module `__getattr__`), so `import diffusers_pdmd` loads neither torch
nor diffusers; `from diffusers_pdmd import PhasedMoEPipeline` loads what that class needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes


__version__ = "0.1.0.dev0"

# public name -> submodule that defines it
_LAZY = {
    "PhasedDMDScheduler": ".schedulers",
    "PhasedDMDSchedulerOutput": ".schedulers",
    "PhasedMoEPipeline": ".pipelines",
    "ExpertSwitcher": ".pipelines",
}

__all__ = ["ExpertSwitcher", "PhasedDMDScheduler", "PhasedDMDSchedulerOutput", "PhasedMoEPipeline", "__version__"]

if TYPE_CHECKING:
    from .pipelines import ExpertSwitcher, PhasedMoEPipeline
    from .schedulers import PhasedDMDScheduler, PhasedDMDSchedulerOutput


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
