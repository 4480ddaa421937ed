"""The Phased DMD training run shared by the example scripts: set-up, then the phase loop.

`examples/phased_dmd/train_phased_dmd_<family>.py` parse their flags with [`build_parser`] and call [`train`]; all
that differs between Qwen-Image and Wan2.2 lives in [`diffusers_pdmd.families`]. The trainer is split by the question
each file answers:

- `cli.py`: which flags there are, and are they valid (before any model loads);
- `settings.py`: what the run does, in plain values resolved once (the run's settings and the recipe); `plan.py`:
  which phases are trained, with which sigmas;
- `data.py`: what goes into a batch (prompts, their embeddings, size buckets, noise, the losses' `t`);
- `roles.py`: which network plays which part (teacher, experts, fake scores on one frozen base);
- `phases.py`: what happens when a phase starts; `steps.py`: one fake-score update and one generator update;
- `resume.py`: what a checkpoint holds and how a run resumes; `outputs.py`: what a finished run leaves behind;
- `runs.py`: the run's folder and identity, checked before loading;
- the math in `flow.py`, `losses.py` and `simulate.py`; the authors' recipe parts in `recipe.py` (their settings and
  `--recipe`, torch-free, in `recipe_settings.py`).

This module wires them together; its loop, [`run_phases`], is the paper's algorithm.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import memory, parallel, runs
from .cli import PAPER_DEFAULTS, build_parser, check_args, check_sizes, check_speed_args, is_main_process, sizes
from .data import (
    Batch,
    Batches,
    TextConditions,
    cat_cond,
    load_prompts,
    load_real_items,
    load_real_latents,
    select_cond,
    trim_padding,
)
from .outputs import save_experts, summary, validate, write_outputs
from .phases import TrainState, enter_phase
from .plan import Plan, make_plan
from .recipe import real_sigmas_lightx2v
from .resume import load_earlier_experts, resume_training, save_training_checkpoint
from .roles import Distiller, compile_wanted
from .settings import Recipe, Settings, resolve
from .steps import TrainingDivergedError, fake_update, generator_update


logger = logging.getLogger("diffusers_pdmd.train")


def load_base_pipeline(settings, dtype: torch.dtype):
    """The base (teacher) pipeline that `--pretrained_model_name_or_path` names: the default loader of [`train`]."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(
        settings.pretrained_model_name_or_path, revision=settings.revision, use_safetensors=True, dtype=dtype
    )


def train(args, expected_families: tuple[str, ...], load_pipeline=load_base_pipeline) -> Path:
    """Run Phased DMD (or a baseline) as the flags say; return the experts-only output folder.

    `load_pipeline(settings, dtype)` returns the base pipeline (default: [`load_base_pipeline`]; `settings` is the
    run's [`Settings`]); a benchmark hands in a pipeline already in memory through it when the disk cannot hold a
    saved copy.

    Ctrl-C ends the run with one line naming the last checkpoint and the command that resumes it (exit code 130);
    a run that fails before writing anything leaves no empty `--output_dir` behind.
    """
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    output_dir = Path(args.output_dir)
    state = TrainState(output_dir, created_output_dir=not output_dir.exists())
    previous_sigint = _remember_ctrl_c(state)
    try:
        return _train(args, expected_families, state, load_pipeline)
    except KeyboardInterrupt:
        if not is_main_process():  # one line from the whole run
            pass
        elif state.last_ckpt is None:
            print(f"\nInterrupted at global step {state.global_step}, before the first checkpoint: nothing to resume.")
        else:
            print(
                f"\nInterrupted at global step {state.global_step}; last checkpoint {state.last_ckpt}. Resume "
                f"with: {runs.resume_command()}",
                flush=True,
            )
        raise SystemExit(130) from None
    finally:
        if previous_sigint is not None:
            signal.signal(signal.SIGINT, previous_sigint)
        if state.created_output_dir:
            runs.remove_empty_dirs(output_dir)


