"""Rectified-flow math for Phased DMD, as small pure functions of tensors.

Notation follows the paper (and Qwen-Image / Wan2.2):

    x_t = alpha_t * x_0 + sigma_t * eps,   alpha_t = 1 - t,   sigma_t = t,   t in [0, 1]

`t` is diffusers' `sigma`; diffusers' `timestep` is `1000 * t`. Models predict the velocity `v = eps - x_0`.
Every function accepts python floats or tensors for the times; tensors of shape `(B,)` broadcast over the trailing
dimensions of `x` (see [`expand_like`]). Each formula is written out in `docs/method.md`.
"""

from __future__ import annotations

import math

import torch


Time = float | torch.Tensor


def expand_like(t: Time, x: torch.Tensor) -> Time:
    """Reshape a per-sample time of shape `(B,)` to `(B, 1, ..., 1)` so it broadcasts against `x`; floats pass."""
    if isinstance(t, torch.Tensor) and t.ndim == 1 and x.ndim > 1:
        return t.reshape(-1, *([1] * (x.ndim - 1))).to(device=x.device, dtype=x.dtype)
    if isinstance(t, torch.Tensor):
        return t.to(device=x.device, dtype=x.dtype)
    return t


def alpha(t: Time) -> Time:
    """Signal coefficient `alpha_t = 1 - t`."""
    return 1 - t


def sigma(t: Time) -> Time:
    """Noise coefficient `sigma_t = t`."""
    return t


def snr(t: Time) -> Time:
    """Signal-to-noise ratio `SNR(t) = alpha_t^2 / sigma_t^2 = ((1 - t) / t)^2`."""
    return (alpha(t) / sigma(t)) ** 2


def shift_time(t: Time, shift: float) -> Time:
    """Shifted schedule `t -> shift * t / (1 + (shift - 1) * t)` (Wan's flow shift, Qwen-Image's `exp(mu)`)."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_time(t: Time, shift: float) -> Time:
    """Inverse of [`shift_time`]: `t -> t / (shift - (shift - 1) * t)`."""
    return t / (shift - (shift - 1) * t)


def transition(s: Time, t: Time) -> tuple[Time, Time]:
    """Coefficients of the forward transition from `s` to a noisier `t > s`.

    `x_t = alpha_{t|s} * x_s + sigma_{t|s} * eps'` with `alpha_{t|s} = alpha_t / alpha_s` and
    `sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 * sigma_s^2`.

    Returns:
        `(alpha_ts, sigma_ts)`.
    """
    alpha_ts = alpha(t) / alpha(s)
    var = sigma(t) ** 2 - alpha_ts**2 * sigma(s) ** 2
    if isinstance(var, torch.Tensor):
        sigma_ts = var.clamp_min(0).sqrt()
    else:
        sigma_ts = math.sqrt(max(var, 0.0))
    return alpha_ts, sigma_ts


def add_noise_from(x_s: torch.Tensor, s: Time, t: Time, eps: torch.Tensor) -> torch.Tensor:
    """Noise a sample at time `s` to time `t >= s`: `x_t = alpha_{t|s} x_s + sigma_{t|s} eps`."""
    alpha_ts, sigma_ts = transition(expand_like(s, x_s), expand_like(t, x_s))
    return alpha_ts * x_s + sigma_ts * eps


def x0_from_velocity(x_t: torch.Tensor, t: Time, v: torch.Tensor) -> torch.Tensor:
    """Clean-data prediction `x_0 = x_t - t * v`."""
    return x_t - expand_like(t, x_t) * v


def eps_from_velocity(x_t: torch.Tensor, t: Time, v: torch.Tensor) -> torch.Tensor:
    """Noise prediction `eps = x_t + (1 - t) * v`."""
    return x_t + alpha(expand_like(t, x_t)) * v


def velocity_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Velocity `v = eps - x_0`."""
    return eps - x0


def velocity_from_x0(x_t: torch.Tensor, t: Time, x0: torch.Tensor) -> torch.Tensor:
    """Velocity from a clean-data prediction: `v = (x_t - x_0) / t`."""
    return (x_t - x0) / expand_like(t, x_t)


def euler_step(x_t: torch.Tensor, t: Time, t_next: Time, v: torch.Tensor) -> torch.Tensor:
    """One Euler step of the probability-flow ODE: `x <- x + (t_next - t) * v`."""
    return x_t + (expand_like(t_next, x_t) - expand_like(t, x_t)) * v


