"""How a run is saved and picked up again: the training checkpoint (experts, fake scores, fake-on-real scores,
optimizers, LR schedules, RNG states, history) and the experts of earlier phases that a `--train_phase k` run starts from.

The files themselves are written atomically by `checkpoint.py`; this module decides what goes into them. A resumed
run continues bit-exactly: the optimizers of the live phases, their LR schedules and every RNG state come back.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import adapters as ad
from . import checkpoint as ckpt
from .phases import TrainState, end_phases_before, hold_in_float32, make_optimizers
from .roles import Distiller


logger = logging.getLogger("diffusers_pdmd.train")


def load_adapter(model, adapter_name: str, state_dict, path: Path) -> None:
    try:
        ad.load_adapter_state_dict(model, adapter_name, state_dict)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}.safetensors does not fit adapter {adapter_name!r} of this run: {e}") from e


def load_earlier_experts(d: Distiller, folder: Path, skip) -> None:
    """The experts in `folder`'s experts-only repo into the adapters the Distiller made for them (but `skip`).

    Each module's `lora_B` is converted from the file's scaling (1 in the files `hub.save_lora_expert` writes, whose
    weights carry the scale; `lora_alpha / r` from its metadata in earlier versions' files) to the scaling of the
    run's adapter (`--lora_rank` / `--lora_alpha`), so the adapter computes the function the file holds.
    """
    from .. import hub

    config = hub.ExpertsConfig.load(folder)
    for e in config.experts:
        j = int(e["phase"])
        if j in skip or j >= d.plan.num_phases or e.get("type", "lora") != "lora":
            continue
        path = folder / e["path"]
        if path.is_dir():
            path = path / hub.LORA_WEIGHT_NAME
        if path.exists():  # into the adapter the Distiller already made for phase j
            prefix, model = hub.LORA_PREFIX + ".", d.models[d.expert_base[j]]
            try:
                tensors, lora_config = hub.read_lora_file(path)
                state_dict = {k.removeprefix(prefix): v for k, v in tensors.items()}
                state_dict = hub.scale_lora_up(
                    state_dict, ad.rescale_factors(model, f"phase_{j}", state_dict, lora_config)
                )
                ad.load_adapter_state_dict(model, f"phase_{j}", state_dict)
            except Exception as err:
                raise ValueError(
                    f"The expert of phase {j} in `--output_dir`, {path}, cannot be loaded: {err}"
                ) from err


def resume_training(d: Distiller, state: TrainState, path: Path, generator) -> None:
    """Load checkpoint `path` into the models, fresh optimizers of its live phases, `state` and the RNGs."""
    plan, full_fake = d.plan, d.settings.fake_full_finetune
    files, saved = ckpt.load_checkpoint(path)
    state.global_step, state.history = saved["global_step"], saved.get("history", [])
    phase, _ = plan.position(min(state.global_step, plan.total_steps - 1))
    # phases whose optimizers were live when the checkpoint was written; in sequential order the checkpoint closed
    # the ones before `phase`, which starts fresh, as in an uninterrupted run
    live = [j for j in saved["opt_phases"] if plan.order != "sequential" or j == phase]
    for j in live:  # their float32 weights are loaded unrounded into float32 adapters
        hold_in_float32(d.expert_params(j))
    with d.full_params(writeback=True):  # collective under FSDP
        for j in range(plan.num_phases):
            if f"phase_{j}" in files:
                load_adapter(d.models[d.expert_base[j]], f"phase_{j}", files[f"phase_{j}"], path / f"phase_{j}")
    if plan.order == "sequential":  # the phases before are over, as in the uninterrupted run
        end_phases_before(d, state, phase)
    for j in live:
        if full_fake:
            d.start_phase(j)
        hold_in_float32(d.fake_params(j) + (d.fake_real_params(j) if d.recipe.fake_on_real else []))
        with d.full_params(writeback=True):
            for name, model in d.models.items() if not full_fake else ():
                load_adapter(model, f"fake_{j}", files[f"fake_{j}.{name}"], path / f"fake_{j}.{name}")
            for name, model in d.models.items() if d.recipe.fake_on_real else ():
                load_adapter(model, f"fake_real_{j}", files[f"fake_real_{j}.{name}"], path / f"fake_real_{j}.{name}")
            for name, model in d.fake_full.items() if full_fake else ():
                getattr(model, "raw", model).load_state_dict(files[f"fake_full.{name}"])
        opt = state.opts[j] = make_optimizers(d, d.recipe, plan.max_steps, j)
        for role, (optimizer, schedule) in opt.roles().items():
            key = f"{role}_{j}"
            d.load_optimizer_state(optimizer, j, role, files["optimizers"], saved["optimizers"][key], key)
            schedule.load_state_dict(saved["lr_schedulers"][key])
    ckpt.set_rng_state(files["rng"], saved["rng"], {"noise": generator})
    state.last_ckpt = path
    logger.info("Resumed from %s at global step %d (phase %d).", path, state.global_step, phase)


def _weights(d: Distiller, state: TrainState) -> dict:
    """The experts' and the live fake scores' tensors, by checkpoint file name (collective under FSDP)."""
    files = {}
    with d.full_params():  # every process takes part under FSDP; only the main one writes
        for j in range(d.plan.num_phases):
            files[f"phase_{j}"] = ad.adapter_state_dict(d.models[d.expert_base[j]], f"phase_{j}")
        for j in state.opts:
            for name, model in d.models.items() if d.recipe.fake_on_real else ():
                files[f"fake_real_{j}.{name}"] = ad.adapter_state_dict(model, f"fake_real_{j}")
            if not d.settings.fake_full_finetune:
                for name, model in d.models.items():
                    files[f"fake_{j}.{name}"] = ad.adapter_state_dict(model, f"fake_{j}")
            else:
                for name, model in d.fake_full.items():
                    files[f"fake_full.{name}"] = {
                        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                    }
    return files


def save_training_checkpoint(d: Distiller, state: TrainState, run: dict, recipe_record: dict, generator) -> Path:
    """Write `checkpoint-<global_step>` into the output folder (main process) and return its path.

    `run` holds the run-defining values a resume must match, `recipe_record` the other flags (a resume logs changes).
    """
    plan = d.plan
    saved = {
        "global_step": state.global_step,
        "history": state.history,
        "optimizers": {},
        "lr_schedulers": {},
        "opt_phases": sorted(state.opts),
        "plan": {
            "method": plan.method,
            "boundaries": plan.boundaries,
            "steps_per_phase": plan.steps_per_phase,
            "phases": plan.phases,
        },
        "run": run,
        "recipe": recipe_record,
    }
    files, opt_tensors = _weights(d, state), {}
    for j, opt in state.opts.items():
        for role, (optimizer, schedule) in opt.roles().items():
            key = f"{role}_{j}"
            tensors, meta = d.optimizer_state(optimizer, j, role, key)
            opt_tensors.update(tensors)
            saved["optimizers"][key] = meta
            saved["lr_schedulers"][key] = schedule.state_dict()
    files["optimizers"] = opt_tensors
    files["rng"], saved["rng"] = ckpt.rng_state({"noise": generator})
    path = state.output_dir / f"checkpoint-{state.global_step}"
    if d.accelerator.is_main_process:
        path = ckpt.save_checkpoint(state.output_dir, state.global_step, files, saved)
        ckpt.prune_checkpoints(state.output_dir, d.settings.checkpoints_total_limit)
    d.accelerator.wait_for_everyone()
    state.last_ckpt = path
    return path
