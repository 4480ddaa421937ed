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
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .losses import Velocity, dmd_loss, fake_score_loss, sample_t
from .simulate import backsimulate, generator_sample, phase_sigmas, sgts_generate
from .toy import GaussianMixture


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

    Returns:
        [`ToyDistillResult`].
    """
    sigmas = phase_sigmas(list(boundaries), list(steps_per_phase), shift)
    if method != "phased_dmd" and len(sigmas) != 1:
        raise ValueError(f"`{method}` trains one generator: pass `boundaries=()` and one entry in `steps_per_phase`.")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    experts, fakes, logs = [], [], []
    for phase in range(len(sigmas)):
        expert, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
        experts.append(expert)
        opt_g = torch.optim.Adam(_trainable(expert), lr=lr_generator, betas=betas)
        opt_f = torch.optim.Adam(_trainable(fake), lr=lr_fake, betas=betas)

        def draw(grad, phase=phase):
            noise = torch.randn(batch_size, dim, generator=g)
            return generator_sample(method, noise, sigmas, experts, phase, grad=grad, generator=g)

        for _ in range(generator_steps):
            for _ in range(fake_updates):
                with torch.no_grad():
                    x_s, s = draw(grad=False)
                t = sample_t(s, batch_size, g, sampling=timestep_sampling, shift=t_shift)
                eps = torch.randn(x_s.shape, generator=g)
                fake_loss, _ = fake_score_loss(fake, x_s, s, t, eps, weighting=fake_weighting)
                opt_f.zero_grad()
                fake_loss.backward()
                opt_f.step()
            x_s, s = draw(grad=True)
            t = sample_t(s, batch_size, g, sampling=timestep_sampling, shift=t_shift)
            eps = torch.randn(x_s.shape, generator=g)
            loss, log = dmd_loss(x_s, s, real_velocity, fake, t, eps)
            opt_g.zero_grad()
            loss.backward()
            opt_g.step()
            logs.append({"phase": phase, **log, "fake_loss": fake_loss.item()})
        expert.requires_grad_(False)
        fakes.append(fake.requires_grad_(False))
    return ToyDistillResult(method, experts, fakes, sigmas, logs)
