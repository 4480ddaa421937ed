"""A run's folder and identity, checked before any model loads.

[`train`](distill.py) calls these first: which family the base is (from its config files, no weights), whether a
checkpoint belongs to the run the flags describe, whether `--output_dir` holds another run, and, when the run ends
early, the command that resumes it and the clean-up of a folder it never wrote to.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path


logger = logging.getLogger("diffusers_pdmd.train")


def probe_family(args):
    """The [`Family`] of `--pretrained_model_name_or_path` read from its config files (no weights), or `None`.

    Lets flag checks that need the family (sizes, the default boundary) run before minutes of loading; when the
    files cannot be read (no network, an unknown layout), the checks run after loading instead.
    """
    from types import SimpleNamespace

    from ..families import get_family

    base = args.pretrained_model_name_or_path

    def read(name):
        if os.path.isdir(base):
            path = Path(base) / name
        else:
            from huggingface_hub import hf_hub_download

            try:
                path = Path(hf_hub_download(base, name, revision=args.revision))
            except Exception:
                return None
        return json.loads(path.read_text()) if path.is_file() else None

    try:
        index = read("model_index.json") or {}
        cls = index.get("_class_name", "")
        if cls.startswith("QwenImage"):
            name = "qwen-image"
        elif cls.startswith("Wan") and index.get("expand_timesteps"):
            name = "wan2.2-ti2v-5b"
        elif cls in ("WanPipeline", "WanImageToVideoPipeline") and (
            index.get("boundary_ratio") is not None or (index.get("transformer_2") or [None])[0]
        ):
            name = "wan2.2-t2v-a14b" if cls == "WanPipeline" else "wan2.2-i2v-a14b"
        else:  # Wan2.1 I2V (one transformer and a CLIP image encoder) and other pipelines this code does not train
            return None
        vae = {"scale_factor_spatial": 8, "scale_factor_temporal": 4, **(read("vae/config.json") or {})}
        transformer = {"patch_size": (1, 2, 2), **(read("transformer/config.json") or {})}
        components = {
            "vae": SimpleNamespace(config=SimpleNamespace(**vae), **vae),
            "transformer": SimpleNamespace(config=SimpleNamespace(**transformer)),
            "family": name,
            "boundary_ratio": index.get("boundary_ratio"),
        }
        return get_family(components)
    except Exception:
        return None


def check_image(args) -> None:
    """`--image` (the first frame of image-to-video runs) names a readable image file or an http(s) URL.

    Checked before any model loads: diffusers' `load_image` would fail only after it, with "Incorrect path or URL"
    and no word of the flag.
    """
    image = getattr(args, "image", None)
    if image is None or str(image).startswith(("http://", "https://")):
        return
    if not os.path.isfile(image):
        raise ValueError(f"`--image` {image!r} is not a file (the first frame of every sample: a PNG, JPEG, ...).")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as im:
            im.verify()
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"`--image` {image!r} is not an image PIL can read ({err}).") from err


# Flags that define a run: a checkpoint resumes only under the same values. Others (learning rates and the like) may
# change on resume; the changes are logged.
RUN_FLAGS = (
    "method",
    "phase_boundaries",
    "steps_per_phase",
    "max_train_steps",
    "train_phase",
    "phase_order",
    "lora_rank",
    "lora_alpha",
    "fake_lora_rank",
    "fake_full_finetune",
    "family",
    "pretrained_model_name_or_path",
    "revision",
    "shift",
    "real_data",
)
RECIPE_FLAGS = (
    "learning_rate",
    "fake_learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "max_grad_norm",
    "fake_updates_per_step",
    "fake_weighting",
    "timestep_sampling",
    "dmd_weighting",
    "guidance_scale",
    "guidance_scale_2",
    "train_batch_size",
    "gradient_accumulation_steps",
    "resolution",
    "height",
    "width",
    "num_frames",
    "resolutions",
    "recipe",
    "negative_prompt",
    "diversity_weight",
    "diversity_teacher_steps",
    "diversity_anchor_step",
    "ida_decay",
    "random_exit",
    "t_margin",
    "t_lowest",
    "t_highest",
    "real_image_column",
    "real_caption_column",
    "fake_real_weight",
    "fake_real_sigmas",
)


def run_config(args, plan, family_name: str) -> dict:
    """The run-defining values ([`RUN_FLAGS`]) as a checkpoint stores them."""
    base = args.pretrained_model_name_or_path
    return {
        "method": plan.method,
        "phase_boundaries": plan.boundaries,
        "steps_per_phase": plan.steps_per_phase,
        "max_train_steps": plan.max_steps,
        "train_phase": args.train_phase,
        "phase_order": plan.order,
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "fake_lora_rank": args.fake_lora_rank or args.lora_rank,
        "fake_full_finetune": args.fake_full_finetune,
        "family": family_name,
        "pretrained_model_name_or_path": str(Path(base).resolve()) if os.path.isdir(base) else base,
        "revision": args.revision,
        "shift": getattr(args, "shift", None),
        "real_data": getattr(args, "real_data", None),
    }


def recipe_config(flags: dict) -> dict:
    """The other flags ([`RECIPE_FLAGS`]) as given, as a checkpoint records them (a resume logs their changes)."""
    return {k: flags[k] for k in RECIPE_FLAGS if k in flags}


def check_resume(path: Path, state: dict, run: dict, recipe: dict) -> None:
    """Refuse a checkpoint of another run, naming every differing run-defining flag; log changed recipe flags."""
    saved = state.get("run")
    if saved is None:  # checkpoints written before the run was stored hold the plan only
        plan = state.get("plan", {})
        saved = {"method": plan.get("method"), "phase_boundaries": plan.get("boundaries")}
        saved["steps_per_phase"] = plan.get("steps_per_phase")
        saved = {k: v for k, v in saved.items() if v is not None}
    differ = [k for k in RUN_FLAGS if k in saved and json.loads(json.dumps(run[k])) != saved[k]]
    if differ:
        lines = [
            f"{'family (of --pretrained_model_name_or_path)' if k == 'family' else '--' + k}: "
            f"{saved[k]!r} in the checkpoint, {run[k]!r} now"
            for k in differ
        ]
        raise ValueError(
            f"`--resume_from_checkpoint` {path} belongs to a run with other run-defining flags:\n  "
            + "\n  ".join(lines)
            + "\nResume with the checkpoint's values, or start a new run in another `--output_dir` (or pass "
            "`--overwrite_output_dir` without `--resume_from_checkpoint` to replace it)."
        )
    for k, v in (state.get("recipe") or {}).items():
        if k in recipe and json.loads(json.dumps(recipe[k])) != v:
            logger.info("Resuming with --%s %r (the checkpoint had %r).", k, recipe[k], v)


# What a run writes into --output_dir (the rest of a folder is left alone).
_RUN_OUTPUTS = (
    "checkpoint-*",
    ".checkpoint-*",
    "training_summary.json",
    "validation",
    "validation_grid.png",
    "real_data_cache",
)
_EXPERT_OUTPUTS = ("phase_*", "comfyui", "phased_dmd_config.json", "scheduler", "README.md")


def check_output_dir(args, output_dir: Path) -> list[Path]:
    """Refuse a fresh run into a non-empty `--output_dir`; return what `--overwrite_output_dir` will delete.

    A `--train_phase k` run may start in a folder that holds only the experts of other phases (the documented way
    to train phases one at a time); checkpoints of another run there are refused as well.
    """
    if args.resume_from_checkpoint is not None or not output_dir.is_dir() or not any(output_dir.iterdir()):
        return []
    keep_experts = args.train_phase != "all"
    patterns = _RUN_OUTPUTS + (() if keep_experts else _EXPERT_OUTPUTS) + (args.logging_dir,)
    ours = sorted({p for pattern in patterns for p in output_dir.glob(pattern)})
    if keep_experts and not any(p.name.startswith(("checkpoint-", ".checkpoint-")) for p in ours):
        return []
    if args.overwrite_output_dir:
        return ours
    found = ", ".join(sorted(p.name for p in output_dir.iterdir())[:6])
    what = "checkpoints of another run" if keep_experts else "files"
    raise ValueError(
        f"`--output_dir` {output_dir} already holds {what} ({found}, ...). Resume that run with "
        "`--resume_from_checkpoint latest`, choose another `--output_dir`, or pass `--overwrite_output_dir` to "
        "delete its checkpoints and experts first."
    )


def finished(output_dir: Path) -> bool:
    """The run in `output_dir` wrote its experts and its summary (its last step)."""
    from .. import hub

    return (output_dir / hub.CONFIG_NAME).is_file() and (output_dir / "training_summary.json").is_file()


def resume_command() -> str:
    """This process's command line with `--resume_from_checkpoint latest` in place of any resume flag."""
    argv = list(sys.argv)
    for i, a in enumerate(argv):
        if a == "--resume_from_checkpoint" and i + 1 < len(argv):
            del argv[i : i + 2]
            break
        if a.startswith("--resume_from_checkpoint="):
            del argv[i]
            break
    launcher = "accelerate launch" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "python"
    return f"{launcher} {shlex.join(argv)} --resume_from_checkpoint latest"


def remove_empty_dirs(folder: Path) -> None:
    """Remove `folder` and its sub-folders where they hold no file (a run that failed before writing anything)."""
    if not folder.is_dir():
        return
    try:  # another process of the run may be doing the same
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            if not any(sub.iterdir()):
                sub.rmdir()
        if not any(folder.iterdir()):
            folder.rmdir()
    except OSError:
        pass
