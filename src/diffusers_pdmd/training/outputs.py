"""What a finished run leaves behind: the experts-only repo (config, scheduler, one LoRA per phase), validation
grids, the training summary and history, the model card, and the push to the Hub."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .. import export, hub
from . import recipe as rc
from .data import to_device
from .phases import TrainState
from .plan import Plan
from .roles import Distiller


logger = logging.getLogger("diffusers_pdmd.train")


def save_experts(d: Distiller, output_dir: Path, history) -> None:
    """Write the experts-only repo: config, scheduler, one LoRA file per phase (and `comfyui/`, the same in ComfyUI's
    LoRA layout)."""
    args = d.settings
    experts = []
    for j in range(d.plan.num_phases):
        hub.save_lora_expert(d.models[d.expert_base[j]], f"phase_{j}", output_dir / f"phase_{j}")
        experts.append({"phase": j, "base_transformer": d.expert_base[j], "type": "lora", "path": f"phase_{j}"})
    base, revision = hub.base_model_reference(args.pretrained_model_name_or_path, args.revision, args.base_model_id)
    config = hub.ExpertsConfig(
        family=d.family.name,
        base_model=base,
        base_revision=revision,
        phase_boundaries=d.plan.boundaries,
        steps_per_phase=d.plan.steps_per_phase,
        method=d.plan.method,
        experts=experts,
    )
    config.save(output_dir)
    d.scheduler().save_pretrained(output_dir / "scheduler")
    export.write_comfyui(output_dir)  # the same experts in ComfyUI's LoRA layout, `comfyui/`


@torch.no_grad()
def validate(d: Distiller, prompts: list[str], cached, encode, path: Path, seeds=None):
    """Sample each validation prompt with the current experts (one row per seed: `--validation_seeds`), save a PNG
    grid and log the diversity across seeds (`diffusers_pdmd.evaluate.validation_diversity`)."""
    from PIL import Image

    seeds = range(d.settings.validation_seeds) if seeds is None else seeds
    family, (h, w, f) = d.family, d.size()
    cond_all = cached if cached is not None else encode(prompts)
    images = []
    scheduler = d.scheduler()
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        n = len(prompts)
        cond = to_device(dict(cond_all, **family.size_cond(h, w, f, batch_size=n)), d.device)
        if d.settings.image:  # the first frame of image-to-video, as in training
            from diffusers.utils import load_image

            cond.update(family.encode_image(d.components, load_image(d.settings.image), n, h, w, f, d.device))
        x = family.prepare_latents(d.components, n, h, w, f, g, "cpu", torch.float32).to(d.device)
        scheduler.set_timesteps(mu=family.mu(d.components, x) if scheduler.config.use_dynamic_shifting else None)
        for t in scheduler.timesteps:
            sigma = torch.full((n,), float(t) / scheduler.config.num_train_timesteps, device=d.device)
            v = d.expert(scheduler.phase_index(t), cond)(family.apply_condition(x, cond), sigma)
            x = scheduler.step(v, t, x, generator=g).prev_sample
        out = family.decode(d.components, family.apply_condition(x, cond), h, w, f, "pil")
        images += [frames[0] if isinstance(frames, list) else frames for frames in out]
    cols = len(prompts)
    grid = Image.new("RGB", (cols * images[0].width, len(seeds) * images[0].height))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * im.width, (i // cols) * im.height))
    if d.accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        logger.info("Validation samples (one row per seed %s, one column per prompt): %s", list(seeds), path)
    if len(seeds) > 1:
        from ..evaluate import validation_diversity

        diversity = validation_diversity([images[p::cols] for p in range(cols)])
        d.accelerator.log({f"val/{k}": v for k, v in diversity.items()})
        logger.info("validation over %d seeds: val/pixel_diversity %.4g", len(seeds), diversity["pixel_diversity"])
    return path


def summary(history: list[dict], plan: Plan) -> dict:
    """The figures of `training_summary.json`: the plan, and each phase's losses (means of its last 10 updates)."""
    out = {
        "method": plan.method,
        "phase_boundaries": plan.boundaries,
        "steps_per_phase": plan.steps_per_phase,
        "generator_updates": len(history),
    }
    for phase in sorted({int(h["phase"]) for h in history}):
        rows = [h for h in history if int(h["phase"]) == phase][-10:]
        # Means over the phase's last (up to) 10 generator updates, named with their count.
        out[f"phase_{phase}_dmd_loss_mean_last_{len(rows)}"] = sum(r["dmd_loss"] for r in rows) / len(rows)
        if any("fake_loss" in r for r in rows):
            vals = [r["fake_loss"] for r in rows if "fake_loss" in r]
            out[f"phase_{phase}_fake_loss_mean_last_{len(vals)}"] = sum(vals) / len(vals)
    return out