def posterior_mean_xs(x_t: torch.Tensor, v: torch.Tensor, s: Time, t: Time) -> torch.Tensor:
    """`E[x_s | x_t]` implied by a velocity prediction `v` at time `t > s`.

    With `x0_hat = x_t - t v` and `eps_hat = x_t + (1 - t) v`,

        E[x_s | x_t] = alpha_s * x0_hat + (alpha_{t|s} * sigma_s^2 / sigma_t) * eps_hat,

    which equals Tweedie's formula on the transition, `(x_t + sigma_{t|s}^2 * score(x_t)) / alpha_{t|s}`, but stays
    finite as `t -> 1`. At `s = 0` it is the usual `x0_hat`.
    """
    s_, t_ = expand_like(s, x_t), expand_like(t, x_t)
    alpha_ts, _ = transition(s_, t_)
    return alpha(s_) * x0_from_velocity(x_t, t_, v) + (alpha_ts * sigma(s_) ** 2 / sigma(t_)) * eps_from_velocity(
        x_t, t_, v
    )


def subinterval_target(x_s: torch.Tensor, eps: torch.Tensor, s: Time, t: Time) -> torch.Tensor:
    """Unbiased velocity target for score matching on `x_t = alpha_{t|s} x_s + sigma_{t|s} eps`.

        v* = ((alpha_s^2 sigma_t + alpha_t sigma_s^2) / (alpha_s^2 sigma_{t|s})) * eps - x_s / alpha_s

    `E[v* | x_t]` is the velocity of the marginal of `x_t` when `x_s` follows the marginal at `s`; at `s = 0` it
    is the flow-matching target `eps - x_0`.
    """
    s_, t_ = expand_like(s, x_s), expand_like(t, x_s)
    _, sigma_ts = transition(s_, t_)
    a_s, a_t, sig_s, sig_t = alpha(s_), alpha(t_), sigma(s_), sigma(t_)
    coef = (a_s**2 * sig_t + a_t * sig_s**2) / (a_s**2 * sigma_ts)
    return coef * eps - x_s / a_s


def naive_subinterval_target(x_s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The biased target `eps - x_s`, which treats `x_s` as clean data. Kept only to show the bias in tests."""
    return eps - x_s


def subinterval_weight(s: Time, t: Time, max_weight: float = 10.0) -> Time:
    """Eq. 13's weight on `||F - v*||^2`: `c = min(1, max_weight * sigma_{t|s}^2)`.

    Eq. 13 is `clamp(1 / sigma_{t|s}^2, max=10) * ||sigma_{t|s} F - sigma_{t|s} v*||^2`; taking `sigma_{t|s}^2` into
    the weight gives `c`. It damps the draws with `t` close to `s`, where the noise coefficient of `v*` grows like
    `1 / sigma_{t|s}`, and is 1 elsewhere (at `s = 0`: plain flow matching for `t > 1 / sqrt(max_weight)`).
    """
    _, sigma_ts = transition(s, t)
    if isinstance(sigma_ts, torch.Tensor):
        return (max_weight * sigma_ts**2).clamp(max=1.0)
    return min(1.0, max_weight * sigma_ts**2)


def inverse_variance_weight(s: Time, t: Time, max_weight: float = 10.0) -> Time:
    """The weight `min(1 / sigma_{t|s}^2, max_weight)` on `||F - v*||^2` (this library's default before Eq. 13).

    Same minimiser as [`subinterval_weight`], but `1 / sigma_{t|s}^2` times the weight exactly where `v*` is
    noisiest; kept as `--fake_weighting inverse_variance` for comparison.
    """
    _, sigma_ts = transition(s, t)
    if isinstance(sigma_ts, torch.Tensor):
        return (1.0 / sigma_ts.clamp_min(1e-12) ** 2).clamp(0, max_weight)
    return min(1.0 / max(sigma_ts, 1e-12) ** 2, max_weight)


def dmd_weight(s: Time, t: Time) -> Time:
    """The paper's DMD weight `w_{t|s} = alpha_t * alpha_{t|s} / (alpha_t * sigma_t + sigma_t^2)`."""
    alpha_ts, _ = transition(s, t)
    return alpha(t) * alpha_ts / (alpha(t) * sigma(t) + sigma(t) ** 2)


def phase_of(t: Time, boundaries, atol: float = 1e-6):
    """Index of the phase that owns time `t`, given decreasing boundaries `t_1 > ... > t_{K-1}`.

    Phase `k` owns `(t_{k+1}, t_k]` in the paper's 1-based boundary notation with `t_0 = 1`, `t_K = 0`; a boundary
    itself is the first time of the next phase (phase `k` starts exactly at `t_k`). Returns an `int` for a float
    and a long tensor for a tensor.
    """
    if isinstance(t, torch.Tensor):
        idx = torch.zeros_like(t, dtype=torch.long)
        for b in boundaries:
            idx = idx + (t <= b + atol).long()
        return idx
    return sum(1 for b in boundaries if t <= b + atol)
