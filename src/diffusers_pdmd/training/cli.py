"""The example scripts' flags: the parser, and the checks that run on them before any model loads.

Torch-free at import, so that `--help` answers at once; [`settings.resolve`] turns the checked flags into the plain
values the run uses.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from .memory import add_memory_args
from .options import DMD_WEIGHTINGS, FAKE_WEIGHTINGS, METHODS, T_SAMPLINGS
from .recipe_settings import RECIPE_ONLY_FLAGS, add_recipe_args, explicit_flags, recipe_defaults, resolve_recipe_args


logger = logging.getLogger("diffusers_pdmd.train")

PAPER_DEFAULTS = {"lora_rank": 64, "lora_alpha": 8, "learning_rate": 5e-5, "fake_full_learning_rate": 4e-7}


def _phase_arg(value: str):
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--train_phase must be 'all' or a phase index, got {value!r}") from None


EPILOG = (
    "Every flag, its default and what it costs: docs/training.md (also examples/phased_dmd/README.md). A bad flag "
    "ends the run with one line naming it, before any model loads."
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (`None`, an unset switch, a required flag)."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


# A negative number with an exponent ("-1e-4") is a value, not an option: argparse's own pattern knows only "-1" and
# "-0.5", and would answer "--learning_rate -1e-4" with "expected one argument" instead of the check naming the flag.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def build_parser(description: str, video: bool = False) -> argparse.ArgumentParser:
    """The flags of the example scripts, in groups; `video=True` (the Wan2.2 script) adds the video sizes, `--image`
    and `--guidance_scale_2`.

    A new group of flags is one `add_<group>_args(parser)` line here (a function beside these), and its values a
    field of [`settings.Settings`] or [`settings.Recipe`].
    """
    p = _Parser(
        usage="%(prog)s --pretrained_model_name_or_path MODEL --prompts PROMPTS [options]",
        description=description,
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    p._negative_number_matcher = _NEGATIVE_NUMBER
    p.recipe_family = "wan2.2-t2v-a14b" if video else "qwen-image"  # the presets are alike within Wan2.2
    add_model_args(p)
    add_phase_args(p)
    add_data_args(p, video)
    add_teacher_args(p, video)
    add_optimizer_args(p)
    add_loss_args(p)
    add_adapter_args(p)
    add_speed_args(p)
    add_output_args(p)
    add_recipe_args(p)  # issue 21: --recipe and its parts (diversity loss, IDA, ...)
    add_memory_args(p)  # issue 22: --memory auto|off, --memory_budget_gib
    return p


class _Parser(argparse.ArgumentParser):
    """Parses the flags, then resolves `--recipe` into them: the preset's values fill every recipe setting (the
    diversity loss, IDA, ..., and `--phase_order`, `--negative_prompt`, `--guidance_scale(_2)`, `--steps_per_phase`)
    whose flag is not on the command line; flags given explicitly always win (`recipe.resolve_recipe_args`)."""

    recipe_family = "qwen-image"
    _finding_explicit = False

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        if self._finding_explicit or not hasattr(ns, "recipe"):
            return ns, rest
        self._finding_explicit = True
        try:
            explicit = explicit_flags(self, args)
        finally:
            self._finding_explicit = False
        resolved = resolve_recipe_args(ns, explicit, self.recipe_family)
        preset = recipe_defaults(ns.recipe, self.recipe_family)
        for name, value in vars(resolved).items():
            # the trainer's own flags keep their defaults unless the preset sets them (no --guidance_scale_2 on the
            # one-transformer script)
            own = name not in RECIPE_ONLY_FLAGS and name != "recipe"
            if name in explicit or (own and name not in preset) or not (hasattr(ns, name) or not own):
                continue
            setattr(ns, name, value)
        return ns, rest


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("base model (teacher)")
    g.add_argument(
        "--pretrained_model_name_or_path", required=True, help="Base (teacher) pipeline: Hub id or local folder."
    )
    g.add_argument("--revision", default=None, help="Revision of the base model on the Hub.")
    g.add_argument(
        "--base_model_id",
        default=None,
        help="Hub repo id of the base, recorded in phased_dmd_config.json when training from a local folder that is "
        "not a Hub cache snapshot (those are recognised), so that the experts load on other machines.",
    )


def add_phase_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method and phases")
    g.add_argument(
        "--method", default="phased_dmd", choices=METHODS, help="phased_dmd, or a baseline: dmd (1 step), sgts."
    )
    g.add_argument(
        "--phase_boundaries",
        type=float,
        nargs="*",
        default=None,
        help="Sigmas where phases meet (decreasing, in (0, 1)). Default: the teacher's MoE boundary, else 0.875.",
    )
    g.add_argument(
        "--steps_per_phase",
        type=int,
        nargs="+",
        default=[2, 2],
        help="Sampling steps of each phase; `sgts` uses their sum as its step count, `dmd` always 1.",
    )
    g.add_argument("--train_phase", type=_phase_arg, default="all", help="A phase index, or 'all'.")
    g.add_argument(
        "--phase_order",
        default="sequential",
        choices=["sequential", "alternate"],
        help="Train phases one after another (paper) or alternate between them every step.",
    )
    g.add_argument("--max_train_steps", type=int, default=1000, help="Generator updates per phase.")


def add_data_args(p: argparse.ArgumentParser, video: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--prompts", required=True, help="A text file (one prompt a line), or a datasets name / path.")
    g.add_argument("--prompt_column", default="prompt", help="Column of the prompts in a dataset.")
    if video:
        g.add_argument("--height", type=int, default=480, help="Height of the training videos, in pixels.")
        g.add_argument("--width", type=int, default=832, help="Width of the training videos, in pixels.")
        g.add_argument("--num_frames", type=int, default=81, help="Frames of the training videos.")
        g.add_argument(
            "--image",
            default=None,
            help="TI2V-5B (optional) / I2V-A14B (required): an image file used as the first frame of every sample.",
        )
    else:
        g.add_argument("--resolution", type=int, default=1024, help="Square image size, in pixels.")
    g.add_argument(
        "--resolutions",
        nargs="+",
        default=None,
        help="Multi-resolution training, one bucket per batch: "
        + ("FxHxW entries (e.g. 81x720x1280 81x1280x720)" if video else "HxW entries (e.g. 1328x1328 928x1664)")
        + "; replaces "
        + ("--num_frames/--height/--width." if video else "--resolution."),
    )
    g.add_argument("--max_sequence_length", type=int, default=512, help="Tokens of each prompt's text encoding.")
    g.add_argument(
        "--cache_text_embeddings", action="store_true", help="Encode prompts once, then free the text encoder."
    )


def add_teacher_args(p: argparse.ArgumentParser, video: bool) -> None:
    g = p.add_argument_group("teacher (real score)")
    g.add_argument("--guidance_scale", type=float, default=4.0, help="CFG scale of the teacher (real score).")
    if video:
        g.add_argument(
            "--guidance_scale_2",
            type=float,
            default=None,
            help="CFG scale of the low-noise teacher (Wan2.2 A14B's transformer_2). Default: --guidance_scale.",
        )
    g.add_argument("--negative_prompt", default="", help="Negative prompt of the teacher's classifier-free guidance.")


def add_optimizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimization")
    g.add_argument("--train_batch_size", type=int, default=1, help="Samples per process in each update.")
    g.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Batches whose gradients make one update."
    )
    g.add_argument(
        "--learning_rate", type=float, default=PAPER_DEFAULTS["learning_rate"], help="Generator (expert) LR."
    )
    g.add_argument(
        "--fake_learning_rate",
        type=float,
        default=None,
        help="Fake score LR. Default: 4e-7 with --fake_full_finetune (paper), else --learning_rate.",
    )
    g.add_argument(
        "--fake_updates_per_step", type=int, default=5, help="Fake-score updates per generator update (TTUR)."
    )
    g.add_argument("--adam_beta1", type=float, default=0.0, help="AdamW beta1 of both networks (paper: 0).")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2 of both networks.")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay of both networks.")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm; 0: no clipping.")
    g.add_argument(
        "--lr_scheduler",
        default="constant",
        help="LR schedule of both networks (diffusers' get_scheduler: constant, linear, cosine, ...).",
    )
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the LR schedule.")
    g.add_argument("--seed", type=int, default=0, help="Seed of the noise, prompts, t and adapter initialisation.")


def add_loss_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("losses")
    g.add_argument(
        "--dmd_weighting",
        default="normalized",
        choices=DMD_WEIGHTINGS,
        help="Weight of the DMD gradient: normalized = DMD2's per-sample normaliser in x_s space; paper = Eq. 11's "
        "w_{t|s} (docs/method.md).",
    )
    g.add_argument(
        "--fake_weighting",
        default="paper",
        choices=FAKE_WEIGHTINGS,
        help="Fake-score loss weight: paper = Eq. 13, min(1, 10 sigma_{t|s}^2) on ||F - v*||^2; inverse_variance = "
        "min(1/sigma_{t|s}^2, 10) (the earlier default); none.",
    )
    g.add_argument(
        "--timestep_sampling",
        default="shifted",
        choices=T_SAMPLINGS,
        help="How t is drawn in (s, 1]: shifted = uniform on the teacher's own shifted time scale (Wan's flow shift, "
        "Qwen-Image's resolution-dependent shift; paper); uniform = uniform sigma, no shift (the earlier default); "
        "logit_normal = SD3's logit-normal, shifted.",
    )
    g.add_argument("--logit_mean", type=float, default=0.0, help="Mean of `--timestep_sampling logit_normal`.")
    g.add_argument("--logit_std", type=float, default=1.0, help="Std of `--timestep_sampling logit_normal`.")


def add_adapter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapters")
    g.add_argument(
        "--lora_rank", type=int, default=PAPER_DEFAULTS["lora_rank"], help="Rank of each expert's LoRA (paper: 64)."
    )
    g.add_argument(
        "--lora_alpha",
        type=float,
        default=PAPER_DEFAULTS["lora_alpha"],
        help="LoRA alpha of the experts and fake scores (paper: 8); the LoRA's scale is alpha / rank.",
    )
    g.add_argument(
        "--fake_lora_rank", type=int, default=None, help="Rank of the fake-score LoRA (default: --lora_rank)."
    )
    g.add_argument(
        "--fake_full_finetune", action="store_true", help="Full-parameter fake score (paper); needs much memory."
    )


def add_speed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed and memory", "docs/training.md, 'Speed and memory', gives what each costs.")
    g.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Compute precision (accelerate's autocast; LoRA weights stay fp32). Default: accelerate's config.",
    )
    g.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute each transformer block in backward instead of keeping its activations (less memory).",
    )
    g.add_argument(
        "--uncheckpointed_blocks",
        type=int,
        default=None,
        help="With --gradient_checkpointing: the last N blocks of each transformer keep their activations instead of "
        "recomputing them in backward (faster, more memory). Default: as many as the memory plan fits in the memory "
        "left over (--memory auto), else 0.",
    )
    g.add_argument(
        "--context_parallel_degree",
        type=int,
        default=1,
        help="Processes that share each sample, splitting its tokens (diffusers' Ulysses attention); must divide the "
        "number of processes and the attention heads. The others replicate data-parallel.",
    )
    g.add_argument(
        "--upcast_lora_inputs",
        action="store_true",
        help="peft's default: cast every adapted layer's input to the fp32 LoRA weights. Off: under mixed precision "
        "LoRA computes in bf16/fp16 from fp32 master weights (same values under autocast, faster).",
    )
    g.add_argument(
        "--sequential_cfg",
        action="store_true",
        help="Run the teacher's conditional and unconditional passes one after another. Default: one batch of 2 "
        "where the two prompt embeddings have the same length (Wan2.2), else one after another (Qwen-Image: no "
        "padding, so attention needs no mask).",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the repeated transformer blocks (diffusers' compile_repeated_blocks). Default: on for a "
        "one-process run on a CUDA GPU (the first update then takes a minute or two longer), off otherwise.",
    )
    g.add_argument("--no_compile", action="store_true", help="Never compile (see --compile).")
    g.add_argument(
        "--attention_backend",
        default=None,
        help="diffusers attention backend of the transformers, e.g. flash, _native_cudnn, _native_flash, sage.",
    )
    g.add_argument(
        "--fake_reuse_samples",
        type=int,
        default=1,
        help="Fake-score updates that share one back-simulated batch (fresh t and noise each). 1: a fresh batch "
        "for every update (the paper). Above 1 changes the algorithm (docs/training.md).",
    )
    g.add_argument(
        "--base_fp8",
        action="store_true",
        help="Store the frozen base transformers in float8 (e4m3), computed in bf16 (diffusers layerwise casting); "
        "LoRA weights stay as they are. Needs --mixed_precision bf16.",
    )
    g.add_argument(
        "--offload_idle_transformers",
        action="store_true",
        help="Keep on the GPU only the transformers the current phase uses, the others in CPU memory (Wan2.2 "
        "A14B phase 0 never uses transformer_2). Needs --phase_order sequential.",
    )
    g.add_argument(
        "--offload_activations",
        action="store_true",
        help="Keep the tensors saved for backward (with --gradient_checkpointing: each block's input) in pinned CPU "
        "memory until backward needs them (torch.autograd.graph.save_on_cpu). Less GPU memory, more transfers.",
    )


def add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output, checkpoints and validation")
    g.add_argument("--output_dir", default="phased-dmd-experts", help="Where the experts and checkpoints go.")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Generator updates between checkpoints.")
    g.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Checkpoints kept (the newest). Default: all."
    )
    g.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'.")
    g.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start afresh in a non-empty --output_dir: its checkpoints and experts are deleted first.",
    )
    g.add_argument(
        "--validation_prompts", nargs="*", default=None, help="Prompts of the validation grids (none: no grids)."
    )
    g.add_argument("--validation_steps", type=int, default=200, help="Generator updates between validation grids.")
    g.add_argument(
        "--validation_seeds",
        type=int,
        default=2,
        help="Seeds per validation prompt (rows of the grid); with 2 or more, val/pixel_diversity is logged.",
    )
    g.add_argument("--report_to", default="none", help="Tracker for accelerate (tensorboard, wandb, ...), or 'none'.")
    g.add_argument("--logging_dir", default="logs", help="Tracker logs and history.json, inside --output_dir.")
    g.add_argument("--push_to_hub", action="store_true", help="Push the experts-only repo to the Hub at the end.")
    g.add_argument("--hub_model_id", default=None, help="Hub repo of the push. Default: --output_dir's name.")
    g.add_argument("--hub_token", default=None, help="Token for the push; prefer `hf auth login`. Never printed.")


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
    if args.uncheckpointed_blocks is not None and args.uncheckpointed_blocks < 0:
        raise ValueError(f"`--uncheckpointed_blocks` must be >= 0, got {args.uncheckpointed_blocks}.")
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
        "validation_seeds",
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
    for name in ("learning_rate", "fake_learning_rate"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"`--{name}` must be > 0, got {value}.")
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
    check_recipe_args(args)
    sizes(args)  # parses --resolutions


def check_recipe_args(args) -> None:
    """Raise `ValueError` for a recipe part (`--recipe`, recipe.py) the run cannot use."""
    if getattr(args, "real_data", None) is not None:
        if getattr(args, "resolutions", None):
            raise ValueError("`--real_data` needs one training size: its latents are encoded once, at that size.")
        n = len(args.steps_per_phase) if args.method == "phased_dmd" else 1
        if getattr(args, "fake_real_sigmas", None) is not None and len(args.fake_real_sigmas) != n:
            raise ValueError(f"`--fake_real_sigmas` needs one sigma per phase ({n}), got {args.fake_real_sigmas}.")
    if args.method != "phased_dmd":
        for name, off in (("diversity_weight", 0.0), ("random_exit", False)):
            if getattr(args, name, off) not in (off, None):
                raise ValueError(f"`--{name}` is a part of Phased DMD's recipe; `--method {args.method}` has none.")


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


def exit_on_user_error(main, argv=None):
    """Run a script's `main(argv)`; a `ValueError` (a bad flag, a run folder that does not fit, a corrupt file) ends
    it as argparse ends a bad flag: one line, `<script>: error: <message>`, and exit code 2, without a traceback.

    Under `accelerate launch` every process meets the same error: only the main one (`RANK` 0) prints it.
    """
    try:
        return main(argv)
    except ValueError as e:
        if is_main_process():
            print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def is_main_process() -> bool:
    """Whether this is the run's main process (`RANK` 0, or no launcher), from the environment: known before
    accelerate starts, and after a failure."""
    return int(os.environ.get("RANK", "0")) == 0