RECIPE_RECORD = (
    "recipe",
    "diversity_weight",
    "diversity_teacher_steps",
    "diversity_anchor_step",
    "ida_decay",
    "random_exit",
    "t_margin",
    "t_lowest",
    "t_highest",
    "shift",
    "negative_prompt",
    "guidance_scale",
    "guidance_scale_2",
    "fake_real_weight",
)


def recipe_record(d: Distiller) -> dict:
    """The resolved recipe (`--recipe` and every setting of its parts), as the summary and the model card give it."""
    out = {name: getattr(d.recipe, name) for name in RECIPE_RECORD}
    out.update(phase_order=d.plan.order, steps_per_phase=d.plan.steps_per_phase)
    r, real = d.recipe, d.settings.real_data
    real_sigmas = (r.fake_real_sigmas or rc.real_sigmas_lightx2v(d.sigmas_by_phase)) if real else None
    out.update(real_data=real, fake_real_sigmas=[round(float(x), 6) for x in real_sigmas] if real else None)
    return out


def write_outputs(d, state: TrainState, text) -> None:
    """The experts-only repo, the validation grid, the summary, history and model card, and the push (if asked)."""
    s, accelerator, output_dir = d.settings, d.accelerator, state.output_dir
    with d.full_params():
        if accelerator.is_main_process:
            save_experts(d, output_dir, state.history)
    val_prompts = s.validation_prompts
    grid = (
        validate(d, val_prompts, text.validation, text.encode, output_dir / "validation_grid.png")
        if val_prompts
        else None
    )
    if not accelerator.is_main_process:
        return
    figures, recipe = summary(state.history, d.plan), recipe_record(d)
    (output_dir / "training_summary.json").write_text(json.dumps({**figures, "recipe": recipe}, indent=2))
    # every generator update's losses and wall time (`step_seconds`: its fake updates included, synchronised)
    (output_dir / s.logging_dir).mkdir(parents=True, exist_ok=True)
    (output_dir / s.logging_dir / "history.json").write_text(json.dumps(state.history, indent=1))
    config = hub.ExpertsConfig.load(output_dir)
    hub.write_model_card(
        output_dir,
        config,
        repo_id=s.hub_model_id,  # None: the folder's path, replaced by the real repo id when pushing
        prompt=(val_prompts or text.prompts)[0],
        sample_size=d.size(),
        training_figures=figures,
        validation_images=[grid.name] if grid else None,
        extra_text="## Training recipe\n\nResolved from `--recipe "
        + recipe["recipe"]
        + "` and the flags given:\n\n"
        + "\n".join(f"- `{k}`: `{json.dumps(v, ensure_ascii=False)}`" for k, v in recipe.items()),
    )
    if s.push_to_hub:
        url = hub.push_experts_to_hub(
            output_dir,
            s.hub_model_id or output_dir.name,
            token=s.hub_token,
            ignore_patterns=["checkpoint-*", ".checkpoint-*", "logs/*", "real_data_cache/*"],
        )
        logger.info("Pushed the experts to %s", url)
