"""The authors' 2026 training recipe (ModelTC/LightX2V `lightx2v_train`, phased_dmd), part by part, as pure functions.

Each part is optional; the trainer calls the function of a part only when its setting is on. Notation as in
[`flow`](flow.py): `x_t = (1 - t) x_0 + t eps`, velocity `v = eps - x_0`, `S(u) = shift u / (1 + (shift - 1) u)`.
The authors count time in raw steps `r` of 1000 on the unshifted scale, `t = S(r / 1000)`; here `u = r / 1000`.

1. Diversity loss: the student's first velocity regressed onto the teacher's average velocity over `[sigma_a, 1]`
   ([`teacher_grid`], [`teacher_anchor`], [`diversity_target`], [`diversity_loss`]).
2. IDA: the fake score pulled toward the generator after each generator step ([`ida_update`]; a full fake and a
   LoRA generator [`ida_full_from_lora`]; LoRA adapters [`ida_lora_merged`] / [`ida_lora_update`]).
3. Random exit inside a phase ([`exit_step_range`], [`sample_exit_step`], [`phase_exit`], [`backsimulate_exit`]).
4. A margin above `s` for the `t` of the DMD and fake losses ([`margin_t_bounds`]).
5. The teacher's standard negative prompt per family ([`default_negative_prompt`]).
6. Fake-on-real ([`noise_real`], [`real_student_outputs`]; the losses are [`losses.fake_score_loss`] and
   [`losses.dmd_loss`] on those outputs; the data in [`real_data`](real_data.py)).
7. The preset: [`resolve_recipe`] and [`add_recipe_args`].

5. and 7. live in [`recipe_settings`](recipe_settings.py) (torch-free: the scripts' `--help` reads them); this module
re-exports their names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .flow import euler_step, shift_time, unshift_time, x0_from_velocity
from .recipe_settings import (  # noqa: F401  (5. and 7., torch-free for the scripts' --help)
    LIGHTX2V_GUIDANCE,
    NEGATIVE_PROMPTS,
    QWEN_IMAGE_NEGATIVE_PROMPT,
    RECIPE_FIELDS,
    RECIPES,
    WAN_FAMILIES,
    WAN_NEGATIVE_PROMPT,
    RecipeSettings,
    add_recipe_args,
    check_recipe,
    default_negative_prompt,
    explicit_flags,
    recipe_defaults,
    resolve_recipe,
    resolve_recipe_args,
)
from .simulate import Velocity, _t, run_phase


# ----------------------------------------------------------------------------------------------------------------
# 1. Diversity loss
# ----------------------------------------------------------------------------------------------------------------


def teacher_grid(num_steps: int, shift: float) -> list[float]:
    """The teacher's own Euler grid: `sigma_i = S(1 - i / N)` for `i = 0..N-1`, then 0 (`N + 1` values).

    With `N = 40`, `shift = 7` (their Wan2.2 A14B config) `sigma_10 = S(0.75) = 0.9545`, the student's second sigma.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be a positive integer, got {num_steps!r}.")
    if not shift > 0:
        raise ValueError(f"`shift` must be > 0, got {shift!r}.")
    return [float(shift_time(1.0 - i / num_steps, shift)) for i in range(num_steps)] + [0.0]


def anchor_step_for(sigma_a: float, num_steps: int, shift: float) -> int:
    """The step of [`teacher_grid`] nearest to `sigma_a`: `a = round(N (1 - S^-1(sigma_a)))`, at least 1.

    Their `a = 10` of `N = 40` is this for the student's second sigma 0.9545 at shift 7; with another shift or
    boundary (Qwen-Image's resolution-dependent shift) the student's second sigma gives another `a`.
    """
    return max(1, round(num_steps * (1.0 - float(unshift_time(sigma_a, shift)))))


@torch.no_grad()
def teacher_anchor(
    teacher_velocity: Velocity, z: torch.Tensor, sigmas: Sequence[float], anchor_step: int
) -> tuple[torch.Tensor, float]:
    """Euler-solve the teacher (with its CFG closed over) from `z` at `sigmas[0] = 1` for `anchor_step` steps.

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * T(x_i, sigma_i),   x_0 = z;   returns (x_a, sigma_a), a = anchor_step
    """
    if not 1 <= anchor_step < len(sigmas):
        raise ValueError(f"`anchor_step` must be in [1, {len(sigmas) - 1}], got {anchor_step}.")
    x = z.detach()
    for i in range(anchor_step):
        x = euler_step(x, sigmas[i], sigmas[i + 1], teacher_velocity(x, _t(sigmas[i], x)))
    return x, float(sigmas[anchor_step])


