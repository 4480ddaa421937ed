"""What is trained: the phases, their boundaries and steps, and where each global step falls."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Plan:
    """What is trained: phases, their sigmas, and the position of each global step."""

    method: str
    boundaries: list[float]
    steps_per_phase: list[int]
    phases: list[int]
    max_steps: int
    order: str

    @property
    def num_phases(self) -> int:
        return len(self.steps_per_phase)

    @property
    def total_steps(self) -> int:
        return self.max_steps * len(self.phases)

    def position(self, global_step: int) -> tuple[int, int]:
        """`(phase, step within the phase)` of a global step."""
        if self.order == "alternate":
            return self.phases[global_step % len(self.phases)], global_step // len(self.phases)
        return self.phases[global_step // self.max_steps], global_step % self.max_steps


def make_plan(args, family) -> Plan:
    """The plan of the flags (parsed, or resolved into [`Settings`]) for `family` (its MoE boundary is the default)."""
    from ..schedulers import PhasedDMDScheduler

    if args.method == "phased_dmd":
        boundaries = args.phase_boundaries
        if boundaries is None:
            ratio = getattr(family, "boundary_ratio", None)
            boundaries = [float(ratio)] if ratio is not None else [0.875]
        steps = list(args.steps_per_phase)
        if len(steps) != len(boundaries) + 1:
            raise ValueError(
                f"`--steps_per_phase` needs {len(boundaries) + 1} values for {len(boundaries)} boundaries "
                f"{boundaries}, got {steps}."
            )
    elif args.method == "dmd":
        boundaries, steps = [], [1]
    else:
        boundaries, steps = [], [sum(args.steps_per_phase)]
    PhasedDMDScheduler(phase_boundaries=boundaries, steps_per_phase=steps)  # validates them
    k = len(steps)
    if args.train_phase == "all":
        phases = list(range(k))
    elif isinstance(args.train_phase, int) and 0 <= args.train_phase < k:
        phases = [args.train_phase]
    else:
        raise ValueError(f"`--train_phase` must be 'all' or an index in [0, {k - 1}], got {args.train_phase!r}.")
    return Plan(args.method, [float(b) for b in boundaries], steps, phases, args.max_train_steps, args.phase_order)
