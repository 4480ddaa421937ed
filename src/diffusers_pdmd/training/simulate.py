"""How each method produces the sample its DMD loss is applied to.

- Phased DMD: back-simulation through the frozen experts of the earlier phases, then the current expert with
  gradient through its last step only; the output is `x_s` at the phase's end boundary `s`.
- Vanilla DMD: one step from noise to `x_0`.
- SGTS (DMD2 / Self-Forcing): one N-step generator, exit at a random step `j` with gradient through that step.

Experts are callables `velocity = f(x_t, t)` with `t` a `(B,)` tensor; conditioning is closed over by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .flow import euler_step, x0_from_velocity
from .options import METHODS


Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def split_by_phase(sigmas, steps_per_phase: Sequence[int], boundaries: Sequence[float]) -> list[list[float]]:
    """Cut a scheduler's sigmas (N+1 values ending at 0) into per-phase lists from each phase's start to its end
    boundary inclusive, with the boundaries exact (not their float32 images)."""
    sig = [float(x) for x in sigmas]
    out, start = [], 0
    for n in steps_per_phase:
        out.append(sig[start : start + n + 1])
        start += n
    out[-1][-1] = 0.0
    for k, b in enumerate(boundaries):
        out[k][-1] = out[k + 1][0] = float(b)
    return out


def phase_sigmas(boundaries: Sequence[float], steps_per_phase: Sequence[int], shift: float = 1.0) -> list[list[float]]:
    """Sigmas of each phase, from its start to its end boundary inclusive, as [`PhasedDMDScheduler`] places them.

    Example: `phase_sigmas([0.875], [2, 2], 5.0)` -> `[[1.0, 0.95, 0.875], [0.875, 0.673..., 0.0]]`.
    """
    from ..schedulers import PhasedDMDScheduler

    scheduler = PhasedDMDScheduler(
        phase_boundaries=list(boundaries), steps_per_phase=list(steps_per_phase), shift=shift
    )
    return split_by_phase(scheduler.sigmas.double(), steps_per_phase, boundaries)


def _t(value: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=torch.float32)


def run_phase(x: torch.Tensor, sigmas: Sequence[float], expert: Velocity, grad_last_step: bool = False):
    """Euler-integrate one phase along `sigmas` with `expert`; only the last step may carry gradient."""
    n = len(sigmas) - 1
    for i in range(n):
        with torch.set_grad_enabled(grad_last_step and i == n - 1 and torch.is_grad_enabled()):
            x = euler_step(x, sigmas[i], sigmas[i + 1], expert(x, _t(sigmas[i], x)))
    return x


def backsimulate(
    noise: torch.Tensor,
    sigmas_by_phase: Sequence[Sequence[float]],
    experts: Sequence[Velocity],
    phase: int,
    grad: bool = True,
) -> tuple[torch.Tensor, float]:
    """Phased back-simulation for training phase `phase` (0-based).

    From `noise` at `t = 1`, the frozen experts `0..phase-1` run their phases without gradient to the start of
    `phase`; expert `phase` then runs its steps, with gradient only through its last step when `grad` is True.

    Args:
        noise (`torch.Tensor`): Standard normal noise in the model's input space.
        sigmas_by_phase: Per-phase sigmas from [`phase_sigmas`].
        experts: One velocity callable per phase (at least `phase + 1`).
        phase (`int`): The phase being trained.
        grad (`bool`): Keep the graph of the last step.

    Returns:
        `(x_s, s)`: the sample at the phase's end boundary and that boundary (0.0 for the last phase).
    """
    if not 0 <= phase < len(sigmas_by_phase):
        raise ValueError(f"`phase` must be in [0, {len(sigmas_by_phase) - 1}], got {phase}.")
    if len(experts) <= phase:
        raise ValueError(f"`experts` has {len(experts)} entries, phase {phase} needs at least {phase + 1}.")
    x = noise
    with torch.no_grad():
        for k in range(phase):
            x = run_phase(x, sigmas_by_phase[k], experts[k])
    x = run_phase(x, sigmas_by_phase[phase], experts[phase], grad_last_step=grad)
    return x, float(sigmas_by_phase[phase][-1])


def sgts_generate(
    noise: torch.Tensor,
    sigmas: Sequence[float],
    expert: Velocity,
    exit_step: int,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
    grad: bool = True,
) -> torch.Tensor:
    """Stochastic gradient truncation: steps `1..j-1` without gradient, step `j` with gradient, return its `x_0`.

    Args:
        noise (`torch.Tensor`): Noise at `sigmas[0] = 1`.
        sigmas: The generator's N+1 sigmas, ending at 0.
        expert: The generator's velocity callable.
        exit_step (`int`): `j` in `1..N`; `j = 1` is one-step DMD.
        stochastic (`bool`): Between steps, re-noise the `x_0` prediction with fresh noise (DMD2 / Self-Forcing)
            instead of an Euler step. Sampling must then use `PhasedDMDScheduler(stochastic_sampling=True)`.
        generator (`torch.Generator`, *optional*): For the re-noising.
        grad (`bool`): Keep the graph of step `j`.
    """
    n = len(sigmas) - 1
    if not 1 <= exit_step <= n:
        raise ValueError(f"`exit_step` must be in [1, {n}], got {exit_step}.")
    x = noise
    with torch.no_grad():
        for i in range(exit_step - 1):
            v = expert(x, _t(sigmas[i], x))
            if stochastic:
                x0 = x0_from_velocity(x, sigmas[i], v)
                fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * fresh
            else:
                x = euler_step(x, sigmas[i], sigmas[i + 1], v)
    t = sigmas[exit_step - 1]
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return x0_from_velocity(x, t, expert(x, _t(t, x)))


def generator_sample(
    method: str,
    noise: torch.Tensor,
    sigmas_by_phase: Sequence[Sequence[float]],
    experts: Sequence[Velocity],
    phase: int = 0,
    grad: bool = True,
    generator: torch.Generator | None = None,
    sgts_stochastic: bool = True,
) -> tuple[torch.Tensor, float]:
    """The sample (and its time `s`) that `method`'s DMD loss is applied to.

    - `"phased_dmd"`: [`backsimulate`] to the end of `phase`.
    - `"dmd"`: one step of `experts[0]` from noise: `x_0 = z - v(z, 1)`; `s = 0`.
    - `"sgts"`: [`sgts_generate`] with `j` uniform in `1..N` over the single phase's N steps; `s = 0`.
    """
    if method == "phased_dmd":
        return backsimulate(noise, sigmas_by_phase, experts, phase, grad=grad)
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}.")
    if len(sigmas_by_phase) != 1:
        raise ValueError(f"`{method}` trains one generator: expected one phase, got {len(sigmas_by_phase)}.")
    sigmas = sigmas_by_phase[0]
    if method == "dmd":
        return sgts_generate(noise, [1.0, 0.0], experts[0], 1, grad=grad), 0.0
    j = int(torch.randint(1, len(sigmas), (1,), generator=generator).item())
    return sgts_generate(noise, sigmas, experts[0], j, stochastic=sgts_stochastic, generator=generator, grad=grad), 0.0
