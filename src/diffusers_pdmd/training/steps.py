"""One update of each network, as the paper's algorithm has them (PHASED_DMD.md, "Training one phase").

Each step draws its batches from [`Batches`](data.py), back-simulates them with [`generator_sample`], computes its
loss from `losses.py` and takes one optimizer step. A step reads nothing of the flags but its [`Recipe`]; optional
parts of a recipe (a diversity loss, IDA, fake-on-real, ...) are small functions of their own, called where the comments below
say, when their flag is on. Neither step reads a tensor back to the host (a device sync) but, per loss, its
finiteness check and one read of its logged values; drawing a batch reads none.
"""

from __future__ import annotations

import torch

from . import adapters as ad
from . import recipe as rc
from .data import Batch, Batches
from .losses import dmd_loss, fake_score_loss
from .phases import TrainState
from .roles import Distiller
from .settings import Recipe
from .simulate import generator_sample


class TrainingDivergedError(RuntimeError):
    """A loss became NaN or infinite; the run stopped without writing a checkpoint of the bad state."""


def check_finite(loss: torch.Tensor, what: str, phase: int, step: int, last_ckpt) -> None:
    if not torch.isfinite(loss):
        where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        raise TrainingDivergedError(
            f"{what} loss is {loss.item()} at phase {phase}, step {step}; stopping ({where}). Lower "
            "--learning_rate / --fake_learning_rate or check --mixed_precision, then resume with "
            "--resume_from_checkpoint latest."
        )


def optimizer_step(accelerator, params, opt, schedule, max_grad_norm: float) -> None:
    if max_grad_norm:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    schedule.step()
    opt.zero_grad(set_to_none=True)


def fake_update(d: Distiller, batches: Batches, recipe: Recipe, state: TrainState, phase: int, step: int) -> dict:
    """One fake-score update: subinterval score matching on stop-gradient generator samples (Eq. 13); with
    `--real_data`, then one update of the fake-on-real score (part 6)."""
    opt, ga, reuse = state.opts[phase], recipe.gradient_accumulation_steps, state.fake_samples
    fresh = reuse.start_use(recipe.fake_reuse_samples)
    for i in range(ga):
        if fresh:
            batch = batches.draw()
            experts = [d.expert(j, batch.cond) for j in range(d.plan.num_phases)]
            with torch.no_grad():
                x_s, s = generator_sample(
                    d.plan.method, batch.z, batch.sigmas, experts, phase, grad=False, generator=batches.gen
                )
            reuse.batches.append((batch, x_s, s))
        batch, x_s, s = reuse.batches[i]
        t, eps = batches.t_and_eps(batch, s, x_s)
        loss, logs = fake_score_loss(d.fake(phase, batch.cond), x_s, s, t, eps, weighting=recipe.fake_weighting)
        check_finite(loss, "Fake-score", phase, step, state.last_ckpt)
        d.accelerator.backward(loss / ga)
    optimizer_step(d.accelerator, opt.fake_params, opt.fake, opt.fake_schedule, recipe.max_grad_norm)
    if recipe.fake_on_real:
        logs = {**logs, **fake_real_update(d, batches, recipe, state, phase, step)}
    return logs


def generator_update(d: Distiller, batches: Batches, recipe: Recipe, state: TrainState, phase: int, step: int) -> dict:
    """One generator update: the DMD gradient on the reverse-nested interval (s, 1] (Eq. 11-12)."""
    opt, ga = state.opts[phase], recipe.gradient_accumulation_steps
    state.fake_samples.uses_left = 0  # the generator changes: the next fake update back-simulates afresh
    for _ in range(ga):
        batch = batches.draw()
        experts = [d.expert(j, batch.cond) for j in range(d.plan.num_phases)]
        if recipe.random_exit:
            x_s, s = random_exit_sample(batches, recipe, batch, experts, phase)
        else:
            x_s, s = generator_sample(
                d.plan.method, batch.z, batch.sigmas, experts, phase, grad=True, generator=batches.gen
            )
        t, eps = batches.t_and_eps(batch, s, x_s)
        real, fake = d.teacher(batch.cond, batches.text.negative), d.fake(phase, batch.cond)
        loss, logs = dmd_loss(x_s, s, real, fake, t, eps, weighting=recipe.dmd_weighting)
        if recipe.diversity_weight > 0 and phase == 0:
            loss, logs = add_diversity_loss(recipe, batch, real, experts[0], loss, logs)
        if recipe.fake_on_real:
            loss, logs = add_fake_on_real(d, batches, recipe, phase, loss, logs)
        check_finite(loss, "Generator (DMD)", phase, step, state.last_ckpt)
        # gradient checkpointing recomputes the expert's forward in backward: make it the active adapter
        d.switches[d.expert_base[phase]].set(f"phase_{phase}")
        d.accelerator.backward(loss / ga)
    optimizer_step(d.accelerator, opt.gen_params, opt.gen, opt.gen_schedule, recipe.max_grad_norm)
    if recipe.ida_decay < 1.0:
        ida_pull(d, phase, recipe.ida_decay)
    return logs


# -- the recipe's parts (recipe.py has their math; each is called only when its setting is on) -------------------


def random_exit_sample(batches: Batches, recipe: Recipe, batch: Batch, experts, phase: int):
    """Part 3: back-simulate to a random step `j` of the phase (one draw from the run's generator, the same on every
    process) and jump from it to the phase's end; `(x_s, s)` with gradient through step `j` only."""
    n = len(batch.sigmas[phase]) - 1
    j = rc.sample_exit_step(n, phase, recipe.diversity_weight > 0, batches.gen)
    return rc.backsimulate_exit(batch.z, batch.sigmas, experts, phase, j)


