"""Flow-matching math checked against closed forms and Monte Carlo on Gaussian mixtures."""

import math

import numpy as np
import pytest
import torch

from diffusers_pdmd.training import flow
from diffusers_pdmd.training.losses import sample_t
from diffusers_pdmd.training.toy import GaussianMixture


def _binned_means(x, values, width=0.2, min_count=20000):
    b = torch.floor(x / width).long()
    b = b - b.min()
    cnt = torch.bincount(b)
    keep = cnt >= min_count
    return [torch.bincount(b, weights=v)[keep] / cnt[keep] for v in values]


def _subinterval_samples(gm, s, t, n, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = gm.sample(n, g)
    x_s = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x0, x_s, eps, flow.add_noise_from(x_s, s, t, eps)


def test_transition_composes_to_marginal():
    # x_t from x_s must have the marginal variance of x_t: alpha_{t|s}^2 sigma_s^2 + sigma_{t|s}^2 = sigma_t^2
    for s, t in [(0.1, 0.2), (0.5, 0.9), (0.0, 0.7), (0.3, 1.0)]:
        a_ts, s_ts = flow.transition(s, t)
        assert a_ts * (1 - s) == pytest.approx(1 - t)
        assert a_ts**2 * s**2 + s_ts**2 == pytest.approx(t**2)


def test_velocity_conversions_roundtrip():
    x0, eps, t = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    v = flow.velocity_from_x0_eps(x0, eps)
    torch.testing.assert_close(flow.x0_from_velocity(x_t, t, v), x0)
    torch.testing.assert_close(flow.eps_from_velocity(x_t, t, v), eps)
    torch.testing.assert_close(flow.velocity_from_x0(x_t, t, x0), v)


def test_target_reduces_to_flow_matching_at_s0():
    x0, eps = torch.randn(5, 7), torch.randn(5, 7)
    t = torch.rand(5) * 0.9 + 0.05
    torch.testing.assert_close(flow.subinterval_target(x0, eps, 0.0, t), eps - x0)
    torch.testing.assert_close(flow.posterior_mean_xs(x0, eps, 0.0, t), flow.x0_from_velocity(x0, t, eps))


@pytest.mark.parametrize("stds", [0.0, 0.15])
def test_mixture_velocity_is_the_conditional_mean(stds):
    """Reference check: the analytic mixture velocity equals a binned Monte Carlo E[eps - x_0 | x_t]."""
    gm = GaussianMixture([-1.0, 0.0, 1.0, 2.0], stds=stds)
    g = torch.Generator().manual_seed(0)
    for t in (0.3, 0.8):
        x0 = gm.sample(1_000_000, g)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        x_t = (1 - t) * x0 + t * eps
        mc, ref = _binned_means(x_t[:, 0], [(eps - x0)[:, 0], gm.velocity(x_t, t)[:, 0]])
        assert (mc - ref).abs().max() < 0.03


@pytest.mark.parametrize("stds", [0.0, 0.15])
@pytest.mark.parametrize("s, t", [(0.5, 0.7), (0.5, 0.95), (0.3, 0.4)])
def test_subinterval_target_is_unbiased(stds, s, t):
    """E[v* | x_t] equals the marginal velocity; the naive eps - x_s does not.

    Measured (2M samples, bins 0.2 wide with >= 20k samples): max |E[v*|x_t] - v| is 0.01-0.03 against 0.27-0.86
    for the naive target, for points (stds=0) and for a Gaussian mixture (stds=0.15).
    """
    gm = GaussianMixture([-1.0, 0.0, 1.0, 2.0], stds=stds)
    _, x_s, eps, x_t = _subinterval_samples(gm, s, t, 2_000_000, seed=1)
    v_star, v_naive, v_true = _binned_means(
        x_t[:, 0],
        [
            flow.subinterval_target(x_s, eps, s, t)[:, 0],
            flow.naive_subinterval_target(x_s, eps)[:, 0],
            gm.velocity(x_t, t)[:, 0],
        ],
    )
    assert (v_star - v_true).abs().max() < 0.06
    assert (v_naive - v_true).abs().max() > 0.2


@pytest.mark.parametrize("s, t", [(0.5, 0.7), (0.2, 0.99), (0.3, 0.4)])
def test_posterior_mean_xs_matches_monte_carlo(s, t):
    gm = GaussianMixture([[-1.0, 0.5], [1.0, -0.5], [0.0, 2.0]], stds=0.2)
    _, x_s, _, x_t = _subinterval_samples(gm, s, t, 1_000_000, seed=2)
    mu = flow.posterior_mean_xs(x_t, gm.velocity(x_t, t), s, t)
    # regress on the first coordinate's bins, compare both coordinates
    for d in range(2):
        mc, pred = _binned_means(x_t[:, 0], [x_s[:, d], mu[:, d]], min_count=20000)
        assert (mc - pred).abs().max() < 0.03


def test_fake_weight_is_eq13():
    # Eq. 13: clamp(1 / sigma_{t|s}^2, max=10) * ||sigma_{t|s} F - sigma_{t|s} v*||^2, written out per sample
    s = torch.tensor([0.5, 0.5, 0.5, 0.0, 0.0, 0.875])
    t = torch.tensor([0.5001, 0.6, 0.9, 0.2, 0.6, 0.95])
    g = torch.Generator().manual_seed(0)
    f, v = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    _, sig = flow.transition(s, t)
    eq13 = (1 / sig**2).clamp(max=10) * ((sig[:, None] * f - sig[:, None] * v) ** 2).sum(1)
    torch.testing.assert_close(flow.subinterval_weight(s, t) * ((f - v) ** 2).sum(1), eq13)
    # at s = 0 (last phase, baselines) it is plain flow matching for t > 1 / sqrt(10), and 10 t^2 below
    torch.testing.assert_close(flow.subinterval_weight(0.0, torch.tensor([0.2, 0.33, 0.9])), torch.tensor([0.4, 1, 1]))
    # it damps the draws near t = s, where the noise coefficient of v* grows like 1 / sigma_{t|s}
    c = flow.subinterval_weight(s, t)
    assert c[0] < 1e-2 and c[2] == 1.0
    assert flow.subinterval_weight(0.5, 0.9) == 1.0  # floats too


def test_inverse_variance_weight():
    s, t = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.5001, 0.9, 0.6])
    c = flow.inverse_variance_weight(s, t)
    _, sig_ts = flow.transition(s, t)
    assert c[0] == 10.0
    torch.testing.assert_close(c[1:], 1 / sig_ts[1:] ** 2)
    # the two weights differ by exactly 1 / sigma_{t|s}^2 where neither is clamped
    torch.testing.assert_close(c[1:] / flow.subinterval_weight(s, t)[1:], 1 / sig_ts[1:] ** 2)


