"""The two losses of Phased DMD: the generator's DMD loss and the fake score's subinterval score matching.

Both see a denoiser only as a callable `velocity = f(x_t, t)` with `t` a `(B,)` tensor of noise levels in [0, 1];
conditioning (prompt embeddings, classifier-free guidance, which teacher expert owns `t`) is closed over by the
caller. `s` is the generator's output time (`t_k`, the end boundary of the phase; 0 in the last phase) as a float
or a `(B,)` tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .flow import (
    add_noise_from,
    dmd_weight,
    expand_like,
    inverse_variance_weight,
    naive_subinterval_target,
    posterior_mean_xs,
    shift_time,
    subinterval_target,
    subinterval_weight,
    unshift_time,
)
from .options import DMD_WEIGHTINGS, FAKE_WEIGHTINGS, T_SAMPLINGS


Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

FAKE_TARGETS = ("unbiased", "naive")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]):
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def sample_t(
    s: float | torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    t_max: float = 1.0,
    min_gap: float = 1e-3,
    sampling: str = "shifted",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Draw `t` in the reverse-nested interval `(s, t_max]`, one value per sample, shape `(B,)`.

    The paper draws `t ~ T(t; s, 1)`: the distribution of `t` the base model was trained with, restricted to
    `(s, 1]`. With `lo = s + min_gap` and the time shift `S(u) = shift * u / (1 + (shift - 1) u)`:

    - `"shifted"` (default): `u` uniform on `(S^-1(lo), S^-1(t_max)]`, `t = S(u)`: uniform training times on the
      model's own shifted scale (Wan's flow shift; Qwen-Image's `exp(mu)` at the training resolution). So
      `P(t >= x | s) = (1 - S^-1(x)) / (1 - S^-1(lo))` for `t_max = 1`; with `shift = 1` this is `"uniform"`.
    - `"uniform"`: `t` uniform on `(lo, t_max]`, no shift (this library's earlier default).
    - `"logit_normal"`: `u = sigmoid(n)`, `n ~ N(logit_mean, logit_std^2)` truncated to the same interval in `u`
      (exactly, by the inverse CDF), then `t = S(u)` (SD3's sampling, shifted).

    Every mode consumes one uniform number per sample from `generator`. `min_gap` keeps `t` away from `s`, where
    `sigma_{t|s} -> 0`.
    """
    _check_choice("sampling", sampling, T_SAMPLINGS)
    if not shift > 0:
        raise ValueError(f"`shift` must be > 0, got {shift!r}.")
    s = torch.as_tensor(s, dtype=torch.float32, device=device).expand(batch_size)
    u = torch.rand(batch_size, generator=generator, device=generator.device if generator else device).to(s.device)
    lo = s + min_gap
    if sampling == "uniform":
        return lo + (1 - u) * (t_max - lo)
    u, lo64 = u.double(), lo.double()
    a, b = unshift_time(lo64, shift), unshift_time(torch.full_like(lo64, t_max), shift)
    if sampling == "logit_normal":
        cdf = lambda x: torch.special.ndtr((torch.logit(x) - logit_mean) / logit_std)  # noqa: E731
        q = cdf(a) + (1 - u) * (cdf(b) - cdf(a))
        x = torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(q))
    else:
        x = a + (1 - u) * (b - a)
    return torch.minimum(torch.maximum(shift_time(x, shift), lo64), torch.full_like(lo64, t_max)).float()


