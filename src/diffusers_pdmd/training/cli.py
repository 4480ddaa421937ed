"""The example scripts' flags: the parser, and the checks that run on them before any model loads.

Torch-free at import, so that `--help` answers at once; [`settings.resolve`] turns the checked flags into the plain
values the run uses.
"""

from __future__ import annotations

import argparse
import logging

from .options import DMD_WEIGHTINGS, FAKE_WEIGHTINGS, METHODS, T_SAMPLINGS


logger = logging.getLogger("diffusers_pdmd.train")

PAPER_DEFAULTS = {"lora_rank": 64, "lora_alpha": 8, "learning_rate": 5e-5, "fake_full_learning_rate": 4e-7}


def _phase_arg(value: str):
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--train_phase must be 'all' or a phase index, got {value!r}") from None


def build_parser(description: str, video: bool = False) -> argparse.ArgumentParser:
    """The flags of the example scripts; `video=True` adds `--num_frames`, `--height`, `--width`, `--image`."""
    p = argparse.ArgumentParser(description=description)
    a = p.add_argument
    a("--pretrained_model_name_or_path", required=True, help="Base (teacher) pipeline: Hub id or local folder.")
    a("--revision", default=None, help="Revision of the base model on the Hub.")
    a(
        "--base_model_id",
        default=None,
        help="Hub repo id of the base, recorded in phased_dmd_config.json when training from a local folder that is "
        "not a Hub cache snapshot (those are recognised), so that the experts load on other machines.",
    )
    a("--method", default="phased_dmd", choices=METHODS, help="phased_dmd, or a baseline: dmd (1 step), sgts.")
    a(
        "--phase_boundaries",
        type=float,
        nargs="*",
        default=None,
        help="Sigmas where phases meet (decreasing, in (0, 1)). Default: the teacher's MoE boundary, else 0.875.",
    )
    a(
        "--steps_per_phase",
        type=int,
        nargs="+",
        default=[2, 2],
        help="Sampling steps of each phase; `sgts` uses their sum as its step count, `dmd` always 1.",
    )
    a("--train_phase", type=_phase_arg, default="all", help="A phase index, or 'all'.")
    a(
        "--phase_order",
        default="sequential",
        choices=["sequential", "alternate"],
        help="Train phases one after another (paper) or alternate between them every step.",
    )
    a("--prompts", required=True, help="A text file (one prompt a line), or a datasets name / path.")
    a("--prompt_column", default="prompt", help="Column of the prompts in a dataset.")
    a("--negative_prompt", default="", help="Negative prompt of the teacher's classifier-free guidance.")
    if video:
        a("--height", type=int, default=480)
        a("--width", type=int, default=832)
        a("--num_frames", type=int, default=81)
        a(
            "--image",
            default=None,
            help="TI2V-5B (optional) / I2V-A14B (required): an image file used as the first frame of every sample.",
        )
    else:
        a("--resolution", type=int, default=1024, help="Square image size.")
    a(
        "--resolutions",
        nargs="+",
        default=None,
        help="Multi-resolution training, one bucket per batch: "
        + ("FxHxW entries (e.g. 81x720x1280 81x1280x720)" if video else "HxW entries (e.g. 1328x1328 928x1664)")
        + "; replaces "
        + ("--num_frames/--height/--width." if video else "--resolution."),
    )
    a("--train_batch_size", type=int, default=1)
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--max_train_steps", type=int, default=1000, help="Generator updates per phase.")
    a("--learning_rate", type=float, default=PAPER_DEFAULTS["learning_rate"], help="Generator (expert) LR.")
    a(
        "--fake_learning_rate",
        type=float,
        default=None,
        help="Fake score LR. Default: 4e-7 with --fake_full_finetune (paper), else --learning_rate.",
    )
    a("--fake_updates_per_step", type=int, default=5, help="Fake-score updates per generator update (TTUR).")
    a("--guidance_scale", type=float, default=4.0, help="CFG scale of the teacher (real score).")
    a("--guidance_scale_2", type=float, default=None, help="CFG scale of the low-noise teacher (Wan2.2 A14B).")
    a("--lora_rank", type=int, default=PAPER_DEFAULTS["lora_rank"])
    a("--lora_alpha", type=float, default=PAPER_DEFAULTS["lora_alpha"])
    a("--fake_lora_rank", type=int, default=None, help="Rank of the fake-score LoRA (default: --lora_rank).")
    a("--fake_full_finetune", action="store_true", help="Full-parameter fake score (paper); needs much memory.")
    a("--dmd_weighting", default="normalized", choices=DMD_WEIGHTINGS)
    a(
        "--fake_weighting",
        default="paper",
        choices=FAKE_WEIGHTINGS,
        help="Fake-score loss weight: paper = Eq. 13, min(1, 10 sigma_{t|s}^2) on ||F - v*||^2; inverse_variance = "
        "min(1/sigma_{t|s}^2, 10) (the earlier default); none.",
    )
    a(
        "--timestep_sampling",
        default="shifted",
        choices=T_SAMPLINGS,
        help="How t is drawn in (s, 1]: shifted = uniform on the teacher's own shifted time scale (Wan's flow shift, "
        "Qwen-Image's resolution-dependent shift; paper); uniform = uniform sigma, no shift (the earlier default); "
        "logit_normal = SD3's logit-normal, shifted.",
    )
    a("--logit_mean", type=float, default=0.0, help="Mean of `--timestep_sampling logit_normal`.")
    a("--logit_std", type=float, default=1.0, help="Std of `--timestep_sampling logit_normal`.")
    a("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    a("--gradient_checkpointing", action="store_true")
    a(
        "--context_parallel_degree",
        type=int,
        default=1,
        help="Processes that share each sample, splitting its tokens (diffusers' Ulysses attention); must divide the "
        "number of processes and the attention heads. The others replicate data-parallel.",
    )
    a("--cache_text_embeddings", action="store_true", help="Encode prompts once, then free the text encoder.")
    a("--max_sequence_length", type=int, default=512)
    a("--seed", type=int, default=0)
    a("--output_dir", default="phased-dmd-experts")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'.")
    a(
        "--overwrite_output_dir",
        action="store_true",
        help="Start afresh in a non-empty --output_dir: its checkpoints and experts are deleted first.",
    )
    a("--validation_prompts", nargs="*", default=None)
    a("--validation_steps", type=int, default=200)
    a("--report_to", default="none", help="Tracker for accelerate (tensorboard, wandb, ...), or 'none'.")
    a("--logging_dir", default="logs")
    a("--push_to_hub", action="store_true")
    a("--hub_model_id", default=None)
    a("--hub_token", default=None, help="Token for the push; prefer `hf auth login`. Never printed.")
    a("--max_grad_norm", type=float, default=1.0)
    a("--adam_beta1", type=float, default=0.0, help="AdamW beta1 of both networks (paper: 0).")
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--lr_scheduler", default="constant")
    a("--lr_warmup_steps", type=int, default=0)
    # -- speed and memory (docs/training.md, "Speed and memory") ------------------------------------------------
    a(
        "--upcast_lora_inputs",
        action="store_true",
        help="peft's default: cast every adapted layer's input to the fp32 LoRA weights. Off: under mixed precision "
        "LoRA computes in bf16/fp16 from fp32 master weights (same values under autocast, faster).",
    )
    a(
        "--sequential_cfg",
        action="store_true",
        help="Run the teacher's conditional and unconditional passes one after another. Default: one batch of 2 "
        "where the two prompt embeddings have the same length (Wan2.2), else one after another (Qwen-Image: no "
        "padding, so attention needs no mask).",
    )
    a(
        "--compile",
        action="store_true",
        help="torch.compile the repeated transformer blocks (diffusers' compile_repeated_blocks). Default: on for a "
        "one-process run on a CUDA GPU (the first update then takes a minute or two longer), off otherwise.",
    )
    a("--no_compile", action="store_true", help="Never compile (see --compile).")
    a(
        "--attention_backend",
        default=None,
        help="diffusers attention backend of the transformers, e.g. flash, _native_cudnn, _native_flash, sage.",
    )
    a(
        "--fake_reuse_samples",
        type=int,
        default=1,
        help="Fake-score updates that share one back-simulated batch (fresh t and noise each). 1: a fresh batch "
        "for every update (the paper). Above 1 changes the algorithm (docs/training.md).",
    )
    a(
        "--base_fp8",
        action="store_true",
        help="Store the frozen base transformers in float8 (e4m3), computed in bf16 (diffusers layerwise casting); "
        "LoRA weights stay as they are. Needs --mixed_precision bf16.",
    )
    a(
        "--offload_idle_transformers",
        action="store_true",
        help="Keep on the GPU only the transformers the current phase uses, the others in CPU memory (Wan2.2 "
        "A14B phase 0 never uses transformer_2). Needs --phase_order sequential.",
    )
    a(
        "--offload_activations",
        action="store_true",
        help="Keep the tensors saved for backward (with --gradient_checkpointing: each block's input) in pinned CPU "
        "memory until backward needs them (torch.autograd.graph.save_on_cpu). Less GPU memory, more transfers.",
    )
    return p


def check_speed_args(args) -> None:
    """Raise `ValueError` for a bad speed / memory flag (before any model loads)."""
    if args.compile and args.no_compile:
        raise ValueError("`--compile` and `--no_compile` contradict each other: pass one of them, or neither (auto).")
    if args.compile and args.base_fp8 and args.gradient_checkpointing:
        # measured on an H100 (Wan2.2 A14B): the layerwise-casting hooks swap each weight between fp8 and bf16
        # around its forward, and checkpoint's recompute of a compiled block then sees fp8 where bf16 was saved
        raise ValueError(
            "`--compile` does not work with `--base_fp8` and `--gradient_checkpointing` (the recompute in backward "
            "fails); drop `--compile` (with `--base_fp8` the default is not to compile)."
        )
    if args.fake_reuse_samples < 1:
        raise ValueError(f"`--fake_reuse_samples` must be >= 1, got {args.fake_reuse_samples}.")
    if args.base_fp8 and args.mixed_precision != "bf16":
        raise ValueError(
            f"`--base_fp8` computes in bf16: it needs `--mixed_precision bf16`, got {args.mixed_precision}."
        )
    if args.base_fp8 and args.fake_full_finetune:
        raise ValueError("`--base_fp8` stores the frozen base in fp8; `--fake_full_finetune` trains a copy of it.")
    if args.offload_idle_transformers and args.phase_order != "sequential":
        raise ValueError(
            "`--offload_idle_transformers` needs `--phase_order sequential` (alternate uses every model)."
        )
    if args.attention_backend is not None:
        from diffusers.models.attention_dispatch import AttentionBackendName

        allowed = [b.value for b in AttentionBackendName]
        if args.attention_backend not in allowed:
            raise ValueError(f"`--attention_backend` must be one of {allowed}, got {args.attention_backend!r}.")


def check_args(args) -> None:
    """Raise `ValueError` naming the bad flag and the allowed values."""
    positive = [
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "lora_rank",
        "checkpointing_steps",
        "validation_steps",
        "max_sequence_length",
    ]
    for name in positive:
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`--{name}` must be a positive integer, got {value!r}.")
    if args.fake_updates_per_step < 0:
        raise ValueError(f"`--fake_updates_per_step` must be >= 0, got {args.fake_updates_per_step}.")
    if any(n < 1 for n in args.steps_per_phase):
        raise ValueError(f"`--steps_per_phase` must be positive integers, got {args.steps_per_phase}.")
    if args.learning_rate <= 0 or (args.fake_learning_rate is not None and args.fake_learning_rate <= 0):
        raise ValueError("`--learning_rate` and `--fake_learning_rate` must be > 0.")
    if args.fake_full_finetune and args.phase_order == "alternate":
        raise ValueError("`--fake_full_finetune` supports `--phase_order sequential` only (one full copy at a time).")
    if args.push_to_hub and args.hub_token is not None:
        logger.warning("`--hub_token` is visible to other users of this machine; prefer `hf auth login`.")
    if not args.logit_std > 0:
        raise ValueError(f"`--logit_std` must be > 0, got {args.logit_std}.")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be in [0, 1), got {getattr(args, name)}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"`--checkpoints_total_limit` must be >= 1, got {args.checkpoints_total_limit}.")
    if args.method != "phased_dmd" and args.phase_boundaries:
        raise ValueError(
            f"`--phase_boundaries` is for `--method phased_dmd`; `--method {args.method}` trains one generator over "
            f"the whole interval. Drop `--phase_boundaries {' '.join(map(str, args.phase_boundaries))}`."
        )
    if args.phase_boundaries is not None:
        b = args.phase_boundaries
        if any(not 0.0 < x < 1.0 for x in b) or any(x <= y for x, y in zip(b, b[1:])):
            raise ValueError(f"`--phase_boundaries` must be strictly decreasing values inside (0, 1), got {b}.")
        if args.method == "phased_dmd" and len(args.steps_per_phase) != len(b) + 1:
            raise ValueError(
                f"`--steps_per_phase` needs {len(b) + 1} values for the {len(b)} `--phase_boundaries` {b}, "
                f"got {args.steps_per_phase}."
            )
    sizes(args)  # parses --resolutions


