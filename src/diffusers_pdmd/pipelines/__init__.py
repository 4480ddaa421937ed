from .expert_swap import ExpertSwitcher
from .pipeline_phased_moe import PhasedMoEPipeline


__all__ = ["ExpertSwitcher", "PhasedMoEPipeline"]