def test_dmd_weight():
    s, t = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.5001, 0.9, 0.6])
    # w_{t|s} equals alpha_{t|s} * (score difference per unit velocity difference): alpha_t alpha_{t|s} / sigma_t
    w = flow.dmd_weight(s, t)
    a_ts, _ = flow.transition(s, t)
    torch.testing.assert_close(w, (1 - t) * a_ts / t)


def test_phase_of():
    assert flow.phase_of(0.9, [0.875]) == 0
    assert flow.phase_of(0.875, [0.875]) == 1
    assert flow.phase_of(0.0, [0.9, 0.5]) == 2
    torch.testing.assert_close(flow.phase_of(torch.tensor([1.0, 0.7, 0.2]), [0.9, 0.5]), torch.tensor([0, 1, 2]))


# -- timestep sampling --------------------------------------------------------------------------------------------


def _unshift(x, shift):
    return x / (shift - (shift - 1) * x)


def _normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


N_T = 400_000


@pytest.mark.parametrize("shift", [1.0, 5.0, 12.0])
def test_shifted_t_tail_matches_the_shift_formula(shift):
    # s = 0: t = S(u), u uniform, so P(t >= 0.875) = 1 - S^-1(0.875): 12.5 %, 41.7 %, 63.2 % for shift 1, 5, 12
    t = sample_t(0.0, N_T, torch.Generator().manual_seed(0), sampling="shifted", shift=shift, min_gap=0.0)
    expected = 1 - _unshift(0.875, shift)
    assert (t >= 0.875).double().mean().item() == pytest.approx(expected, abs=0.004)
    assert {1.0: 0.125, 5.0: 0.4167, 12.0: 0.6316}[shift] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("sampling", ["shifted", "uniform", "logit_normal"])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.875])
def test_t_lies_in_the_reverse_nested_interval(sampling, s):
    t = sample_t(s, 50_000, torch.Generator().manual_seed(1), sampling=sampling, shift=5.0)
    assert t.dtype == torch.float32 and t.shape == (50_000,)
    assert (t > s).all() and (t <= 1.0).all()