def diversity_target(z: torch.Tensor, x_a: torch.Tensor, sigma_a: float) -> torch.Tensor:
    """The teacher's average velocity over `[sigma_a, 1]`: `v_bar = (z - x_a) / (1 - sigma_a)`."""
    if not 0.0 <= sigma_a < 1.0:
        raise ValueError(f"`sigma_a` must be in [0, 1), got {sigma_a!r}.")
    return (z.float() - x_a.float()) / (1.0 - sigma_a)


def diversity_loss(
    student_velocity: Velocity, z: torch.Tensor, x_a: torch.Tensor, sigma_a: float, weight: float = 0.05
) -> tuple[torch.Tensor, dict]:
    """`weight * mean((G_0(z, 1) - (z - x_a) / (1 - sigma_a))^2)`: the student's first velocity (with gradient)
    regressed onto the teacher's average velocity from the same noise `z` (their weight 0.05, phase 0 only).

    Returns:
        `(loss, logs)` with the unweighted mean squared error as `logs["div_loss"]`.
    """
    target = diversity_target(z, x_a, sigma_a).detach()
    mse = ((student_velocity(z, _t(1.0, z)).float() - target) ** 2).mean()
    return weight * mse, {"div_loss": mse.item()}


# ----------------------------------------------------------------------------------------------------------------
# 2. IDA (implicit distribution alignment, SenseFlow)
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def ida_update(fake_params: Iterable[torch.Tensor], generator_params: Iterable[torch.Tensor], decay: float = 0.97):
    """`phi_fake <- d * phi_fake + (1 - d) * phi_gen`, parameter by parameter, in place (full-parameter fakes).

    The two lists must pair the same tensors (same architecture, same order); `d = 1` leaves the fake unchanged.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"`decay` must be in (0, 1], got {decay!r}.")
    fake_params, generator_params = list(fake_params), list(generator_params)
    if len(fake_params) != len(generator_params):
        raise ValueError(f"`fake_params` has {len(fake_params)} tensors, `generator_params` {len(generator_params)}.")
    for p_f, p_g in zip(fake_params, generator_params):
        if p_f.shape != p_g.shape:
            raise ValueError(f"IDA pairs tensors of one shape; got {tuple(p_f.shape)} and {tuple(p_g.shape)}.")
        p_f.mul_(decay).add_(p_g.to(p_f.dtype), alpha=1.0 - decay)


@torch.no_grad()
def ida_full_from_lora(
    fake_weight: torch.Tensor,
    base_weight: torch.Tensor,
    b_g: torch.Tensor | None = None,
    a_g: torch.Tensor | None = None,
    decay: float = 0.97,
    scale_g: float = 1.0,
):
    """IDA for a full-parameter fake and a LoRA generator, in place, exact:
    `W_fake <- d W_fake + (1 - d) (W + s_g B_g A_g)` (`B_g`, `A_g` omitted: a layer without the adapter, `W`)."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"`decay` must be in (0, 1], got {decay!r}.")
    target = base_weight.to(fake_weight.dtype)
    if b_g is not None:
        target = target + (scale_g * (b_g.float() @ a_g.float())).to(fake_weight.dtype)
    fake_weight.mul_(decay).add_(target, alpha=1.0 - decay)


