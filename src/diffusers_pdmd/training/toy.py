"""Toy data with closed-form flow velocities, and a small MLP denoiser, for tests and small-scale studies.

For a Gaussian mixture `x_0 ~ sum_i w_i N(mu_i, tau_i^2 I)` the noisy marginal under `x_t = (1 - t) x_0 + t eps` is
again a mixture, `x_t | i ~ N((1 - t) mu_i, ((1 - t)^2 tau_i^2 + t^2) I)`, and the marginal velocity
`v(x_t, t) = E[eps - x_0 | x_t]` is the responsibility-weighted sum of the per-component posterior means. With
`tau_i = 0` the mixture is a set of points (the paper's 1-D toy uses `{-1, 0, 1, 2}`).
"""

from __future__ import annotations

import torch
from torch import nn


class GaussianMixture:
    """An isotropic Gaussian mixture in `D` dimensions with analytic noisy-marginal velocity.

    Args:
        means (`torch.Tensor` of shape `(M, D)` or `(M,)`): Component means (a 1-D tensor means `D = 1`).
        stds (`float` or `torch.Tensor` of shape `(M,)`): Component standard deviations `tau_i` (0 allowed).
        weights (`torch.Tensor` of shape `(M,)`, *optional*): Mixture weights; uniform if omitted.
    """

    def __init__(self, means, stds=0.0, weights=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        self.means = means[:, None] if means.ndim == 1 else means
        m = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(m).clone()
        w = torch.ones(m, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """Draw `n` clean samples `x_0` of shape `(n, D)` (float64)."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[idx] + self.stds[idx, None] * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (x, idx) if return_labels else x

    def _posterior(self, x_t: torch.Tensor, t):
        """Per-component `E[x_0 | x_t, i]`, `E[eps | x_t, i]` (each `(N, D, M)`) and responsibilities `(N, M)`."""
        x = x_t.to(torch.float64)
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0]).reshape(-1, 1, 1)
        a = 1 - t
        var = a**2 * self.stds**2 + t**2  # (N, 1, M)
        diff = x[:, :, None] - a * self.means.T[None]  # (N, D, M)
        log_r = torch.log(self.weights) - 0.5 * (diff**2).sum(1) / var[:, 0] - 0.5 * self.dim * torch.log(var[:, 0])
        r = torch.softmax(log_r, dim=-1)
        x0 = self.means.T[None] + a * self.stds**2 / var * diff
        eps = t / var * diff
        return x0, eps, r

    def velocity(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """Analytic marginal velocity `E[eps - x_0 | x_t]` at time `t` in (0, 1] (float or `(N,)` tensor)."""
        x0, eps, r = self._posterior(x_t, t)
        return ((eps - x0) * r[:, None, :]).sum(-1).to(x_t.dtype)

    def responsibilities(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """Posterior component probabilities `p(i | x_t)`, shape `(N, M)`."""
        return self._posterior(x_t, t)[-1].to(x_t.dtype)

    def mode_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The fraction of the samples `x` (`(N, D)`) nearest to each mean: the mixture weights a sampler recovers."""
        idx = torch.cdist(x.to(torch.float64), self.means).argmin(1)
        return torch.bincount(idx, minlength=self.means.shape[0]).to(torch.float64) / x.shape[0]

    def noisy_sample(self, n: int, t: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Samples of the marginal at time `t`."""
        x0 = self.sample(n, generator)
        return (1 - t) * x0 + t * torch.randn(x0.shape, generator=generator, dtype=torch.float64)


class MLPDenoiser(nn.Module):
    """A small MLP `v = f(x_t, t, cond)` for toy studies: input `x_t (B, D)`, `t (B,)`, optional class `cond (B,)`.

    Args:
        dim (`int`): Data dimension D.
        hidden (`int`): Width of the hidden layers.
        depth (`int`): Number of hidden layers.
        num_classes (`int`): Number of condition classes (0 for unconditional). Class `num_classes` is the null
            class, so classifier-free guidance can be used.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 4, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("t_freqs", torch.randn(16) * 4.0)
        in_dim = dim + 32 + (hidden if num_classes else 0)
        self.embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        layers, d = [], in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        layers.append(nn.Linear(d, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        ang = t[:, None] * self.t_freqs[None]
        feats = [x_t, torch.sin(ang), torch.cos(ang)]
        if self.embed is not None:
            if cond is None:
                cond = torch.full((x_t.shape[0],), self.num_classes, device=x_t.device, dtype=torch.long)
            feats.append(self.embed(cond))
        return self.net(torch.cat(feats, dim=-1))


class LoRALinear(nn.Module):
    """`y = W x + b + scale * B (A x)` around a frozen `nn.Linear` (`A` `(r, in)` random, `B` `(out, r)` zero, as peft
    initialises them; `scale = alpha / r`)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = (alpha if alpha is not None else rank) / rank
        self.reset_lora_A()

    @torch.no_grad()
    def reset_lora_A(self):
        """Draw `A` afresh (from torch's global generator); with `B = 0` the layer's output does not change."""
        self.lora_A.copy_(torch.randn(self.lora_A.shape) / self.lora_A.shape[1] ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.lora_A.T) @ self.lora_B.T


def add_lora(model: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Freeze `model` and wrap each of its `nn.Linear` layers in a [`LoRALinear`] (in place); returns `model`."""
    model.requires_grad_(False)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, LoRALinear(child, rank, alpha))
        else:
            add_lora(child, rank, alpha)
    return model


def lora_factors(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """The `(B, A)` factors of every [`LoRALinear`] in `model`, in module order."""
    return [(m.lora_B, m.lora_A) for m in model.modules() if isinstance(m, LoRALinear)]


def euler_sample(velocity_fn, x: torch.Tensor, sigmas, cond=None, return_trajectory: bool = False):
    """Integrate `dx/dt = v` with Euler steps along decreasing `sigmas` (e.g. from 1 to 0).

    `velocity_fn(x, t, cond)` gets `t` as a `(B,)` tensor.
    """
    traj = [x]
    for t, t_next in zip(sigmas[:-1], sigmas[1:]):
        t_b = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        x = x + (float(t_next) - float(t)) * velocity_fn(x, t_b, cond)
        traj.append(x)
    return torch.stack(traj) if return_trajectory else x