@pytest.mark.parametrize("s", [0.0, 0.5])
def test_shifted_t_is_the_training_distribution_restricted_to_s_1(s):
    # conditional tail P(t >= x | t > s) = (1 - S^-1(x)) / (1 - S^-1(s)) on the shifted scale
    shift = 5.0
    t = sample_t(s, N_T, torch.Generator().manual_seed(2), sampling="shifted", shift=shift, min_gap=0.0)
    for x in (0.6, 0.8, 0.95):
        expected = (1 - _unshift(x, shift)) / (1 - _unshift(s, shift))
        assert (t >= x).double().mean().item() == pytest.approx(expected, abs=0.004)


@pytest.mark.parametrize("s, shift", [(0.0, 1.0), (0.0, 3.0), (0.5, 1.0)])
def test_logit_normal_t_tail(s, shift):
    # u = sigmoid(N(0, 1)) restricted to u > S^-1(s), t = S(u): P(t >= x) = P(n >= logit S^-1(x)) / P(n > logit S^-1(s))
    t = sample_t(s, N_T, torch.Generator().manual_seed(3), sampling="logit_normal", shift=shift, min_gap=0.0)

    def tail(x):
        u = _unshift(x, shift)
        return 1.0 if u <= 0 else 1 - _normal_cdf(math.log(u / (1 - u)))

    for x in (0.3, 0.7, 0.875):
        if x > s:
            assert (t >= x).double().mean().item() == pytest.approx(tail(x) / tail(s), abs=0.004)


def test_uniform_t_is_uniform_on_s_1():
    t = sample_t(0.5, N_T, torch.Generator().manual_seed(4), sampling="uniform", min_gap=0.0)
    assert (t >= 0.875).double().mean().item() == pytest.approx(0.25, abs=0.004)
    with pytest.raises(ValueError, match="sampling"):
        sample_t(0.5, 4, sampling="beta")


def _target_floor(s: float, data_std: float, t_max: float, n: int = 20000) -> float:
    """Closed form, Gaussian data: the weighted mean over t ~ U(s, t_max) of Var(v* | x_t), the part of the fake-score
    loss no network can remove (v* = c eps - x_s / alpha_s, jointly Gaussian with x_t)."""
    t = np.linspace(s, t_max, n + 2)[1:-1]
    a_s, a_t = 1 - s, 1 - t
    a_ts = a_t / a_s
    sig_ts = np.sqrt(t**2 - a_ts**2 * s**2)
    c = (a_s**2 * t + a_t * s**2) / (a_s**2 * sig_ts)
    var_xs = a_s**2 * data_std**2 + s**2
    var_v, var_xt = c**2 + var_xs / a_s**2, a_ts**2 * var_xs + sig_ts**2
    cov = c * sig_ts - a_ts * var_xs / a_s
    return float((np.minimum(1, 10 * sig_ts**2) * (var_v - cov**2 / var_xt)).mean())


@pytest.mark.parametrize("s, t_max, expected", [(0.875, 1.0, 124.2), (0.0, 0.875, 1.33)])
def test_fake_loss_floor_is_far_higher_in_a_noisy_phase(s, t_max, expected):
    """docs/training.md: phase 0's fake loss sits on a floor ~100x phase 1's (unit-variance Gaussian data)."""
    g = torch.Generator().manual_seed(0)
    n, bins = 400_000, 40
    t = s + (t_max - s) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    x0, eps_s, eps = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3))
    x_s = (1 - s) * x0 + s * eps_s
    x_t = flow.add_noise_from(x_s, torch.full_like(t, s), t, eps)
    v = flow.subinterval_target(x_s, eps, torch.full_like(t, s), t)
    weight = flow.subinterval_weight(torch.full_like(t, s), t)
    floor = 0.0
    for x_b, v_b, w_b in zip(x_t.chunk(bins), v.chunk(bins), weight.chunk(bins)):  # best linear predictor per t bin
        beta = (x_b * v_b).mean() / (x_b * x_b).mean()
        floor += float((w_b * (v_b - beta * x_b) ** 2).sum()) / n
    assert floor == pytest.approx(_target_floor(s, 1.0, t_max), rel=0.05)
    assert floor == pytest.approx(expected, rel=0.05)