def sizes(args) -> list[tuple[int, int, int | None]]:
    """The training sizes `(height, width, num_frames)`: the `--resolutions` buckets, else the one size flag(s)."""
    video = hasattr(args, "num_frames")
    if not getattr(args, "resolutions", None):
        return [(args.height, args.width, args.num_frames)] if video else [(args.resolution, args.resolution, None)]
    out = []
    for entry in args.resolutions:
        parts = entry.lower().split("x")
        if len(parts) != (3 if video else 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
            form = "FxHxW (frames x height x width, e.g. 81x480x832)" if video else "HxW (e.g. 928x1664)"
            raise ValueError(f"`--resolutions` entries must be {form}, got {entry!r}.")
        n = [int(p) for p in parts]
        out.append((n[1], n[2], n[0]) if video else (n[0], n[1], None))
    return out


def check_sizes(settings, family) -> None:
    """`family.check_size` on every training size of the run's [`Settings`], its message naming the flag instead of
    the argument."""
    video = settings.video
    for h, w, f in settings.sizes:
        try:
            family.check_size(h, w, f)
        except ValueError as e:
            if settings.resolutions:
                entry = f"{f}x{h}x{w}" if video else f"{h}x{w}"
                raise ValueError(f"`--resolutions` entry {entry}: {e}") from None
            msg = str(e)
            names = ("height", "width", "num_frames") if video else ("height", "width")
            for name in names:
                msg = msg.replace(f"`{name}`", f"`--{name}`" if video else "`--resolution`")
            raise ValueError(msg) from None
