"""A small training loop that wires the library's losses together, for toy teachers and MLP students.

It exists so tests and benchmarks can run Phased DMD and its baselines end to end in seconds; the math lives in
[`losses`](losses.py) and [`simulate`](simulate.py), this file only calls it in the order the method prescribes:

- `"phased_dmd"`: phases trained one after another. Phase `k` starts its expert `G_k` and its fake score `F_k` as
  copies of the teacher; the earlier experts are frozen. Each generator update is preceded by `fake_updates`
  subinterval score-matching updates of `F_k` on fresh stop-gradient samples `x_s`, `t in (s, 1]`.
- `"sgts"` (DMD2 / Self-Forcing) and `"dmd"` (one step): one generator, `s = 0`, `t in (0, 1]`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .losses import Velocity, dmd_loss, fake_score_loss, sample_t
from .recipe import (
    RecipeSettings,
    anchor_step_for,
    backsimulate_exit,
    diversity_loss,
    ida_lora_update,
    ida_update,
    margin_t_bounds,
    noise_real,
    real_sigmas_lightx2v,
    real_student_outputs,
    sample_exit_step,
    teacher_anchor,
    teacher_grid,
)
from .simulate import backsimulate, generator_sample, phase_sigmas, sgts_generate
from .toy import GaussianMixture, LoRALinear, lora_factors


def train_flow_matching(
    model: nn.Module,
    data: GaussianMixture,
    steps: int = 2000,
    batch_size: int = 512,
    lr: float = 2e-3,
    seed: int = 0,
    t_shift: float = 1.0,
) -> nn.Module:
    """Fit `model` to `data` by flow matching (`fake_score_loss` at `s = 0`, unweighted), Adam with cosine decay.

    Training times are uniform on the shifted scale `t_shift` ([`sample_t`]'s `"shifted"`), as Wan and Qwen-Image
    draw theirs; `t_shift=1` is uniform `t`.

    Only parameters with `requires_grad=True` are trained (the fixed Fourier frequencies of [`MLPDenoiser`] are not),
    and they keep that flag, so the model can be handed to [`distill_toy`] as the teacher.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(_trainable(model), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x0 = data.sample(batch_size, g).float()
        t = sample_t(0.0, batch_size, g, shift=t_shift)
        eps = torch.randn(x0.shape, generator=g)
        loss, _ = fake_score_loss(model, x0, 0.0, t, eps, weighting="none")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no parameter with `requires_grad=True`: nothing to train.")
    return params


@dataclass
class ToyDistillResult:
    """Output of [`distill_toy`].

    Args:
        method (`str`): The method trained.
        experts (`list[nn.Module]`): One generator per phase (a single one for `"sgts"` / `"dmd"`), frozen.
        fake_scores (`list[nn.Module]`): The final fake score of each phase.
        sigmas_by_phase (`list[list[float]]`): The sampling schedule, as [`phase_sigmas`] returns it.
        logs (`list[dict]`): Per generator update: phase, DMD loss, gradient norm, last fake loss.
    """

    method: str
    experts: list[nn.Module]
    fake_scores: list[nn.Module]
    sigmas_by_phase: list[list[float]]
    logs: list[dict] = field(default_factory=list)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, phase: int | None = None, generator: torch.Generator | None = None):
        """Run the few-step generator from `noise` at `t = 1`; for Phased DMD, stop at the end of `phase`."""
        if self.method == "phased_dmd":
            phase = len(self.sigmas_by_phase) - 1 if phase is None else phase
            return backsimulate(noise, self.sigmas_by_phase, self.experts, phase, grad=False)[0]
        sigmas = self.sigmas_by_phase[0] if self.method == "sgts" else [1.0, 0.0]
        return sgts_generate(noise, sigmas, self.experts[0], len(sigmas) - 1, generator=generator, grad=False)


def distill_toy(
    method: str,
    teacher: nn.Module,
    real_velocity: Velocity,
    boundaries: Sequence[float] = (0.5,),
    steps_per_phase: Sequence[int] = (2, 2),
    shift: float = 1.0,
    generator_steps: int = 300,
    fake_updates: int = 5,
    batch_size: int = 256,
    lr_generator: float = 1e-4,
    lr_fake: float = 1e-3,
    dim: int = 2,
    seed: int = 0,
    fake_weighting: str = "paper",
    timestep_sampling: str = "shifted",
    t_shift: float = 1.0,
    betas: tuple[float, float] = (0.0, 0.99),
    recipe: RecipeSettings | None = None,
    real_sampler: Callable[[int, torch.Generator], torch.Tensor] | None = None,
    ida_mode: str = "params",
) -> ToyDistillResult:
    """Distil `teacher` with `method` (`"phased_dmd"`, `"sgts"` or `"dmd"`) on unconditional toy data.

    Args:
        method (`str`): `"phased_dmd"` trains one expert per phase; `"sgts"` and `"dmd"` one generator, and need
            `boundaries=()` with a single entry in `steps_per_phase`.
        teacher (`nn.Module`): A velocity model `(x_t, t) -> v`; experts and fake scores start as copies of it, and
            the copies train the parameters that have `requires_grad=True` in the teacher. The teacher itself is not
            changed.
        real_velocity: The real score as a velocity callable (e.g. [`GaussianMixture.velocity`] or the teacher).
        boundaries, steps_per_phase, shift: The schedule, as for [`phase_sigmas`].
        generator_steps (`int`): Generator updates per phase.
        fake_updates (`int`): Fake-score updates per generator update (the paper's 5).
        batch_size (`int`): Samples per update.
        lr_generator, lr_fake (`float`): Adam learning rates.
        dim (`int`): Data dimension (the shape of the noise is `(batch_size, dim)`).
        seed (`int`): Seeds the noise and `torch`'s global generator (for the SGTS exit step).
        fake_weighting (`str`): The fake-score loss weight, as [`fake_score_loss`] takes it.
        timestep_sampling, t_shift: How `t` is drawn in `(s, 1]`, as [`sample_t`] takes them (`t_shift=1`: the
            teacher's own, unshifted, training times).
        betas (`tuple[float, float]`): Adam betas of both networks; `(0.0, 0.99)` as in DMD2.
        recipe ([`RecipeSettings`], *optional*): The authors' recipe parts (Phased DMD only): diversity loss (the
            real score plays the teacher; `t_shift` is the teacher grid's shift), IDA, random exit, the t margin and
            fake-on-real. Its `phase_order`, prompts, guidance, `shift` and `steps_per_phase` are not read here.
            Default: all off (the paper).
        real_sampler (`callable`, *optional*): `(n, generator) -> (n, dim)` real samples; turns fake-on-real on
            (weight and sigmas from `recipe`).
        ida_mode (`str`): How IDA (`recipe.ida_decay < 1`) pulls the fake toward the generator: `"params"`, every
            trainable tensor ([`ida_update`]: exact for full-parameter fakes, factor by factor for LoRA ones) or
            `"lora_merged"`, the merged LoRA deltas refactored to rank r ([`ida_lora_update`]; the teacher must hold
            [`LoRALinear`] layers, see [`add_lora`]).

    Returns:
        [`ToyDistillResult`].
    """
    sigmas = phase_sigmas(list(boundaries), list(steps_per_phase), shift)
    if method != "phased_dmd" and len(sigmas) != 1:
        raise ValueError(f"`{method}` trains one generator: pass `boundaries=()` and one entry in `steps_per_phase`.")
    recipe = recipe or RecipeSettings()
    if ida_mode not in ("params", "lora_merged"):
        raise ValueError(f"`ida_mode` must be one of ['params', 'lora_merged'], got {ida_mode!r}.")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    run = _ToyRun(method, sigmas, real_velocity, recipe, real_sampler, g, batch_size, dim, fake_weighting)
    run.timestep_sampling, run.t_shift = timestep_sampling, t_shift
    fakes, logs = [], []
    for phase in range(len(sigmas)):
        fakes.append(
            _train_phase(
                run, teacher, phase, generator_steps, fake_updates, (lr_generator, lr_fake), betas, ida_mode, logs
            )
        )
    return ToyDistillResult(method, run.experts, fakes, sigmas, logs)


def _train_phase(run, teacher, phase, generator_steps, fake_updates, lrs, betas, ida_mode, logs) -> nn.Module:
    """Phase `phase` of [`distill_toy`]: its expert and fake score start as copies of `teacher`; returns the fake."""
    expert, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
    fake_real = copy.deepcopy(teacher) if run.real_sampler is not None else None
    for layer in (m for f in (fake, fake_real) if f is not None for m in f.modules() if isinstance(m, LoRALinear)):
        layer.reset_lora_A()  # its own adapter, drawn on its own (as peft does), not the generator's copy
    run.experts.append(expert)
    opt_g = torch.optim.Adam(_trainable(expert), lr=lrs[0], betas=betas)
    opt_f = torch.optim.Adam(_trainable(fake), lr=lrs[1], betas=betas)
    opt_r = torch.optim.Adam(_trainable(fake_real), lr=lrs[1], betas=betas) if fake_real else None
    fake_loss, decay = torch.zeros(()), run.recipe.ida_decay
    for _ in range(generator_steps):
        for _ in range(fake_updates):
            fake_loss = run.fake_step(phase, fake, opt_f)
            if fake_real is not None:
                run.fake_real_step(phase, fake_real, opt_r)
        log = run.generator_step(phase, fake, fake_real, opt_g)
        if decay < 1.0:
            _ida(fake, expert, decay, ida_mode)
        logs.append({"phase": phase, **log, "fake_loss": fake_loss.item()})
    expert.requires_grad_(False)
    return fake.requires_grad_(False)


def _ida(fake: nn.Module, expert: nn.Module, decay: float, mode: str):
    if mode == "params":
        ida_update(_trainable(fake), _trainable(expert), decay)
        return
    layers = [m for m in fake.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("`ida_mode='lora_merged'` needs a teacher with LoRALinear layers (see `toy.add_lora`).")
    ida_lora_update(lora_factors(fake), lora_factors(expert), decay, layers[0].scale, layers[0].scale)


class _ToyRun:
    """The per-update steps of [`distill_toy`], over the state they share (schedule, experts, recipe, generator)."""

    def __init__(self, method, sigmas, real_velocity, recipe, real_sampler, g, batch_size, dim, fake_weighting):
        self.method, self.sigmas, self.real_velocity, self.recipe = method, sigmas, real_velocity, recipe
        self.real_sampler, self.g, self.batch_size, self.dim = real_sampler, g, batch_size, dim
        self.fake_weighting, self.experts = fake_weighting, []
        self.real_sigmas = recipe.fake_real_sigmas or real_sigmas_lightx2v(sigmas)

    def noise(self) -> torch.Tensor:
        return torch.randn(self.batch_size, self.dim, generator=self.g)

    def draw(self, phase: int, grad: bool, noise: torch.Tensor | None = None):
        noise = self.noise() if noise is None else noise
        if grad and self.method == "phased_dmd" and self.recipe.random_exit:
            n = len(self.sigmas[phase]) - 1
            j = sample_exit_step(n, phase, self.recipe.diversity_weight > 0, self.g)
            return backsimulate_exit(noise, self.sigmas, self.experts, phase, j)
        return generator_sample(self.method, noise, self.sigmas, self.experts, phase, grad=grad, generator=self.g)

    def draw_t(self, s: float) -> torch.Tensor:
        r, extra = self.recipe, {}
        if (r.t_margin, r.t_lowest, r.t_highest) != (0.0, 0.0, 1.0):
            lo, hi = margin_t_bounds(s, self.t_shift, r.t_margin, r.t_lowest, r.t_highest)
            extra = {"min_gap": lo - s, "t_max": hi}
        return sample_t(s, self.batch_size, self.g, sampling=self.timestep_sampling, shift=self.t_shift, **extra)

    def fake_step(self, phase: int, fake: nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
        with torch.no_grad():
            x_s, s = self.draw(phase, grad=False)
        return self._score_step(fake, opt, x_s, s)

    def _score_step(self, fake, opt, x_s, s):
        t = self.draw_t(s)
        eps = torch.randn(x_s.shape, generator=self.g)
        loss, _ = fake_score_loss(fake, x_s, s, t, eps, weighting=self.fake_weighting)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    def real_outputs(self, phase: int, grad: bool):
        """One student step from real samples noised to the phase's fixed sigma (fake-on-real)."""
        sigma_r, s = self.real_sigmas[phase], float(self.sigmas[phase][-1])
        x_r = noise_real(self.real_sampler(self.batch_size, self.g).float(), sigma_r, self.noise())
        with torch.set_grad_enabled(grad):
            return real_student_outputs(self.experts[phase], x_r, sigma_r, s)[0], s

    def fake_real_step(self, phase: int, fake_real: nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
        x_s, s = self.real_outputs(phase, grad=False)
        return self._score_step(fake_real, opt, x_s, s)

    def generator_step(self, phase, fake, fake_real, opt) -> dict:
        z = self.noise()
        x_s, s = self.draw(phase, grad=True, noise=z)
        loss, log = self._dmd(x_s, s, fake)
        if fake_real is not None:
            x_r, s_r = self.real_outputs(phase, grad=True)
            real_loss, real_log = self._dmd(x_r, s_r, fake_real)
            loss, log = loss + self.recipe.fake_real_weight * real_loss, {**log, "real_dmd": real_log["dmd_loss"]}
        if phase == 0 and self.method == "phased_dmd" and self.recipe.diversity_weight > 0:
            div, div_log = self._diversity(z)
            loss, log = loss + div, {**log, **div_log}
        opt.zero_grad()
        loss.backward()
        opt.step()
        return log

    def _dmd(self, x_s, s, fake):
        t = self.draw_t(s)
        return dmd_loss(x_s, s, self.real_velocity, fake, t, torch.randn(x_s.shape, generator=self.g))

    def _diversity(self, z):
        r = self.recipe
        grid = teacher_grid(r.diversity_teacher_steps, self.t_shift)
        a = r.diversity_anchor_step or anchor_step_for(self.sigmas[0][1], r.diversity_teacher_steps, self.t_shift)
        x_a, sigma_a = teacher_anchor(self.real_velocity, z, grid, a)
        return diversity_loss(self.experts[0], z, x_a, sigma_a, r.diversity_weight)