@torch.no_grad()
def ida_lora_merged(
    b_f: torch.Tensor,
    a_f: torch.Tensor,
    b_g: torch.Tensor,
    a_g: torch.Tensor,
    decay: float = 0.97,
    scale_f: float = 1.0,
    scale_g: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IDA on the merged LoRA deltas, refactored to the fake's rank `r`: `scale_f * B A` is the best rank-`r`
    approximation (Eckart-Young) of

        dW = d * scale_f * B_f A_f + (1 - d) * scale_g * B_g A_g = [d s_f B_f, (1 - d) s_g B_g] [A_f; A_g]

    computed from the `2r`-column factors (QR of each side, SVD of the small core, `dW_r = U S V^T`). The split
    into factors keeps the fake's parametrisation as far as it can, so that its optimizer state stays meaningful:
    `A = A_f V V^T` (the fake's own `A` projected onto the new row space) and `B = U S V^T A^+ / s_f`; when that
    projection loses rank (condition number above 1e4) it falls back to `A = c V^T`, `B = U S / (c s_f)`,
    `c = ||A_f|| / sqrt(r)`, which also keeps `A` alive when the delta is zero (`B = 0`, as at LoRA's
    initialisation). Exact when `rank(dW) <= r`. Shapes: `B (out, r)`, `A (r, in)`; `scale` is peft's
    `lora_alpha / r`.

    Returns:
        `(B_new, A_new)` with the fake's shapes.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"`decay` must be in (0, 1], got {decay!r}.")
    r, dtype = b_f.shape[1], b_f.dtype
    left = torch.cat([decay * scale_f * b_f.double(), (1.0 - decay) * scale_g * b_g.double()], dim=1)
    right = torch.cat([a_f.double(), a_g.double()], dim=0)
    q_l, r_l = torch.linalg.qr(left)
    q_r, r_r = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r_l @ r_r.T)  # full matrices: vh has min(in, 2r) rows
    k = min(r, s.numel())  # rank(dW) <= min(out, in, 2r); pad to r when a side is narrower than r
    us = torch.nn.functional.pad(q_l @ u[:, :k] * s[:k], (0, r - k))
    v_t = vh[:r] @ q_r.T  # dW_r = us @ v_t, v_t with orthonormal rows
    v_t = torch.nn.functional.pad(v_t, (0, 0, 0, r - v_t.shape[0]))
    m = a_f.double() @ v_t.T  # A = m @ v_t: the fake's A projected onto the new row space
    if torch.linalg.cond(m) < 1e4:
        return (us @ torch.linalg.inv(m) / scale_f).to(dtype), (m @ v_t).to(dtype)
    c = float(a_f.double().norm()) / r**0.5 or 1.0
    return (us / (c * scale_f)).to(dtype), (c * v_t).to(dtype)


@torch.no_grad()
def ida_lora_update(fake_factors, generator_factors, decay: float = 0.97, scale_f: float = 1.0, scale_g: float = 1.0):
    """[`ida_lora_merged`] in place over paired `(B, A)` factors of the fake and generator adapters, layer by layer."""
    fake_factors, generator_factors = list(fake_factors), list(generator_factors)
    if len(fake_factors) != len(generator_factors):
        raise ValueError(f"{len(fake_factors)} fake LoRA layers but {len(generator_factors)} generator ones.")
    for (b_f, a_f), (b_g, a_g) in zip(fake_factors, generator_factors):
        b, a = ida_lora_merged(b_f, a_f, b_g, a_g, decay, scale_f, scale_g)
        b_f.copy_(b)
        a_f.copy_(a)


# ----------------------------------------------------------------------------------------------------------------
# 3. Random exit inside a phase
# ----------------------------------------------------------------------------------------------------------------


def exit_step_range(num_steps: int, phase: int, diversity: bool) -> tuple[int, int]:
    """The 0-based steps `[lo, hi]` of a phase with `num_steps` steps that the generator update may train.

    `hi = num_steps - 1` (the phase's last step); `lo = 0`, except `lo = hi` in phase 0 with the diversity loss on
    (that loss already trains phase 0's first step directly).
    """
    if num_steps < 1:
        raise ValueError(f"`num_steps` must be >= 1, got {num_steps}.")
    hi = num_steps - 1
    return (hi if diversity and phase == 0 else 0), hi


def sample_exit_step(num_steps: int, phase: int, diversity: bool, generator: torch.Generator | None = None) -> int:
    """`j` uniform on [`exit_step_range`] (one draw from `generator`, also when the range is a single step)."""
    lo, hi = exit_step_range(num_steps, phase, diversity)
    return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())