def _remember_ctrl_c(state: TrainState):
    """Make Ctrl-C raise `KeyboardInterrupt` as Python's own handler does, and also set `state.interrupted`: a
    `KeyboardInterrupt` raised inside a finalizer or garbage-collection callback is printed and dropped by Python, and
    the phase loop then ends the run at its next update. Returns the handler to restore (`None`: left as it was, where
    SIGINT is not Python's default handler or this is not the main thread)."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler or threading.current_thread() is not threading.main_thread():
        return None

    def on_sigint(signum, frame):
        state.interrupted = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    return previous


def _train(args, expected_families: tuple[str, ...], state: TrainState, load_pipeline) -> Path:
    """Every check that needs no weights, then the base and the roles on it, then the phase loop, then the outputs."""
    check_args(args)  # every flag check before any model loads
    check_speed_args(args)
    runs.check_image(args)
    settings = resolve(args)
    prompts = load_prompts(settings.prompts, settings.prompt_column)
    real_items = load_real_items(settings)  # fake-on-real's data (`--real_data`), checked before any model loads
    family = runs.probe_family(settings)
    plan = run = None
    if family is not None:
        plan, run = _checks_needing_the_family(settings, family, expected_families)
    resume = ckpt.resolve_resume(state.output_dir, settings.resume_from_checkpoint)
    resume_state = ckpt.read_state(resume) if resume is not None else None
    if resume is not None and run is not None:
        runs.check_resume(resume, resume_state, run, runs.recipe_config(settings.flags))
        if resume_state["global_step"] >= plan.total_steps and runs.finished(state.output_dir):
            logger.info(
                "The run in %s is finished (%d of %d generator updates, experts written); nothing to do.",
                state.output_dir,
                resume_state["global_step"],
                plan.total_steps,
            )
            return state.output_dir
    to_delete = runs.check_output_dir(settings, state.output_dir)

    accelerator = _accelerator(settings)
    if memory.apply_memory_plan(args, family, plan, settings.sizes, len(prompts), accelerator) is not None:
        settings = resolve(args)  # the plan turned on speed and memory flags (before loading, before deleting)
    _clear_output_dir(accelerator, to_delete)
    d, run = _load(settings, accelerator, load_pipeline, expected_families, (plan, run), (resume, resume_state))
    real = _real_latents(d, real_items, state.output_dir) if real_items is not None else None
    text = TextConditions(d, prompts, settings, captions=real.captions if real is not None else None)
    batches = Batches(d, text, settings, torch.Generator().manual_seed(settings.seed), real=real)
    _start(d, state, resume, batches.gen)

    def save() -> Path:
        return save_training_checkpoint(d, state, run, runs.recipe_config(settings.flags), batches.gen)

    if accelerator.is_main_process:
        state.output_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process and settings.report_to != "none":
        accelerator.init_trackers("phased-dmd", config=_tracker_config(settings.flags))
    finished = state.global_step >= d.plan.total_steps
    if d.plan.order == "sequential" and state.opts and not finished:  # resumed inside a phase: keep its optimizers
        state.current_phase = d.plan.position(state.global_step)[0]
    run_phases(d, batches, state, save)
    if state.global_step % settings.checkpointing_steps and not finished:
        save()
    write_outputs(d, state, text)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return state.output_dir


def _checks_needing_the_family(settings: Settings, family, expected_families) -> tuple[Plan, dict]:
    """The checks that need the family (from the config files before loading, else from the loaded pipeline);
    returns the plan and the run-defining values a checkpoint must match."""
    if family.name not in expected_families:
        raise ValueError(
            f"`--pretrained_model_name_or_path` is a {family.name} pipeline; this script trains "
            f"{list(expected_families)}."
        )
    if getattr(family, "image_concat", False) and not settings.image:
        raise ValueError(f"`--image` (the first frame of every sample) is required to distil {family.name}.")
    r = settings.recipe
    if r.guidance_scale_2 not in (None, r.guidance_scale) and len(family.transformer_names) < 2:
        raise ValueError("`--guidance_scale_2` needs a teacher with two transformers (Wan2.2 A14B).")
    if settings.real_data is not None and (family.image_concat or settings.image):
        raise ValueError(
            "`--real_data` (fake-on-real) is not supported with image conditioning (`--image`) yet: each real "
            "video would need its own first frame as the condition."
        )
    check_sizes(settings, family)
    plan = make_plan(settings, family)
    return plan, runs.run_config(settings, plan, family.name)


def _accelerator(settings: Settings):
    """The run's `Accelerator`; seeds every RNG."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    output_dir = Path(settings.output_dir)
    accelerator = Accelerator(
        mixed_precision=settings.mixed_precision,
        log_with=None if settings.report_to == "none" else settings.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / settings.logging_dir)
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    parallel.check_degree(settings.context_parallel_degree, accelerator.num_processes)  # before the weights load
    set_seed(settings.seed)
    return accelerator


