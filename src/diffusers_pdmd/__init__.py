"""diffusers-pdmd: Phased DMD (few-step distribution matching distillation with one expert per SNR subinterval)."""

__version__ = "0.1.0.dev0"

from .schedulers import PhasedDMDScheduler, PhasedDMDSchedulerOutput


__all__ = ["PhasedDMDScheduler", "PhasedDMDSchedulerOutput", "__version__"]

try:  # the pipeline is optional while it is being built; it only needs diffusers, which is a hard dependency
    from .pipelines import PhasedMoEPipeline  # noqa: F401

    __all__.append("PhasedMoEPipeline")
except ImportError:  # pragma: no cover
    pass
