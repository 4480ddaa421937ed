"""The training core end to end on a 2-D Gaussian-mixture teacher: Phased DMD (2 phases, 2 + 2 steps) and SGTS.

Data: 8 modes on a circle of radius 2, std 0.1. The real score is the mixture's analytic velocity; an MLP teacher
copy (width 128, depth 3, 2000 flow-matching steps) initialises every generator and fake score. Phased DMD: boundary
t_1 = 0.5 (SNR 1; unshifted, as 2-D data needs no resolution shift), sigmas [1, 0.75, 0.5] and [0.5, 0.25, 0],
phases trained one after another, 300 generator updates per phase, 5 fake updates per generator update, batch 256,
Adam betas (0, 0.99), lr 1e-4 (generator) and 1e-3 (fake score), DMD loss with the default normalised weighting.
SGTS: one 4-step generator (sigmas [1, .75, .5, .25, 0], stochastic re-noising in training and sampling), same
budget. See [`distill_toy`].

Metrics on 4000 samples from fixed noise: sliced Wasserstein-1 (SW1, 64 fixed projections) to 4000 exact samples;
modes by nearest mean within radius 0.5 (5 component stds); diversity as mean pairwise distance (MPD, first 2000
samples) and the entropy of the mode histogram divided by log 8.

Measured on the development machine (torch 2.13 CPU, one thread, seed 0; the module takes about 32 s of CPU time,
25-65 s wall time depending on how busy the shared machine is):

| quantity                                        | value                    | bound asserted               |
|-------------------------------------------------|--------------------------|------------------------------|
| SW1 noise floor, data vs data / x_t1 vs x_t1    | 0.034 / 0.031            |                              |
| phase-0 output at t_1 = 0.5, SW1 to exact x_t1  | 0.029                    | < 0.06 and < 0.5 x untrained |
| untrained phase 0 (teacher copy, 2 Euler steps) | 0.169                    |                              |
| phased 4-step samples, SW1 to data              | 0.062                    | < 0.11                       |
| SGTS 4-step samples, SW1 to data                | 0.066                    | (recorded)                   |
| 4 Euler steps of the teacher copy / analytic v  | 0.099 / 0.073            | (recorded)                   |
| fraction on a mode, phased / SGTS               | 0.85 / 0.87              | phased > 0.7                 |
| smallest mode / fair share, phased / SGTS       | 0.75 / 0.77              | both > 1/3                   |
| mode entropy / log 8, phased / SGTS / data      | 0.9985 / 0.9979 / 0.9997 | both > 0.98                  |
| MPD, phased / SGTS / data                       | 2.53 / 2.51 / 2.54       | (recorded)                   |

The bounds come from these figures and from distillation seeds 1-3 (`seed=` of both `distill_toy` calls, same
teacher): phase-0 SW1 0.024-0.038, phased SW1 0.055-0.076, smallest mode share 0.73-0.77 (phased) and 0.65-0.67
(SGTS), phased on-mode fraction 0.855-0.864.
The off-mode samples lie on thin bridges between neighbouring modes (a smooth few-step map of a Gaussian does not
tear the ring apart completely); they cost SW1 and on-mode fraction, not coverage.

Diversity, recorded and not asserted: over the four seeds the phased mode histogram was the more even one each time
(entropy 0.9974-0.9988 against 0.9935-0.9979 for SGTS; at seed 0 the gap is within noise) and its SW1 the lower
(0.055-0.076 against 0.066-0.165); MPD shows no consistent difference (phased 2.53-2.55, SGTS 2.42-2.57, data 2.54).
On a 2-D mixture with an exact real score the paper's diversity gap (SGTS's one-step exits) is not expected to be
large, and the test is not tuned to show it.
"""

import math

import pytest
import torch
from torch import nn

from diffusers_pdmd.training.simulate import backsimulate, phase_sigmas, run_phase
from diffusers_pdmd.training.toy import GaussianMixture, MLPDenoiser, euler_sample
from diffusers_pdmd.training.toy_distill import distill_toy, train_flow_matching


_ANGLES = torch.arange(8) * 2 * math.pi / 8
GM = GaussianMixture(torch.stack([2 * _ANGLES.cos(), 2 * _ANGLES.sin()], 1), stds=0.1)
N = 4000
T1 = 0.5
MODE_RADIUS = 0.5