def _clear_output_dir(accelerator, to_delete: list[Path]) -> None:
    """Delete what `--overwrite_output_dir` replaces, once every check before loading has passed."""
    if accelerator.is_main_process and to_delete:
        logger.info("--overwrite_output_dir: deleting %s", ", ".join(p.name for p in to_delete))
        for p in to_delete:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    accelerator.wait_for_everyone()


def _load(settings: Settings, accelerator, load_pipeline, expected_families, checked, resume):
    """`(Distiller, run)`: the base loaded, the family's checks (`checked`: their `(plan, run)`, or `(None, None)`)
    repeated where its config files could not be read before loading, and the roles set up on it."""
    from ..families import get_family

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = load_pipeline(settings, dtype)
    family = get_family(pipe)
    (plan, run), (path, resume_state) = checked, resume
    if plan is None or run["family"] != family.name:  # the config files could not be read before loading
        plan, run = _checks_needing_the_family(settings, family, expected_families)
        if path is not None:
            runs.check_resume(path, resume_state, run, runs.recipe_config(settings.flags))
    d = Distiller(settings, accelerator, family, pipe, plan)
    if d.fsdp and d.recipe.ida_decay < 1.0:
        raise ValueError("`--ida_decay` below 1 (IDA) is not supported under FSDP; train with DDP or pass 1.")
    del pipe  # the Distiller holds the components; no second reference may keep a freed text encoder alive
    return d, run


def _real_latents(d: Distiller, items: list, output_dir: Path):
    """Fake-on-real's real latents, encoded once (cached in `<output_dir>/real_data_cache`), after checking that
    every phase's real sigma lies above the phase's end."""
    sigmas = d.sigmas_by_phase
    real_sigmas = d.recipe.fake_real_sigmas or real_sigmas_lightx2v(sigmas)
    for k, (sigma_r, phase) in enumerate(zip(real_sigmas, sigmas)):
        if not float(phase[-1]) < float(sigma_r) <= 1.0:
            raise ValueError(
                f"`--fake_real_sigmas`: phase {k}'s real sigma {float(sigma_r):.4g} must lie in (s, 1], s = "
                f"{float(phase[-1]):.4g} the end of the phase."
            )
    return load_real_latents(d, items, output_dir / "real_data_cache")


def _start(d: Distiller, state: TrainState, resume: Path | None, generator: torch.Generator) -> None:
    """Load the experts of earlier phases that `--output_dir` holds, or resume from checkpoint `resume`."""
    from .. import hub

    s, output_dir, plan = d.settings, state.output_dir, d.plan
    earlier = output_dir / hub.CONFIG_NAME
    if earlier.is_file() and s.resume_from_checkpoint is None:
        with d.full_params(writeback=True):  # collective under FSDP
            load_earlier_experts(d, output_dir, skip=plan.phases if s.train_phase == "all" else [])
    if min(plan.phases) > 0 and not earlier.is_file() and s.resume_from_checkpoint is None:
        raise ValueError(
            f"Training phase {min(plan.phases)} needs the experts of phases 0..{min(plan.phases) - 1}: put the "
            f"output of their run in `--output_dir` ({output_dir}) first."
        )
    if s.resume_from_checkpoint is not None and resume is None:
        logger.info("No checkpoint in %s; starting from scratch.", output_dir)
    if resume is not None:
        resume_training(d, state, resume, generator)