def add_diversity_loss(recipe: Recipe, batch: Batch, teacher, expert_0, loss, logs: dict):
    """Part 1 (phase 0): the student's first velocity from `z` regressed onto the teacher's (with its CFG) average
    velocity from `z` down to the anchor sigma, the student's second sigma unless `--diversity_anchor_step`."""
    grid = rc.teacher_grid(recipe.diversity_teacher_steps, batch.shift)
    a = recipe.diversity_anchor_step or rc.anchor_step_for(
        float(batch.sigmas[0][1]), recipe.diversity_teacher_steps, batch.shift
    )
    x_a, sigma_a = rc.teacher_anchor(teacher, batch.z, grid, a)
    div, div_logs = rc.diversity_loss(expert_0, batch.z, x_a, sigma_a, recipe.diversity_weight)
    return loss + div, {**logs, **div_logs}


def real_outputs(d: Distiller, batches: Batches, recipe: Recipe, phase: int, grad: bool):
    """Part 6: a real batch noised to the phase's fixed sigma, `x_r = (1 - sigma_r) x + sigma_r z`, and one step of
    the phase's expert from it to the phase's end `s`; `(real batch, x_s, s)`, `x_s` with gradient if `grad`.
    `sigma_r` is `--fake_real_sigmas`'s, else the authors' of the batch's grid (`recipe.real_sigmas_lightx2v`)."""
    real = batches.draw_real()
    sigma_r = (recipe.fake_real_sigmas or rc.real_sigmas_lightx2v(real.sigmas))[phase]
    s = float(real.sigmas[phase][-1])
    x_r = rc.noise_real(real.x_real, float(sigma_r), real.z)
    with torch.set_grad_enabled(grad):
        x_s, _ = rc.real_student_outputs(d.expert(phase, real.cond), x_r, float(sigma_r), s)
    return real, x_s, s


def fake_real_update(d: Distiller, batches: Batches, recipe: Recipe, state: TrainState, phase: int, step: int):
    """Part 6: one update of the fake-on-real score `F_k^real` (its own adapter and optimizer): the subinterval fake
    loss (Eq. 13) on the expert's outputs from noised real data, detached."""
    opt, ga = state.opts[phase], recipe.gradient_accumulation_steps
    for _ in range(ga):
        real, x_s, s = real_outputs(d, batches, recipe, phase, grad=False)
        t, eps = batches.t_and_eps(real, s, x_s)
        loss, logs = fake_score_loss(d.fake_real(phase, real.cond), x_s, s, t, eps, weighting=recipe.fake_weighting)
        check_finite(loss, "Fake-on-real score", phase, step, state.last_ckpt)
        d.accelerator.backward(loss / ga)
    optimizer_step(d.accelerator, opt.fake_real_params, opt.fake_real, opt.fake_real_schedule, recipe.max_grad_norm)
    return {"fake_real_loss": logs["fake_loss"]}


def add_fake_on_real(d: Distiller, batches: Batches, recipe: Recipe, phase: int, loss, logs: dict):
    """Part 6: the generator's extra DMD term on its outputs from noised real data, teacher against `F_k^real`,
    weighted by `--fake_real_weight`."""
    real, x_s, s = real_outputs(d, batches, recipe, phase, grad=True)
    t, eps = batches.t_and_eps(real, s, x_s)
    teacher, fake_real = d.teacher(real.cond, batches.text.negative), d.fake_real(phase, real.cond)
    term, term_logs = dmd_loss(x_s, s, teacher, fake_real, t, eps, weighting=recipe.dmd_weighting)
    return loss + recipe.fake_real_weight * term, {**logs, "fake_real_dmd_loss": term_logs["dmd_loss"]}


@torch.no_grad()
def ida_pull(d: Distiller, phase: int, decay: float) -> None:
    """Part 2, IDA: the fake score of `phase` pulled toward its expert, `fake <- d fake + (1 - d) generator`, on the
    transformer carrying the expert (a LoRA fake: on the merged deltas, `recipe.ida_lora_update`; a full fake:
    exactly, `recipe.ida_full_from_lora`)."""
    name, gen_name, fake_name = d.expert_base[phase], f"phase_{phase}", f"fake_{phase}"
    model = d.models[name]
    if d.settings.fake_full_finetune:
        return _ida_full(d.fake_full[name], model, gen_name, decay)
    for layer in ad.tuner_layers(model):
        if fake_name in layer.lora_A and gen_name in layer.lora_A:
            rc.ida_lora_update(
                [(layer.lora_B[fake_name].weight, layer.lora_A[fake_name].weight)],
                [(layer.lora_B[gen_name].weight, layer.lora_A[gen_name].weight)],
                decay,
                layer.scaling[fake_name],
                layer.scaling[gen_name],
            )


def _ida_full(fake, model, gen_name: str, decay: float) -> None:
    """IDA of a full-parameter fake copy toward base + the expert's LoRA, parameter by parameter."""
    fake = getattr(fake, "raw", fake)
    gen_layers = {n: m for n, m in model.named_modules() if isinstance(m, ad.BaseTunerLayer)}
    fake_params = dict(fake.named_parameters())
    for n, layer in gen_layers.items():
        w_f = fake_params.pop(f"{n}.base_layer.weight", None)
        if w_f is None:
            continue
        lora = gen_name in layer.lora_A
        b_g, a_g = (layer.lora_B[gen_name].weight, layer.lora_A[gen_name].weight) if lora else (None, None)
        scale = layer.scaling.get(gen_name, 1.0)
        rc.ida_full_from_lora(w_f, layer.base_layer.weight, b_g, a_g, decay, scale)
    base = dict(model.named_parameters())
    rest = [(p, base[n]) for n, p in fake_params.items() if p.requires_grad and n in base]
    rc.ida_update([p for p, _ in rest], [q for _, q in rest], decay)