def sliced_w1(a: torch.Tensor, b: torch.Tensor, n_proj: int = 64, seed: int = 0) -> float:
    """Sliced Wasserstein-1 between two equal-size point sets, over `n_proj` fixed random directions."""
    d = torch.randn(a.shape[1], n_proj, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    d = d / d.norm(dim=0)
    pa, pb = (a.double() @ d).sort(0).values, (b.double() @ d).sort(0).values
    return (pa - pb).abs().mean().item()


def mode_counts(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Samples per mode (nearest mean within `MODE_RADIUS`) and the fraction of samples on some mode."""
    dist, idx = torch.cdist(x.double(), GM.means).min(1)
    on_mode = dist < MODE_RADIUS
    return torch.bincount(idx[on_mode], minlength=len(GM.means)).double(), on_mode.double().mean().item()


def mode_entropy(counts: torch.Tensor) -> float:
    """Entropy of the mode histogram divided by its maximum, `log(num_modes)`."""
    p = counts[counts > 0] / counts.sum()
    return -(p * p.log()).sum().item() / math.log(len(counts))


def mean_pairwise_distance(x: torch.Tensor, n: int = 2000) -> float:
    return torch.pdist(x[:n].double()).mean().item()


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = train_flow_matching(MLPDenoiser(dim=2, hidden=128, depth=3), GM, steps=2000, batch_size=512, seed=0)
    budget = {"generator_steps": 300, "fake_updates": 5, "batch_size": 256, "lr_generator": 1e-4, "lr_fake": 1e-3}
    phased = distill_toy(
        "phased_dmd", teacher, GM.velocity, boundaries=(T1,), steps_per_phase=(2, 2), seed=0, **budget
    )
    sgts = distill_toy("sgts", teacher, GM.velocity, boundaries=(), steps_per_phase=(4,), seed=0, **budget)

    z = torch.randn(N, 2, generator=torch.Generator().manual_seed(123))
    data = GM.sample(N, torch.Generator().manual_seed(7)).float()
    x_t1 = GM.noisy_sample(N, T1, torch.Generator().manual_seed(9)).float()
    with torch.no_grad():
        samples = {
            "phased": phased.sample(z),
            "sgts": sgts.sample(z, generator=torch.Generator().manual_seed(5)),
            "teacher_euler4": euler_sample(lambda x, t, c: teacher(x, t), z, torch.linspace(1, 0, 5)),
            "analytic_euler4": euler_sample(lambda x, t, c: GM.velocity(x, t), z, torch.linspace(1, 0, 5)),
        }
        phase0 = phased.sample(z, phase=0)
        untrained_phase0 = run_phase(z, phased.sigmas_by_phase[0], teacher)

    m = {
        "floor_data": sliced_w1(data, GM.sample(N, torch.Generator().manual_seed(8)).float()),
        "floor_t1": sliced_w1(x_t1, GM.noisy_sample(N, T1, torch.Generator().manual_seed(10)).float()),
        "phase0_sw": sliced_w1(phase0, x_t1),
        "untrained_phase0_sw": sliced_w1(untrained_phase0, x_t1),
    }
    for name, x in {"data": data, **samples}.items():
        counts, on_mode = mode_counts(x)
        m[name] = {
            "sw": sliced_w1(x, data),
            "on_mode": on_mode,
            "min_share": (counts.min() / (N / len(counts))).item(),
            "entropy": mode_entropy(counts),
            "mpd": mean_pairwise_distance(x),
            "counts": counts.long().tolist(),
        }
    print()
    print(f"SW1 floor: data {m['floor_data']:.4f}, x_t1 {m['floor_t1']:.4f}")
    print(f"phase 0 at t_1={T1}: SW1 {m['phase0_sw']:.4f} (untrained teacher copy {m['untrained_phase0_sw']:.4f})")
    for name in ["data", "phased", "sgts", "teacher_euler4", "analytic_euler4"]:
        r = m[name]
        print(
            f"{name:>16}: SW1 {r['sw']:.4f}  on-mode {r['on_mode']:.3f}  min-share {r['min_share']:.2f}  "
            f"entropy {r['entropy']:.4f}  MPD {r['mpd']:.3f}  counts {r['counts']}"
        )
    return m


def test_phased_and_sgts_cover_every_mode(toy):
    for name in ("phased", "sgts"):
        assert toy[name]["min_share"] > 1 / 3, (name, toy[name]["counts"])
        assert toy[name]["entropy"] > 0.98, name
    assert toy["phased"]["on_mode"] > 0.7


def test_phase0_output_matches_teacher_marginal_at_boundary(toy):
    assert toy["phase0_sw"] < 0.06
    assert toy["phase0_sw"] < 0.5 * toy["untrained_phase0_sw"]


def test_phased_samples_match_data(toy):
    assert toy["phased"]["sw"] < 0.11


class _ScaledVelocity(nn.Module):
    """`v(x, t) = a * t * x` with one scalar parameter `a`: an Euler step multiplies `x` by `1 + (t_next - t) a t`."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x, t):
        return self.a * t[:, None] * x


def test_backsimulate_gradient_only_through_last_step_of_current_phase():
    sigmas = phase_sigmas([0.5], [2, 2])  # [[1, 0.75, 0.5], [0.5, 0.25, 0]]
    a0, a1 = 0.8, -0.6
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    # Phase 0: steps at t = 1 (h = -0.25) and t = 0.75 (h = -0.25).
    x_075 = (1 - 0.25 * a0) * z
    y = (1 - 0.1875 * a0) * x_075
    # Phase 1: steps at t = 0.5 and t = 0.25 (h = -0.25 each).
    x_025 = (1 - 0.125 * a1) * y
    x_0 = (1 - a1 / 16) * x_025

    experts = [_ScaledVelocity(a0), _ScaledVelocity(a1)]
    x_s, s = backsimulate(z, sigmas, experts, phase=0)
    assert s == 0.5
    torch.testing.assert_close(x_s, y)
    x_s.sum().backward()
    truncated = -0.1875 * x_075.sum()
    full = truncated - 0.25 * (1 - 0.1875 * a0) * z.sum()
    torch.testing.assert_close(experts[0].a.grad, truncated)
    assert not torch.allclose(truncated, full)
    assert experts[1].a.grad is None

    experts = [_ScaledVelocity(a0), _ScaledVelocity(a1)]
    x_s, s = backsimulate(z, sigmas, experts, phase=1)
    assert s == 0.0
    torch.testing.assert_close(x_s, x_0)
    x_s.sum().backward()
    truncated = -x_025.sum() / 16
    full = truncated - 0.125 * (1 - a1 / 16) * y.sum()
    torch.testing.assert_close(experts[1].a.grad, truncated)
    assert not torch.allclose(truncated, full)
    assert experts[0].a.grad is None  # the frozen expert of phase 0 gets no gradient, even with requires_grad

    x_s, _ = backsimulate(z, sigmas, experts, phase=1, grad=False)
    assert x_s.grad_fn is None


def test_unequal_mode_weights_recovered_by_phased_dmd_not_by_sgts():
    """Modes at -1.5, 0, 1.5 with weights 0.6 / 0.3 / 0.1; the recipe's defaults (Eq. 13 weight, shifted t, beta1 0).

    Teacher: MLP fitted by flow matching on shift-3 training times; schedules shifted by 3; 150 generator updates per
    phase. Measured (seed 0): Phased DMD 0.596 / 0.325 / 0.079, SGTS 0.583 / 0.398 / 0.019. Over seeds 0-2 and the
    earlier defaults, `python benchmarks/toy_recipe.py` (docs/benchmarks/quality.md): the light mode keeps
    0.08-0.10 of the samples with Phased DMD and 0.02-0.05 with SGTS, whose one-step exits are mode-seeking.
    """
    gm = GaussianMixture([-1.5, 0.0, 1.5], stds=0.15, weights=[0.6, 0.3, 0.1])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = train_flow_matching(MLPDenoiser(dim=1, hidden=64, depth=3), gm, steps=1000, batch_size=512, t_shift=3.0)
    common = {"shift": 3.0, "t_shift": 3.0, "generator_steps": 150, "batch_size": 256, "dim": 1, "seed": 0}
    common.update(fake_weighting="paper", timestep_sampling="shifted", betas=(0.0, 0.999))
    phased = distill_toy("phased_dmd", teacher, gm.velocity, boundaries=(0.5,), steps_per_phase=(2, 2), **common)
    sgts = distill_toy("sgts", teacher, gm.velocity, boundaries=(), steps_per_phase=(4,), **common)
    z = torch.randn(20000, 1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        w_phased = gm.mode_weights(phased.sample(z))
        w_sgts = gm.mode_weights(sgts.sample(z, generator=torch.Generator().manual_seed(5)))
    print(f"\nrecovered weights: phased {w_phased.tolist()}, sgts {w_sgts.tolist()}")
    assert 0.5 * (w_phased - gm.weights).abs().sum() < 0.05  # total variation to the true weights
    assert w_phased[2] > 0.06
    assert w_sgts[2] < w_phased[2] - 0.03
