from .scheduling_phased_dmd import PhasedDMDScheduler, PhasedDMDSchedulerOutput


__all__ = ["PhasedDMDScheduler", "PhasedDMDSchedulerOutput"]
