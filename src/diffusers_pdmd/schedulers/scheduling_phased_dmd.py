# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""Few-step flow-matching scheduler whose timesteps fall into SNR phases (Phased DMD)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class PhasedDMDSchedulerOutput(BaseOutput):
    """Output of [`PhasedDMDScheduler.step`].

    Args:
        prev_sample (`torch.Tensor`):
            The sample at the next (less noisy) time of the schedule.
        pred_original_sample (`torch.Tensor`):
            The clean-data prediction `x_0 = x_t - sigma * v` made at the current time.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def _shift(t, shift: float):
    return shift * t / (1 + (shift - 1) * t)


def _unshift(t, shift: float):
    return t / (shift - (shift - 1) * t)


class PhasedDMDScheduler(SchedulerMixin, ConfigMixin):
    """Few-step Euler scheduler for rectified-flow models distilled with Phased DMD.

    The noise range `1 = t_0 > t_1 > ... > t_K = 0` is split at `phase_boundaries` into K phases (SNR
    subintervals); phase `k` takes `steps_per_phase[k]` steps and starts exactly at its boundary, so a phased
    mixture of experts can pick its expert with [`~PhasedDMDScheduler.phase_index`]. Inside a phase the steps are
    spaced uniformly in unshifted time and then shifted, as `FlowMatchEulerDiscreteScheduler` does.

    The model output is the flow velocity `v = eps - x_0`; `t` here is diffusers' `sigma` and the diffusers
    timestep is `t * num_train_timesteps`.

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            Scale between sigmas and timesteps.
        phase_boundaries (`list[float]`, defaults to `[0.875]`):
            The K-1 sigmas, strictly decreasing inside (0, 1), where one phase ends and the next begins, in the
            sigmas the model sees (after any shift). `[0.875]` is Wan2.2 T2V-A14B's high-/low-noise switch.
        steps_per_phase (`list[int]`, defaults to `[2, 2]`):
            K positive step counts, one per phase.
        shift (`float`, defaults to 1.0):
            Static time shift `t -> shift * t / (1 + (shift - 1) t)` applied inside each phase.
        use_dynamic_shifting (`bool`, defaults to False):
            Take the shift from `mu` in [`~PhasedDMDScheduler.set_timesteps`] (Qwen-Image's resolution-dependent
            shift) instead of `shift`.
        base_shift, max_shift, base_image_seq_len, max_image_seq_len:
            Parameters of the dynamic shift as `FlowMatchEulerDiscreteScheduler` has them (used by pipelines to
            compute `mu`).
        time_shift_type (`str`, defaults to `"exponential"`):
            `"exponential"` (shift = exp(mu)) or `"linear"` (shift = mu) for dynamic shifting.
        stochastic_sampling (`bool`, defaults to False):
            False: Euler step `x <- x + (t_next - t) v` (how experts are back-simulated in training). True:
            predict `x_0`, then re-noise it to `t_next` with fresh noise.

    Example:
        ```py
        >>> from diffusers_pdmd import PhasedDMDScheduler

        >>> scheduler = PhasedDMDScheduler(phase_boundaries=[0.875], steps_per_phase=[2, 2], shift=5.0)
        >>> scheduler.set_timesteps()
        >>> [scheduler.phase_index(t) for t in scheduler.timesteps]
        [0, 0, 1, 1]
        ```
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        phase_boundaries: list[float] | tuple[float, ...] = (0.875,),
        steps_per_phase: list[int] | tuple[int, ...] = (2, 2),
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ):
        if not isinstance(num_train_timesteps, int) or num_train_timesteps <= 0:
            raise ValueError(f"`num_train_timesteps` must be a positive int, got {num_train_timesteps!r}.")
        boundaries = [float(b) for b in phase_boundaries]
        if any(not 0.0 < b < 1.0 for b in boundaries) or any(a <= b for a, b in zip(boundaries, boundaries[1:])):
            raise ValueError(
                f"`phase_boundaries` must be strictly decreasing values inside (0, 1), got {list(phase_boundaries)}."
            )
        steps = list(steps_per_phase)
        if len(steps) != len(boundaries) + 1 or any(
            isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1 for n in steps
        ):
            raise ValueError(
                f"`steps_per_phase` must be {len(boundaries) + 1} positive ints (one more than `phase_boundaries`, "
                f"which has {len(boundaries)}), got {steps}."
            )
        if not shift > 0:
            raise ValueError(f"`shift` must be > 0, got {shift!r}.")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"`time_shift_type` must be one of ['exponential', 'linear'], got {time_shift_type!r}.")
        if use_dynamic_shifting and (base_shift is None or max_shift is None):
            raise ValueError("`use_dynamic_shifting=True` needs numeric `base_shift` and `max_shift`.")

        # The config holds plain lists (as JSON gives them back), so that a saved and loaded scheduler has an equal
        # config whatever sequence type was passed.
        self.register_to_config(phase_boundaries=boundaries, steps_per_phase=[int(n) for n in steps])

        self.timesteps = None
        self.sigmas = None
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self.init_noise_sigma = 1.0
        # A default schedule so that the scheduler is usable at once; dynamic shifting starts unshifted.
        self.set_timesteps(mu=(0.0 if time_shift_type == "exponential" else 1.0) if use_dynamic_shifting else None)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Instantiate from a config dict, also the `FlowMatchEulerDiscreteScheduler` config of Qwen-Image and the
        `UniPCMultistepScheduler` flow config of Wan (its `flow_shift` becomes `shift`)."""
        if config is not None:
            config = dict(config)
            # Only a `flow_shift` the source config set itself: one it took by default would make `shift` look set
            # here, and a round trip through `UniPCMultistepScheduler` would change `_use_default_values`.
            flow_shift_set = "flow_shift" in config and "flow_shift" not in config.get("_use_default_values", [])
            if flow_shift_set and "shift" not in config and "shift" not in kwargs:
                config["shift"] = config["flow_shift"]
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def num_phases(self) -> int:
        """Number of phases K."""
        return len(self.config.phase_boundaries) + 1

    @property
    def step_index(self) -> int | None:
        """Index of the current step; `None` before the first `step` call."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First step index, set by pipelines with `set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Set the step index the next `step` call starts at (as diffusers' pipelines do)."""
        self._begin_index = begin_index

    def _effective_shift(self, mu: float | None) -> float:
        if not self.config.use_dynamic_shifting:
            return float(self.config.shift)
        if mu is None:
            raise ValueError("`mu` must be passed to `set_timesteps` when `use_dynamic_shifting` is True.")
        return math.exp(mu) if self.config.time_shift_type == "exponential" else float(mu)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | np.ndarray | None = None,
        mu: float | None = None,
    ):
        """Compute the phased schedule.

        Args:
            num_inference_steps (`int`, *optional*):
                Must equal `sum(steps_per_phase)` if given (the step count is fixed by the phases).
            device (`str` or `torch.device`, *optional*):
                Device of `timesteps` and `sigmas`.
            sigmas (`list[float]`, *optional*):
                Explicit decreasing sigmas in (0, 1] (a trailing 0 is optional). A sigma within 1e-5 of a phase
                boundary is set to the boundary exactly. A boundary need not be on the grid: it is then a routing
                threshold, as `WanPipeline`'s `boundary_ratio` is, and each step belongs to the phase whose interval
                holds its sigma ([`~PhasedDMDScheduler.phase_index_for_sigma`]). This is how released experts
                sampled on their authors' own grid are used; experts trained here keep their boundaries on the grid.
            mu (`float`, *optional*):
                Dynamic shift parameter; required when `use_dynamic_shifting` is True and `sigmas` is not given.
        """
        boundaries = [float(b) for b in self.config.phase_boundaries]
        total = sum(self.config.steps_per_phase)
        if sigmas is None:
            if num_inference_steps is not None and num_inference_steps != total:
                raise ValueError(
                    f"`num_inference_steps`={num_inference_steps} disagrees with `steps_per_phase`="
                    f"{list(self.config.steps_per_phase)}; allowed values: None or {total}."
                )
            shift = self._effective_shift(mu)
            edges = [1.0] + boundaries + [0.0]
            parts = []
            for k, n in enumerate(self.config.steps_per_phase):
                u = np.linspace(_unshift(edges[k], shift), _unshift(edges[k + 1], shift), n + 1)[:-1]
                phase_sigmas = _shift(u, shift)
                phase_sigmas[0] = edges[k]
                parts.append(phase_sigmas)
            sigmas = np.concatenate(parts)
        else:
            sigmas = np.asarray(sigmas, dtype=np.float64).copy()
            if sigmas.ndim != 1 or sigmas.size == 0:
                raise ValueError(f"`sigmas` must be a non-empty 1-D sequence, got shape {sigmas.shape}.")
            if sigmas[-1] == 0:
                sigmas = sigmas[:-1]
            if num_inference_steps is not None and num_inference_steps != len(sigmas):
                raise ValueError(
                    f"`num_inference_steps`={num_inference_steps} disagrees with len(sigmas)={len(sigmas)}."
                )
            if np.any(sigmas <= 0) or np.any(sigmas > 1) or np.any(np.diff(sigmas) >= 0):
                raise ValueError(f"`sigmas` must be strictly decreasing values in (0, 1], got {sigmas.tolist()}.")
            for b in boundaries:
                hit = np.flatnonzero(np.abs(sigmas - b) <= 1e-5)
                if hit.size:
                    sigmas[hit[0]] = b
        sigmas = torch.from_numpy(np.append(sigmas, 0.0)).to(dtype=torch.float32, device=device)
        self.sigmas = sigmas
        self.timesteps = sigmas[:-1] * self.config.num_train_timesteps
        self.num_inference_steps = len(self.timesteps)
        self._step_index = None
        self._begin_index = None

    def phase_index_for_sigma(self, sigma: float | torch.Tensor) -> int:
        """0-based phase owning noise level `sigma` in [0, 1].

        Phase `k` holds the half-open interval `(t_{k+1}, t_k]` of `1 = t_0 > t_1 > ... > t_K = 0` (the
        `phase_boundaries` between), so a sigma equal to a boundary (within 1e-6) belongs to the phase that boundary
        starts, the less noisy one. On this scheduler's own grid the boundary is the first step of that phase; with
        explicit `sigmas` that miss the boundary it is a routing threshold and the same rule applies to every step.
        (`WanPipeline` routes `t >= boundary_ratio * 1000` to its high-noise transformer, the other side at exactly
        the boundary; the released grids in `diffusers_pdmd.released.PRESETS` never sit on their threshold.)
        """
        if isinstance(sigma, torch.Tensor):
            if sigma.numel() != 1:
                raise ValueError(f"`sigma` must be a single value, got a tensor of shape {tuple(sigma.shape)}.")
            sigma = float(sigma.item())
        sigma = float(sigma)
        if not -1e-6 <= sigma <= 1 + 1e-6:
            raise ValueError(f"`sigma` must lie in [0, 1], got {sigma}.")
        return sum(1 for b in self.config.phase_boundaries if sigma <= float(b) + 1e-6)

    def phase_index(self, timestep: float | int | torch.Tensor) -> int:
        """0-based phase owning a diffusers timestep (`sigma * num_train_timesteps`): a float, int or 0-d tensor."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(
                    f"`timestep` must be a float, int or 0-d tensor, got a tensor of shape {tuple(timestep.shape)}."
                )
            timestep = timestep.item()
        return self.phase_index_for_sigma(float(timestep) / self.config.num_train_timesteps)

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of `timestep` in the schedule."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule_timesteps.device)
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"`timestep` {timestep} is not in the schedule {schedule_timesteps.tolist()}.")
        return indices[0].item()

    def _init_step_index(self, timestep):
        if self.begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> PhasedDMDSchedulerOutput | tuple:
        """Advance `sample` from the current sigma to the next one of the schedule.

        Args:
            model_output (`torch.Tensor`): The predicted flow velocity `v = eps - x_0`.
            timestep (`float` or `torch.Tensor`): The current timestep of the schedule.
            sample (`torch.Tensor`): The current sample `x_t`.
            generator (`torch.Generator`, *optional*): Noise source for `stochastic_sampling`.
            return_dict (`bool`): Return a [`PhasedDMDSchedulerOutput`] instead of a tuple.

        Returns:
            [`PhasedDMDSchedulerOutput`] or `(prev_sample, pred_original_sample)`.
        """
        if self.timesteps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= self.num_inference_steps:
            raise ValueError(f"`step` called {self._step_index + 1} times for {self.num_inference_steps} steps.")

        sample_f = sample.to(torch.float32)
        v = model_output.to(torch.float32)
        sigma = self.sigmas[self._step_index]
        sigma_next = self.sigmas[self._step_index + 1]
        x0 = sample_f - sigma * v
        if self.config.stochastic_sampling:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
            prev_sample = (1 - sigma_next) * x0 + sigma_next * noise
        else:
            prev_sample = sample_f + (sigma_next - sigma) * v
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        x0 = x0.to(model_output.dtype)
        if not return_dict:
            return (prev_sample, x0)
        return PhasedDMDSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _sigma_from_timestep(self, timestep, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=like.device, dtype=torch.float32) / self.config.num_train_timesteps
        if t.ndim == 1 and like.ndim > 1:
            t = t.reshape(-1, *([1] * (like.ndim - 1)))
        if torch.any(t < 0) or torch.any(t > 1):
            raise ValueError(f"`timestep` must lie in [0, {self.config.num_train_timesteps}], got {timestep}.")
        return t

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Forward process of flow matching: `x_t = sigma * noise + (1 - sigma) * sample`, `sigma = t / T`.

        `timestep` is a float, a 0-d tensor or one value per batch element, in diffusers' timestep units.
        """
        if noise is None:
            raise ValueError("`noise` must be given to `scale_noise`.")
        sig = self._sigma_from_timestep(timestep, sample)
        return (sig * noise.float() + (1 - sig) * sample.float()).to(sample.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Same as [`~PhasedDMDScheduler.scale_noise`] with diffusers' `add_noise` argument order."""
        return self.scale_noise(original_samples, timesteps, noise)

    def __len__(self):
        return self.config.num_train_timesteps