def fake_score_loss(
    fake_velocity: Velocity,
    x_s: torch.Tensor,
    s: float | torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    target: str = "unbiased",
    weighting: str = "paper",
    max_weight: float = 10.0,
) -> tuple[torch.Tensor, dict]:
    """Subinterval score matching for the fake score `F_k`, on generator samples `x_s` (treated as data at `s`).

        x_t  = alpha_{t|s} x_s + sigma_{t|s} eps
        loss = mean_b  c_b * mean(|F_k(x_t, t) - v*|^2),   c = min(1, max_weight * sigma_{t|s}^2)   (Eq. 13)

    Args:
        fake_velocity: `F_k` as a callable `(x_t, t) -> v`.
        x_s (`torch.Tensor`): Generator output at time `s`; detached here.
        s: Output time of the generator (float or `(B,)`).
        t (`torch.Tensor` of shape `(B,)`): Noise levels in `(s, 1]`, e.g. from [`sample_t`].
        eps (`torch.Tensor`): Standard normal noise shaped like `x_s`.
        target (`str`): `"unbiased"` (the subinterval target `v*`) or `"naive"` (`eps - x_s`, biased unless s=0).
        weighting (`str`): `"paper"` (Eq. 13's `c` above), `"inverse_variance"` (`min(1 / sigma_{t|s}^2,
            max_weight)`, the same minimiser with far noisier gradients; the earlier default) or `"none"`.
        max_weight (`float`): Upper clamp of `c`.

    Returns:
        `(loss, logs)` with `logs` holding detached floats.
    """
    _check_choice("target", target, FAKE_TARGETS)
    _check_choice("weighting", weighting, FAKE_WEIGHTINGS)
    x_s = x_s.detach()
    s_b = torch.as_tensor(s, dtype=t.dtype, device=t.device).expand_as(t)
    x_t = add_noise_from(x_s, s_b, t, eps)
    v_target = subinterval_target(x_s, eps, s_b, t) if target == "unbiased" else naive_subinterval_target(x_s, eps)
    v_pred = fake_velocity(x_t, t)
    mse = ((v_pred.float() - v_target.float()) ** 2).flatten(1).mean(1)
    if weighting == "paper":
        c = subinterval_weight(s_b, t, max_weight)
    elif weighting == "inverse_variance":
        c = inverse_variance_weight(s_b, t, max_weight)
    else:
        c = torch.ones_like(mse)
    loss = (c.to(mse.dtype) * mse).mean()
    fake_loss, fake_mse = torch.stack([loss.detach(), mse.mean().detach()]).tolist()  # one device sync, not two
    return loss, {"fake_loss": fake_loss, "fake_mse": fake_mse}


def dmd_loss(
    x_s: torch.Tensor,
    s: float | torch.Tensor,
    real_velocity: Velocity,
    fake_velocity: Velocity,
    t: torch.Tensor,
    eps: torch.Tensor,
    weighting: str = "normalized",
) -> tuple[torch.Tensor, dict]:
    """Distribution matching loss for a generator output `x_s` (with gradient) at time `s`.

    `x_s` is noised to `x_t`, `t in (s, 1]`; the real score (teacher, with guidance) and the fake score `F_k` are
    evaluated without gradient. The gradient of `KL(p_fake,t || p_real,t)` with respect to `x_s` is
    `alpha_{t|s} (score_fake - score_real)`, which in velocities is `w_{t|s} (v_real - v_fake)` with the paper's
    `w_{t|s} = alpha_t alpha_{t|s} / (alpha_t sigma_t + sigma_t^2)` (`weighting="paper"`).

    `weighting="normalized"` (default) is DMD2's normaliser carried to the subinterval: with
    `mu = E[x_s | x_t]` from each score ([`~diffusers_pdmd.training.flow.posterior_mean_xs`]),

        grad = (mu_fake - mu_real) / mean|x_s - mu_real|

    per sample. `mu_fake - mu_real = sigma_{t|s}^2 / alpha_{t|s} * (score_fake - score_real)` points the same way
    as the KL gradient, and at `s = 0` this is exactly DMD2's `(x0_fake - x0_real) / mean|x_0 - x0_real|`.

    Either way the loss is DMD2's surrogate `0.5 * mean((x_s - stopgrad(x_s - grad))^2)`, whose gradient with
    respect to `x_s` is `grad / numel`.

    Returns:
        `(loss, logs)`.
    """
    _check_choice("weighting", weighting, DMD_WEIGHTINGS)
    s_b = torch.as_tensor(s, dtype=t.dtype, device=t.device).expand_as(t)
    with torch.no_grad():
        x_s_ = x_s.detach()
        x_t = add_noise_from(x_s_, s_b, t, eps)
        v_real = real_velocity(x_t, t).float()
        v_fake = fake_velocity(x_t, t).float()
        x_t = x_t.float()
        if weighting == "normalized":
            mu_real = posterior_mean_xs(x_t, v_real, s_b, t)
            mu_fake = posterior_mean_xs(x_t, v_fake, s_b, t)
            norm = (x_s_.float() - mu_real).abs().flatten(1).mean(1).clamp_min(1e-6)
            grad = (mu_fake - mu_real) / expand_like(norm, x_t)
        else:
            grad = expand_like(dmd_weight(s_b, t), x_t) * (v_real - v_fake)
        target = (x_s_.float() - grad).to(x_s.dtype)
    loss = 0.5 * ((x_s - target) ** 2).mean()
    values = torch.stack([loss.detach().float(), grad.flatten(1).norm(dim=1).mean().float()]).tolist()  # one sync
    return loss, {"dmd_loss": values[0], "dmd_grad_norm": values[1]}