def phase_exit(
    x: torch.Tensor, sigmas: Sequence[float], expert: Velocity, exit_step: int, grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a phase's Euler steps `0..j-1` without gradient, then jump from `sigma_j` to the phase's end `s`:

        x_s = x_j + (s - sigma_j) * G(x_j, sigma_j),   x0_hat = x_j - sigma_j * G(x_j, sigma_j)

    with gradient through `G(x_j, sigma_j)` only. At `j = n - 1` this is the ordinary last step.

    Returns:
        `(x_s, x0_hat)`.
    """
    n = len(sigmas) - 1
    if not 0 <= exit_step < n:
        raise ValueError(f"`exit_step` must be in [0, {n - 1}], got {exit_step}.")
    with torch.no_grad():
        x = run_phase(x, sigmas[: exit_step + 1], expert)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        v = expert(x, _t(sigmas[exit_step], x))
        return euler_step(x, sigmas[exit_step], sigmas[-1], v), x0_from_velocity(x, sigmas[exit_step], v)


def backsimulate_exit(
    noise: torch.Tensor,
    sigmas_by_phase: Sequence[Sequence[float]],
    experts: Sequence[Velocity],
    phase: int,
    exit_step: int,
    grad: bool = True,
) -> tuple[torch.Tensor, float]:
    """[`~simulate.backsimulate`] with a random exit: frozen experts to the phase start, then [`phase_exit`].

    Returns:
        `(x_s, s)`.
    """
    if not 0 <= phase < len(sigmas_by_phase):
        raise ValueError(f"`phase` must be in [0, {len(sigmas_by_phase) - 1}], got {phase}.")
    x = noise
    with torch.no_grad():
        for k in range(phase):
            x = run_phase(x, sigmas_by_phase[k], experts[k])
    x_s, _ = phase_exit(x, sigmas_by_phase[phase], experts[phase], exit_step, grad=grad)
    return x_s, float(sigmas_by_phase[phase][-1])


# ----------------------------------------------------------------------------------------------------------------
# 4. Margin above s
# ----------------------------------------------------------------------------------------------------------------


def margin_t_bounds(
    s: float, shift: float, margin: float = 0.02, lowest: float = 0.02, highest: float = 0.98
) -> tuple[float, float]:
    """The interval `[t_lo, t_hi]` of the DMD and fake losses' `t` with a margin above `s`, on the unshifted scale:

        t_lo = S(max(S^-1(s) + margin, lowest)),   t_hi = S(highest)

    Their Wan2.2 A14B config: raw steps in `[max(r_s + 20, 20), 980]` of 1000 (`margin = lowest = 0.02`,
    `highest = 0.98`); at shift 7, `s = 0.875` (`r_s = 500`) gives `t in [S(0.52), S(0.98)] = [0.883, 0.997]`, and
    the last phase (`s = 0`) `t in [0.125, 0.997]`. Pass to [`~losses.sample_t`] as `min_gap=t_lo - s, t_max=t_hi`.
    """
    if not 0.0 <= margin < 1.0 or not 0.0 <= lowest < highest <= 1.0:
        raise ValueError(
            f"need `margin` in [0, 1) and 0 <= `lowest` < `highest` <= 1; got {margin!r}, {lowest!r}, {highest!r}."
        )
    u_lo = max(float(unshift_time(s, shift)) + margin, lowest)
    if u_lo >= highest:
        raise ValueError(f"no `t` left: S^-1(s) + margin = {u_lo:.4f} >= `highest` = {highest} (s = {s}).")
    return float(shift_time(u_lo, shift)), float(shift_time(highest, shift))


# ----------------------------------------------------------------------------------------------------------------
# 6. Fake-on-real
# ----------------------------------------------------------------------------------------------------------------


def noise_real(x_real: torch.Tensor, sigma_r: float, eps: torch.Tensor) -> torch.Tensor:
    """Real latents noised to the phase's fixed `sigma_r`: `x_r = (1 - sigma_r) x_real + sigma_r eps`."""
    if not 0.0 < sigma_r <= 1.0:
        raise ValueError(f"`sigma_r` must be in (0, 1], got {sigma_r!r}.")
    return (1.0 - sigma_r) * x_real + sigma_r * eps


def real_student_outputs(
    expert: Velocity, x_r: torch.Tensor, sigma_r: float, s: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One student step (with gradient) from the noised real `x_r` at `sigma_r` to the phase end `s < sigma_r`:

        v = G_k(x_r, sigma_r),   x_s = x_r + (s - sigma_r) v,   x0_hat = x_r - sigma_r v

    The separate fake score `F_k^real` is trained on `x_s` (detached) with [`~losses.fake_score_loss`] at `s`; the
    extra generator term is [`~losses.dmd_loss`]`(x_s, s, teacher, F_k^real, t, eps)` times `weight` (their 0.1).

    Returns:
        `(x_s, x0_hat)`.
    """
    if not 0.0 <= s < sigma_r:
        raise ValueError(f"need 0 <= `s` < `sigma_r`, got s={s!r}, sigma_r={sigma_r!r}.")
    v = expert(x_r, _t(sigma_r, x_r))
    return euler_step(x_r, sigma_r, s, v), x0_from_velocity(x_r, sigma_r, v)


def real_sigmas_lightx2v(sigmas_by_phase: Sequence[Sequence[float]]) -> list[float]:
    """Their fixed real-data sigma per phase: phase 0 its second sigma (raw 750: 0.9545), later phases their first
    (raw 500: 0.875), e.g. `[[1, .9545, .875], [.875, .7, 0]] -> [0.9545, 0.875]`."""
    return [float(p[1] if k == 0 and len(p) > 2 else p[0]) for k, p in enumerate(sigmas_by_phase)]
