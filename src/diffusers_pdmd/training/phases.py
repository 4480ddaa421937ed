"""Phase entry: a fresh fake score and fresh optimizers when a phase starts, and the state the phase loop carries.

Experts 0..k-1 are frozen when phase k starts; the fake score of phase k starts as a copy of the teacher
(PHASED_DMD.md, "Training one phase"). With `--phase_order sequential` (the paper) the optimizers of the phase
that ended are dropped, with its fake score, and its expert is frozen in the base's dtype (as a later run loads it
from disk); with `alternate` each phase keeps its own from the step it is first met, and every fake score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .roles import Distiller
from .settings import Recipe


@dataclass
class Optimizers:
    """The trainable parameters, AdamW optimizers and LR schedules of one phase's expert (`gen`) and fake score, and
    with `--real_data` of its fake-on-real score (`fake_real`, else `None`)."""

    gen_params: list[torch.nn.Parameter]
    fake_params: list[torch.nn.Parameter]
    gen: torch.optim.Optimizer
    fake: torch.optim.Optimizer
    gen_schedule: object
    fake_schedule: object
    fake_real_params: list[torch.nn.Parameter] | None = None
    fake_real: torch.optim.Optimizer | None = None
    fake_real_schedule: object = None

    def roles(self) -> dict:
        """`{role: (optimizer, LR schedule)}` of the networks trained: `gen`, `fake` and, if on, `fake_real`."""
        out = {"gen": (self.gen, self.gen_schedule), "fake": (self.fake, self.fake_schedule)}
        if self.fake_real is not None:
            out["fake_real"] = (self.fake_real, self.fake_real_schedule)
        return out


@dataclass
class FakeSamples:
    """`--fake_reuse_samples N`: the back-simulated batches of one fake update serve the next N - 1 as well (fresh
    `t` and noise each); never across a generator update, which changes the generator."""

    uses_left: int = 0
    batches: list = field(default_factory=list)

    def start_use(self, reuse: int) -> bool:
        """Count one fake update; `True` when it must back-simulate fresh batches (and store them here)."""
        fresh = self.uses_left == 0
        if fresh:
            self.batches, self.uses_left = [], reuse
        self.uses_left -= 1
        return fresh


@dataclass
class TrainState:
    """Where the run stands: written by the loop, saved in checkpoints, read by the Ctrl-C handler and the clean-up
    of a failed run."""

    output_dir: Path
    created_output_dir: bool = False
    global_step: int = 0
    last_ckpt: Path | None = None
    history: list[dict] = field(default_factory=list)
    opts: dict[int, Optimizers] = field(default_factory=dict)  # the live phases' optimizers
    current_phase: int | None = None  # sequential order: the phase whose optimizers are live
    fake_samples: FakeSamples = field(default_factory=FakeSamples)
    interrupted: bool = False  # Ctrl-C seen (the loop ends the run even where a finalizer swallowed it)


def hold_in_float32(params) -> None:
    """Trainable parameters are held in float32 (the optimizer's master weights), whatever the base's dtype."""
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()


def make_optimizers(d: Distiller, recipe: Recipe, max_steps: int, phase: int) -> Optimizers:
    """Optimizers of phase `phase`: its expert's and its fake score's parameters (and, with `--real_data`, its
    fake-on-real score's, with the fake score's learning rate and schedule), trainable and in float32."""
    from diffusers.optimization import get_scheduler

    def trainable(params):
        hold_in_float32(params)
        return params

    def schedule(opt, steps: int):
        return get_scheduler(
            recipe.lr_scheduler, opt, num_warmup_steps=recipe.lr_warmup_steps, num_training_steps=steps
        )

    fake_steps = max_steps * max(recipe.fake_updates_per_step, 1)
    gen_params, fake_params = trainable(d.expert_params(phase)), trainable(d.fake_params(phase))
    g_opt, f_opt = d.adamw(gen_params, recipe.learning_rate), d.adamw(fake_params, recipe.fake_learning_rate)
    opts = Optimizers(gen_params, fake_params, g_opt, f_opt, schedule(g_opt, max_steps), schedule(f_opt, fake_steps))
    if recipe.fake_on_real:
        opts.fake_real_params = trainable(d.fake_real_params(phase))
        opts.fake_real = d.adamw(opts.fake_real_params, recipe.fake_learning_rate)
        opts.fake_real_schedule = schedule(opts.fake_real, fake_steps)
    return opts


def end_phases_before(d: Distiller, state: TrainState, phase: int) -> None:
    """Sequential order: the phases before `phase` are over. Their optimizers and fake scores are freed and their
    experts held as a `--train_phase phase` run loads them ([`Distiller.end_phase`]), so that a run training every
    phase needs no more memory in phase `phase` than one training it alone, and sees the same earlier experts."""
    state.opts.clear()
    state.fake_samples = FakeSamples()
    for j in range(phase):
        d.end_phase(j)


def enter_phase(d: Distiller, recipe: Recipe, state: TrainState, phase: int) -> None:
    """Fresh fake score and optimizers when a phase starts (sequential) or is first met (alternate)."""
    if d.plan.order == "sequential" and phase != state.current_phase:
        end_phases_before(d, state, phase)
        state.current_phase = phase
    elif d.plan.order == "sequential" or phase in state.opts:
        return
    d.start_phase(phase)
    state.opts[phase] = make_optimizers(d, recipe, d.plan.max_steps, phase)