def run_phases(d: Distiller, batches: Batches, state: TrainState, save_checkpoint) -> None:
    """The paper's algorithm, from `state.global_step` on: each generator update of a phase follows
    `--fake_updates_per_step` fake-score updates (TTUR); checkpoints and validation grids on their steps."""
    from tqdm.auto import tqdm

    plan, recipe, s = d.plan, d.recipe, d.settings
    progress = tqdm(
        total=plan.total_steps,
        initial=state.global_step,
        desc="Phased DMD" if plan.method == "phased_dmd" else plan.method.upper(),
        disable=not d.accelerator.is_local_main_process,
    )
    while state.global_step < plan.total_steps:
        if state.interrupted:  # a Ctrl-C that a finalizer swallowed
            raise KeyboardInterrupt
        phase, step = plan.position(state.global_step)
        enter_phase(d, recipe, state, phase)
        started = _synchronized_clock(d.device)
        fake_logs = {}
        for _ in range(recipe.fake_updates_per_step):
            fake_logs = fake_update(d, batches, recipe, state, phase, step)
        gen_logs = generator_update(d, batches, recipe, state, phase, step)
        state.global_step += 1
        _log(d, state, progress, phase, gen_logs, fake_logs, _synchronized_clock(d.device) - started)
        if state.global_step % s.checkpointing_steps == 0:
            save_checkpoint()
        if s.validation_prompts and state.global_step % s.validation_steps == 0:  # all processes: FSDP is collective
            path = state.output_dir / "validation" / f"step-{state.global_step}.png"
            validate(d, s.validation_prompts, batches.text.validation, batches.text.encode, path)
    progress.close()


def _log(d: Distiller, state: TrainState, progress, phase: int, gen_logs, fake_logs, step_seconds: float) -> None:
    """One generator update's losses (the global batch's: the mean over processes), LR and wall time: into the
    history, the progress bar and the tracker."""
    logs = {**gen_logs, **fake_logs}
    if d.layout.dp_size > 1:
        values = d.accelerator.reduce(torch.tensor(list(logs.values()), device=d.device), reduction="mean")
        logs = dict(zip(logs, values.tolist()))
    logs.update(phase=phase, lr=state.opts[phase].gen_schedule.get_last_lr()[0], step_seconds=step_seconds)
    state.history.append({"step": state.global_step, **{k: float(v) for k, v in logs.items()}})
    progress.update(1)
    progress.set_postfix(
        phase=phase, dmd=f"{gen_logs['dmd_loss']:.4g}", fake=f"{fake_logs.get('fake_loss', float('nan')):.4g}"
    )
    d.accelerator.log(logs, step=state.global_step)


def _synchronized_clock(device) -> float:
    """Host time after the device has finished its queued work (for per-step wall times in the history)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _tracker_config(flags: dict) -> dict:
    """The flags as hyperparameters a tracker takes: lists become strings (TensorBoard takes only scalars)."""
    out = {}
    for k, v in flags.items():
        if k == "hub_token":
            continue
        out[k] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


__all__ = [
    "PAPER_DEFAULTS",
    "Batch",
    "Distiller",
    "Plan",
    "Recipe",
    "Settings",
    "TrainingDivergedError",
    "build_parser",
    "cat_cond",
    "check_args",
    "check_speed_args",
    "compile_wanted",
    "load_base_pipeline",
    "load_prompts",
    "make_plan",
    "resolve",
    "run_phases",
    "save_experts",
    "select_cond",
    "sizes",
    "summary",
    "train",
    "trim_padding",
    "validate",
]
