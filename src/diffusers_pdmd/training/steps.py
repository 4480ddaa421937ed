"""One update of each network, as the paper's algorithm has them (PHASED_DMD.md, "Training one phase").

Each step draws its batches from [`Batches`](data.py), back-simulates them with [`generator_sample`], computes its
loss from `losses.py` and takes one optimizer step. A step reads nothing of the flags but its [`Recipe`]; optional
parts of a recipe (a diversity loss, IDA, ...) are small functions of their own, called where the comments below
say, when their flag is on. Neither step reads a tensor back to the host except the finiteness check of its loss.
"""

from __future__ import annotations

import torch

from .data import Batches
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
    """One fake-score update: subinterval score matching on stop-gradient generator samples (Eq. 13)."""
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
    return logs


def generator_update(d: Distiller, batches: Batches, recipe: Recipe, state: TrainState, phase: int, step: int) -> dict:
    """One generator update: the DMD gradient on the reverse-nested interval (s, 1] (Eq. 11-12)."""
    opt, ga = state.opts[phase], recipe.gradient_accumulation_steps
    state.fake_samples.uses_left = 0  # the generator changes: the next fake update back-simulates afresh
    for _ in range(ga):
        batch = batches.draw()
        experts = [d.expert(j, batch.cond) for j in range(d.plan.num_phases)]
        x_s, s = generator_sample(
            d.plan.method, batch.z, batch.sigmas, experts, phase, grad=True, generator=batches.gen
        )
        t, eps = batches.t_and_eps(batch, s, x_s)
        real, fake = d.teacher(batch.cond, batches.text.negative), d.fake(phase, batch.cond)
        loss, logs = dmd_loss(x_s, s, real, fake, t, eps, weighting=recipe.dmd_weighting)
        # a diversity loss (phase 0, from the same z) is added to `loss` here when its flag is on
        check_finite(loss, "Generator (DMD)", phase, step, state.last_ckpt)
        # gradient checkpointing recomputes the expert's forward in backward: make it the active adapter
        d.switches[d.expert_base[phase]].set(f"phase_{phase}")
        d.accelerator.backward(loss / ga)
    optimizer_step(d.accelerator, opt.gen_params, opt.gen, opt.gen_schedule, recipe.max_grad_norm)
    # IDA (the fake score pulled toward the generator) is called here when its flag is on
    return logs
