"""The Phased DMD training run shared by the example scripts.

`examples/phased_dmd/train_phased_dmd_<family>.py` parse their flags with [`build_parser`] and call [`train`]; all
that differs between Qwen-Image and Wan2.2 lives in [`diffusers_pdmd.families`]. The math is in
`training/{flow,losses,simulate}.py`; this module only wires it to diffusers models, peft adapters and accelerate.

Roles on one frozen copy of the base weights (per teacher transformer):
- teacher (real score): the base with adapters disabled, with classifier-free guidance; for an MoE teacher (Wan2.2
  A14B) the transformer that owns each sample's `t`;
- generator expert of phase k: LoRA adapter `phase_k` on the transformer owning most of the phase;
- fake score of phase k: LoRA adapter `fake_k` on every teacher transformer (routed by `t` like the teacher), or,
  with `--fake_full_finetune`, a trainable full copy of each teacher transformer.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..schedulers import PhasedDMDScheduler
from . import adapters as ad
from . import checkpoint as ckpt
from . import parallel, runs
from .losses import DMD_WEIGHTINGS, FAKE_WEIGHTINGS, T_SAMPLINGS, dmd_loss, fake_score_loss, sample_t
from .simulate import METHODS, generator_sample, split_by_phase


logger = logging.getLogger("diffusers_pdmd.train")

PAPER_DEFAULTS = {"lora_rank": 64, "lora_alpha": 8, "learning_rate": 5e-5, "fake_full_learning_rate": 4e-7}


class TrainingDivergedError(RuntimeError):
    """A loss became NaN or infinite; the run stopped without writing a checkpoint of the bad state."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


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
    a("--validation_seeds", type=int, default=2, help="Seeds per validation prompt (>= 2 logs val/pixel_diversity).")
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


def check_sizes(args, family) -> None:
    """`family.check_size` on every training size, its message naming the flag instead of the argument."""
    video = hasattr(args, "num_frames")
    for h, w, f in sizes(args):
        try:
            family.check_size(h, w, f)
        except ValueError as e:
            if getattr(args, "resolutions", None):
                entry = f"{f}x{h}x{w}" if video else f"{h}x{w}"
                raise ValueError(f"`--resolutions` entry {entry}: {e}") from None
            msg = str(e)
            names = ("height", "width", "num_frames") if video else ("height", "width")
            for name in names:
                msg = msg.replace(f"`{name}`", f"`--{name}`" if video else "`--resolution`")
            raise ValueError(msg) from None


_PROMPT_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet", ".tsv")


def load_prompts(prompts: str, column: str = "prompt") -> list[str]:
    """Prompts from a text file (one a line; blank lines skipped) or a `datasets` name / path."""
    path = Path(prompts)
    if not path.exists() and (path.suffix in _PROMPT_FILE_SUFFIXES or prompts.startswith((".", "/", "~"))):
        raise ValueError(f"`--prompts` {prompts!r}: no such file.")
    if path.is_file() and path.suffix in ("", ".txt"):
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        out = [line for line in lines if line]
    else:
        from datasets import load_dataset

        try:
            if path.is_file():
                kind = path.suffix.lstrip(".").replace("jsonl", "json").replace("tsv", "csv")
                ds = load_dataset(kind, data_files=str(path), split="train")
            else:
                ds = load_dataset(prompts, split="train")
        except Exception as e:
            raise ValueError(
                f"`--prompts` {prompts!r} is neither a text file nor a dataset `datasets` can load "
                f"({type(e).__name__}: {e})."
            ) from e
        if column not in ds.column_names:
            raise ValueError(f"`--prompt_column` {column!r} is not in the dataset; columns: {ds.column_names}.")
        out = [str(x) for x in ds[column] if str(x).strip()]
    if not out:
        raise ValueError(f"`--prompts` {prompts!r} holds no prompt.")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Phase plan
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What is trained: phases, their sigmas, and the position of each global step."""

    method: str
    boundaries: list[float]
    steps_per_phase: list[int]
    phases: list[int]
    max_steps: int
    order: str

    @property
    def num_phases(self) -> int:
        return len(self.steps_per_phase)

    @property
    def total_steps(self) -> int:
        return self.max_steps * len(self.phases)

    def position(self, global_step: int) -> tuple[int, int]:
        """`(phase, step within the phase)` of a global step."""
        if self.order == "alternate":
            return self.phases[global_step % len(self.phases)], global_step // len(self.phases)
        return self.phases[global_step // self.max_steps], global_step % self.max_steps


def make_plan(args, family) -> Plan:
    if args.method == "phased_dmd":
        boundaries = args.phase_boundaries
        if boundaries is None:
            ratio = getattr(family, "boundary_ratio", None)
            boundaries = [float(ratio)] if ratio is not None else [0.875]
        steps = list(args.steps_per_phase)
        if len(steps) != len(boundaries) + 1:
            raise ValueError(
                f"`--steps_per_phase` needs {len(boundaries) + 1} values for {len(boundaries)} boundaries "
                f"{boundaries}, got {steps}."
            )
    elif args.method == "dmd":
        boundaries, steps = [], [1]
    else:
        boundaries, steps = [], [sum(args.steps_per_phase)]
    PhasedDMDScheduler(phase_boundaries=boundaries, steps_per_phase=steps)  # validates them
    k = len(steps)
    if args.train_phase == "all":
        phases = list(range(k))
    elif isinstance(args.train_phase, int) and 0 <= args.train_phase < k:
        phases = [args.train_phase]
    else:
        raise ValueError(f"`--train_phase` must be 'all' or an index in [0, {k - 1}], got {args.train_phase!r}.")
    return Plan(args.method, [float(b) for b in boundaries], steps, phases, args.max_train_steps, args.phase_order)


# ----------------------------------------------------------------------------------------------------------------
# Conditioning helpers
# ----------------------------------------------------------------------------------------------------------------


def select_cond(cond: dict, index: torch.Tensor, n: int) -> dict:
    """Rows `index` of every per-sample entry (tensors or lists with `n` rows) of a conditioning dict."""
    out = {}
    for key, value in cond.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list) and len(value) == n:
            out[key] = [value[i] for i in index.tolist()]
        else:
            out[key] = value
    return out


def cat_cond(a: dict, b: dict, n: int) -> dict:
    """The conditioning of a batch of `a`'s `n` rows followed by `b`'s `n` rows (batched classifier-free guidance).

    Prompt embeddings of different lengths are zero-padded at the end to the longer one and `prompt_embeds_mask`
    marks the real tokens (ones where a mask was `None`), as diffusers pads a batch of prompts; the padded tokens
    are masked out of attention. Other per-sample entries (tensors with `n` rows, lists of `n` items) are
    concatenated; shared entries are kept.
    """
    a, b = dict(a), dict(b)
    ea, eb = a.get("prompt_embeds"), b.get("prompt_embeds")
    masked = "prompt_embeds_mask" in a or "prompt_embeds_mask" in b
    if isinstance(ea, torch.Tensor) and isinstance(eb, torch.Tensor) and masked:
        length = max(ea.shape[1], eb.shape[1])
        if (
            ea.shape[1] != eb.shape[1]
            or a.get("prompt_embeds_mask") is not None
            or b.get("prompt_embeds_mask") is not None
        ):
            for c, e in ((a, ea), (b, eb)):
                mask = c.get("prompt_embeds_mask")
                if mask is None:
                    mask = torch.ones(e.shape[:2], dtype=torch.long, device=e.device)
                pad = length - e.shape[1]
                c["prompt_embeds"] = torch.nn.functional.pad(e, (0, 0, 0, pad))
                c["prompt_embeds_mask"] = torch.nn.functional.pad(mask, (0, pad))
    out = {}
    for key in a.keys() | b.keys():
        va, vb = a.get(key), b.get(key)
        if isinstance(va, torch.Tensor) and va.ndim > 0 and va.shape[0] == n:
            out[key] = torch.cat([va, vb.to(va.device)])
        elif isinstance(va, list) and len(va) == n:
            out[key] = va + vb
        else:
            out[key] = va
    return out


def trim_padding(cond: dict) -> dict:
    """Cut a batch's prompt embeddings after the last real token of its longest prompt; drop a mask that is then
    all ones (`None`), as diffusers' pipelines pass it.

    The cached embeddings of all prompts are padded to the longest prompt of the whole set; a batch needs only its
    own longest. Without a mask attention runs its unmasked (flash) kernel. Qwen-Image's text RoPE positions do not
    depend on the length, so the velocities equal the padded, masked ones. Entries without a mask are unchanged.
    """
    mask, embeds = cond.get("prompt_embeds_mask"), cond.get("prompt_embeds")
    if not isinstance(mask, torch.Tensor) or not isinstance(embeds, torch.Tensor):
        return cond
    real = mask.bool().any(dim=0).cpu()
    length = int(real.nonzero().max()) + 1 if bool(real.any()) else mask.shape[1]
    mask = mask[:, :length]
    out = dict(cond, prompt_embeds=embeds[:, :length], prompt_embeds_mask=mask)
    if bool(mask.bool().all()):
        out["prompt_embeds_mask"] = None
    return out


def cfg_batchable(cond: dict, negative: dict) -> bool:
    """Whether the teacher's conditional and negative passes can run as one batch without padding either prompt:
    same embedding length (Wan2.2 pads every prompt to `max_sequence_length`; Qwen-Image's lengths differ)."""
    a, b = cond.get("prompt_embeds"), negative.get("prompt_embeds")
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape[1] == b.shape[1]
    return True


def _to_device(cond: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


class _CallThrough:
    """Calls go to the distributed wrapper (gradient sync) or the model, attributes (`config`) to the model.

    `dtype` is read once: diffusers' `ModelMixin.dtype` walks every module (thousands with LoRA layers) on each read,
    and every velocity query reads it.
    """

    def __init__(self, raw, wrapped):
        self.raw, self.wrapped = raw, wrapped
        self.dtype = raw.dtype

    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.raw, name)


def compile_wanted(args, accelerator) -> bool:
    """`--compile` forces compilation, `--no_compile` stops it; by default a one-process CUDA run compiles, unless
    `--base_fp8` (see `check_speed_args`) or `--offload_activations` (saved-tensor hooks, not measured compiled)."""
    if args.no_compile:
        return False
    if args.compile:
        return True
    if args.base_fp8 or args.offload_activations:
        return False
    return accelerator.device.type == "cuda" and accelerator.num_processes == 1


class Distiller:
    """Holds the models and answers velocity queries for each role (see the module docstring)."""

    def __init__(self, args, accelerator, family, pipe, plan: Plan):
        self.args, self.accelerator, self.family, self.plan = args, accelerator, family, plan
        self.device = accelerator.device
        self.components = dict(pipe.components)
        self.layout = parallel.setup(
            accelerator, getattr(args, "context_parallel_degree", 1), family, self.components, self.size()
        )
        self.models = {}
        for name in (n for n in family.transformer_names if self.components.get(n) is not None):
            model = self.components[name]
            model.requires_grad_(False)
            if args.gradient_checkpointing:
                model.enable_gradient_checkpointing()
            if args.attention_backend:
                model.set_attention_backend(args.attention_backend)
            self.models[name] = model
        if self.components.get("vae") is not None:
            self.components["vae"].requires_grad_(False).to(self.device)
        if self.components.get("text_encoder") is not None:
            self.components["text_encoder"].requires_grad_(False).to(self.device)

        k = plan.num_phases
        self._schedules = {}
        sigmas, self.time_shift = self.schedule(*self.size())
        self.sigmas_by_phase = sigmas
        # An expert lives on the teacher transformer that owns the middle of its phase.
        self.expert_base = [family.teacher_transformer_for_sigma(0.5 * (s[0] + s[-1])) for s in sigmas]
        targets = ad.lora_targets(family.name)
        self.fake_full = {}
        for j in range(k):
            ad.add_lora(self.models[self.expert_base[j]], f"phase_{j}", args.lora_rank, args.lora_alpha, targets)
        if not args.fake_full_finetune:
            rank = args.fake_lora_rank or args.lora_rank
            for model in self.models.values():
                for j in plan.phases:
                    ad.add_lora(model, f"fake_{j}", rank, args.lora_alpha, targets)
        if args.base_fp8:  # after the adapters: peft makes them in its base layer's dtype; they are skipped here
            for model in self.models.values():
                ad.store_base_in_fp8(model, compute_dtype=torch.bfloat16)
        if not args.offload_idle_transformers:  # else `start_phase` places them
            for model in self.models.values():
                model.to(self.device)
        self.switches = {n: ad.AdapterSwitch(m) for n, m in self.models.items()}
        if accelerator.mixed_precision in ("fp16", "bf16") and not args.upcast_lora_inputs:
            for switch in self.switches.values():  # autocast casts the fp32 LoRA weights per matmul instead
                ad.keep_input_dtype(switch.layers)
        if compile_wanted(args, accelerator):
            from torch import _dynamo

            # one graph per block for each adapter (experts, fake scores, none for the teacher), grad mode and shape
            _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
            _dynamo.config.accumulated_recompile_limit = max(_dynamo.config.accumulated_recompile_limit, 1024)
            if not args.compile:  # the default: a failure to compile falls back to eager instead of ending the run
                _dynamo.config.suppress_errors = True
            logger.info(
                "Compiling the repeated transformer blocks (torch.compile): the first update takes a minute or two "
                "longer. `--no_compile` skips it."
            )
            for model in self.models.values():
                model.compile_repeated_blocks()
        # What a velocity query calls: the model itself, or its DDP / FSDP wrapper in a distributed run.
        self.callers = {n: self._wrap(m) for n, m in self.models.items()}

    def _wrap(self, model):
        dtype = model.dtype  # of the model as loaded, before any sharding wrapper
        wrapped = parallel.wrap_model(self.accelerator, model, self.layout)  # DDP / FSDP1 / FSDP2, context parallel
        caller = _CallThrough(model, wrapped)
        caller.dtype = dtype
        return caller

    @property
    def fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def full_params(self, writeback: bool = False):
        """Context in which every (FSDP-sharded) model holds its full parameters, for reading state dicts.

        Collective under FSDP: every process must enter it. `writeback=True` shards what was loaded back on exit.
        """

        stack = contextlib.ExitStack()
        if parallel.is_fsdp2(self.accelerator):
            stack.enter_context(parallel.gathered_parameters([*self.models.values(), *self.fake_full.values()]))
        elif self.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            for caller in [*self.callers.values(), *self.fake_full.values()]:
                stack.enter_context(FSDP.summon_full_params(caller.wrapped, writeback=writeback))
        return stack

    def _optimizer_model(self, phase: int, role: str):
        if role == "gen":
            return self.callers[self.expert_base[phase]]
        models = list(self.fake_full.values()) if self.args.fake_full_finetune else list(self.callers.values())
        if len(models) > 1:
            raise ValueError("FSDP supports one teacher transformer; train Wan2.2 A14B with DDP (`--multi_gpu`).")
        return models[0]

    def optimizer_state(self, opt, phase: int, role: str, key: str):
        """`(tensors, meta)` of an optimizer; under FSDP its full (unsharded) state (collective)."""
        if parallel.is_fsdp2(self.accelerator):
            return ckpt.flatten_optimizer(parallel.full_optimizer_state_dict(opt), key)
        if not self.fsdp:
            return ckpt.flatten_optimizer(opt.state_dict(), key)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        model = self._optimizer_model(phase, role).wrapped
        full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return ckpt.flatten_optimizer(full, key)

    def load_optimizer_state(self, opt, phase: int, role: str, tensors, meta, key: str):
        state_dict = ckpt.unflatten_optimizer(tensors, meta, key)
        if parallel.is_fsdp2(self.accelerator):
            return parallel.load_full_optimizer_state_dict(opt, state_dict)
        if not self.fsdp:
            opt.load_state_dict(state_dict)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        model = self._optimizer_model(phase, role).wrapped
        set_optimizer_state_dict(model, opt, state_dict, options=StateDictOptions(full_state_dict=True))

    # -- schedule -------------------------------------------------------------------------------------------------

    def scheduler(self) -> PhasedDMDScheduler:
        return PhasedDMDScheduler.from_config(
            self.components["scheduler"].config,
            phase_boundaries=self.plan.boundaries,
            steps_per_phase=self.plan.steps_per_phase,
            stochastic_sampling=self.plan.method == "sgts",
        )

    def size(self):
        """The first training size `(height, width, num_frames)` (validation samples at it)."""
        return sizes(self.args)[0]

    def schedule(self, h, w, f=None) -> tuple[list[list[float]], float]:
        """`(sigmas by phase, time shift)` at a sample size: Wan's flow shift, Qwen-Image's `exp(mu)` of the size."""
        if (h, w, f) not in self._schedules:
            sched = self.scheduler()
            self.family.check_size(h, w, f)
            shape = self.family.latent_shape(self.components, 1, h, w, f)
            mu = self.family.mu(self.components, shape[1]) if sched.config.use_dynamic_shifting else None
            sched.set_timesteps(mu=mu)
            sigmas = split_by_phase(sched.sigmas.double(), self.plan.steps_per_phase, self.plan.boundaries)
            self._schedules[(h, w, f)] = (sigmas, sched._effective_shift(mu))
        return self._schedules[(h, w, f)]

    # -- trainable parameters -------------------------------------------------------------------------------------

    def adamw(self, params: list, lr: float) -> torch.optim.AdamW:
        """AdamW with the flags' betas and weight decay; the fused CUDA kernel when every parameter is a CUDA fp32
        tensor (one kernel for all tensors instead of a few per tensor; same update up to rounding)."""
        a = self.args
        fused = bool(params) and all(p.is_cuda and p.dtype == torch.float32 for p in params)
        return torch.optim.AdamW(
            params,
            lr=lr,
            betas=(a.adam_beta1, a.adam_beta2),
            weight_decay=a.adam_weight_decay,
            **({"fused": True} if fused else {}),
        )

    def expert_params(self, phase: int):
        return ad.adapter_parameters(self.models[self.expert_base[phase]], f"phase_{phase}")

    def fake_params(self, phase: int):
        if self.args.fake_full_finetune:
            return [p for m in self.fake_full.values() for p in getattr(m, "raw", m).parameters() if p.requires_grad]
        return [p for m in self.models.values() for p in ad.adapter_parameters(m, f"fake_{phase}")]

    def transformers_used(self, phase: int) -> set[str]:
        """Transformers that training `phase` calls: the experts of phases 0..phase (back-simulation) and the
        teacher / fake-score transformers owning some `t` in `(s, 1]`, `s` the end of the phase."""
        used = {self.expert_base[j] for j in range(phase + 1)}
        end = float(self.sigmas_by_phase[phase][-1])
        grid = torch.linspace(end, 1.0, 257, dtype=torch.float64)[1:]
        return used | {self.family.teacher_transformer_for_sigma(float(v)) for v in grid}

    def place(self, phase: int) -> None:
        """With `--offload_idle_transformers`: the transformers `phase` uses on the device, the others on the CPU."""
        if not self.args.offload_idle_transformers:
            return
        used = self.transformers_used(phase)
        for name in sorted(self.models, key=lambda n: n in used):  # free the device first, then fill it
            self.models[name].to(self.device if name in used else "cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def start_phase(self, phase: int) -> None:
        """Reset the fake score of `phase` to the teacher (a fresh zero-B LoRA, or a fresh full copy)."""
        self.place(phase)
        if self.args.fake_full_finetune:
            self.fake_full = {}
            for name, model in self.models.items():
                # the frozen base never changes: a copy with adapters off is the teacher
                fake = parallel.copy_model(model)
                for layer in ad.tuner_layers(fake):
                    layer._disable_adapters = True
                for pname, p in fake.named_parameters():
                    p.requires_grad_("lora_" not in pname)
                fake.to(dtype=torch.float32)
                self.fake_full[name] = self._wrap(fake)
        else:
            for model in self.models.values():
                ad.reset_adapter(model, f"fake_{phase}")

    # -- velocities -----------------------------------------------------------------------------------------------

    def _call(self, model, switch_name, adapter, x, t, cond):
        if switch_name is not None:
            if self.args.offload_idle_transformers and self.models[switch_name].device != self.device:
                self.models[switch_name].to(self.device)  # outside its phase (validation at the end)
            self.switches[switch_name].set(adapter)
        offload = contextlib.nullcontext()
        if self.args.offload_activations and torch.is_grad_enabled():
            # what backward keeps (with checkpointing: each block's inputs) waits in pinned CPU memory
            offload = torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")
        with self.accelerator.autocast(), offload:
            return self.family.velocity(model, x, t, cond).float()

    def _routed(self, x, t, cond, fn):
        if len(self.models) == 1:  # nothing to route (and no host sync reading `t`)
            return fn(next(iter(self.models)), x, t, cond)
        names = [self.family.teacher_transformer_for_sigma(float(v)) for v in t]
        if len(set(names)) == 1:
            return fn(names[0], x, t, cond)
        out = torch.empty_like(x, dtype=torch.float32)
        for name in sorted(set(names)):
            idx = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            out[idx] = fn(name, x[idx], t[idx], select_cond(cond, idx, x.shape[0]))
        return out

    def expert(self, phase: int, cond: dict):
        name = self.expert_base[phase]

        def velocity(x, t):
            return self._call(self.callers[name], name, f"phase_{phase}", x, t, cond)

        return velocity

    def teacher(self, cond: dict, neg_cond: dict | None):
        """Real score: the base (adapters off) with CFG; `neg_cond` holds one negative prompt's embeddings."""
        a = self.args

        def negative(c: dict, batch: int) -> dict:
            n = dict(c)  # size / image conditioning follows the sample, the text is the negative prompt
            for key in ("prompt_embeds", "prompt_embeds_mask"):
                value = neg_cond.get(key)
                n[key] = value.expand(batch, *value.shape[1:]) if isinstance(value, torch.Tensor) else value
            return n

        def one(name, x, t, c):
            scale = a.guidance_scale
            if name == "transformer_2" and a.guidance_scale_2 is not None:
                scale = a.guidance_scale_2
            if neg_cond is None or scale == 1.0:
                return self._call(self.callers[name], name, None, x, t, c)
            n = x.shape[0]
            neg = negative(c, n)
            if a.sequential_cfg or not cfg_batchable(c, neg):
                v = self._call(self.callers[name], name, None, x, t, c)
                v_neg = self._call(self.callers[name], name, None, x, t, neg)
            else:  # one forward of batch 2n: the conditional rows, then the negative ones
                both = cat_cond(c, neg, n)
                v, v_neg = self._call(
                    self.callers[name], name, None, torch.cat([x, x]), torch.cat([t, t]), both
                ).split(n)
            return self.family.combine_cfg(v, v_neg, scale)

        return lambda x, t: self._routed(x, t, cond, one)

    def fake(self, phase: int, cond: dict):
        def one(name, x, t, c):
            if self.args.fake_full_finetune:
                return self._call(self.fake_full[name], None, None, x, t, c)
            return self._call(self.callers[name], name, f"fake_{phase}", x, t, c)

        return lambda x, t: self._routed(x, t, cond, one)


def _finite(loss: torch.Tensor, what: str, phase: int, step: int, last_ckpt) -> None:
    if not torch.isfinite(loss):
        where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        raise TrainingDivergedError(
            f"{what} loss is {loss.item()} at phase {phase}, step {step}; stopping ({where}). Lower "
            "--learning_rate / --fake_learning_rate or check --mixed_precision, then resume with "
            "--resume_from_checkpoint latest."
        )


def _synchronized_clock(device) -> float:
    """Host time after the device has finished its queued work (for per-step wall times in the history)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def load_base_pipeline(args, dtype: torch.dtype):
    """The base (teacher) pipeline that `--pretrained_model_name_or_path` names: the default loader of [`train`]."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, use_safetensors=True, dtype=dtype
    )


@dataclass
class _Progress:
    """What the Ctrl-C handler and the clean-up of a failed run need to know about a run."""

    output_dir: Path
    created_output_dir: bool = False
    global_step: int = 0
    last_ckpt: Path | None = None


def train(args, expected_families: tuple[str, ...], load_pipeline=load_base_pipeline) -> Path:
    """Run Phased DMD (or a baseline) as the flags say; return the experts-only output folder.

    `load_pipeline(args, dtype)` returns the base pipeline (default: [`load_base_pipeline`]); a benchmark hands
    in a pipeline already in memory through it when the disk cannot hold a saved copy.

    Ctrl-C ends the run with one line naming the last checkpoint and the command that resumes it (exit code 130);
    a run that fails before writing anything leaves no empty `--output_dir` behind. `load_pipeline(args, dtype)`
    returns the base pipeline (default: [`load_base_pipeline`]); a benchmark hands in a pipeline already in memory
    through it when the disk cannot hold a saved copy.
    """
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    output_dir = Path(args.output_dir)
    progress = _Progress(output_dir, created_output_dir=not output_dir.exists())
    try:
        return _train(args, expected_families, progress, load_pipeline)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) != 0:  # one line from the whole run
            pass
        elif progress.last_ckpt is None:
            print(
                f"\nInterrupted at global step {progress.global_step}, before the first checkpoint: nothing to resume."
            )
        else:
            print(
                f"\nInterrupted at global step {progress.global_step}; last checkpoint {progress.last_ckpt}. Resume "
                f"with: {runs.resume_command()}",
                flush=True,
            )
        raise SystemExit(130) from None
    finally:
        if progress.created_output_dir:
            runs.remove_empty_dirs(output_dir)


def _tracker_config(args) -> dict:
    """The flags as hyperparameters a tracker takes: lists become strings (TensorBoard takes only scalars)."""
    out = {}
    for k, v in vars(args).items():
        if k == "hub_token":
            continue
        out[k] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


def _train(args, expected_families: tuple[str, ...], progress_info: _Progress, load_pipeline) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from .. import hub
    from ..families import get_family

    # -- every flag check before any model loads -----------------------------------------------------------------
    check_args(args)
    check_speed_args(args)
    output_dir = Path(args.output_dir)
    prompts = load_prompts(args.prompts, args.prompt_column)
    family = runs.probe_family(args)

    def checks_needing_the_family(family):
        if family.name not in expected_families:
            raise ValueError(
                f"`--pretrained_model_name_or_path` is a {family.name} pipeline; this script trains "
                f"{list(expected_families)}."
            )
        if getattr(family, "image_concat", False) and not getattr(args, "image", None):
            raise ValueError(f"`--image` (the first frame of every sample) is required to distil {family.name}.")
        if args.guidance_scale_2 is not None and len(family.transformer_names) < 2:
            raise ValueError("`--guidance_scale_2` needs a teacher with two transformers (Wan2.2 A14B).")
        check_sizes(args, family)
        plan = make_plan(args, family)
        return plan, runs.run_config(args, plan, family.name)

    plan = run = None
    if family is not None:
        plan, run = checks_needing_the_family(family)
    resume = ckpt.resolve_resume(output_dir, args.resume_from_checkpoint)
    resume_state = ckpt.read_state(resume) if resume is not None else None
    if resume is not None and run is not None:
        runs.check_resume(resume, resume_state, run, runs.recipe_config(args))
        if resume_state["global_step"] >= plan.total_steps and runs.finished(output_dir):
            logger.info(
                "The run in %s is finished (%d of %d generator updates, experts written); nothing to do.",
                output_dir,
                resume_state["global_step"],
                plan.total_steps,
            )
            return output_dir
    to_delete = runs.check_output_dir(args, output_dir)

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    parallel.check_degree(args.context_parallel_degree, accelerator.num_processes)  # before the weights load
    if accelerator.is_main_process and to_delete:
        logger.info("--overwrite_output_dir: deleting %s", ", ".join(p.name for p in to_delete))
        for p in to_delete:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    accelerator.wait_for_everyone()
    set_seed(args.seed)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = load_pipeline(args, weight_dtype)
    family = get_family(pipe)
    if plan is None or run["family"] != family.name:  # the config files could not be read before loading
        plan, run = checks_needing_the_family(family)
        if resume is not None:
            runs.check_resume(resume, resume_state, run, runs.recipe_config(args))
    d = Distiller(args, accelerator, family, pipe, plan)
    del pipe  # the Distiller holds the components; no second reference may keep a freed text encoder alive
    buckets = sizes(args)
    device = accelerator.device

    # -- text conditioning (cached: encoded once, text encoder freed) ------------------------------------------
    def encode(texts):
        with torch.no_grad():
            cond = family.encode_prompt(d.components, texts, device, max_sequence_length=args.max_sequence_length)
        return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}

    need_neg = args.guidance_scale != 1.0 or (args.guidance_scale_2 not in (None, 1.0))
    val_prompts = args.validation_prompts or []
    if args.cache_text_embeddings:
        all_cond = encode(prompts)
        neg_cond = encode([args.negative_prompt]) if need_neg else None
        val_cond = encode(val_prompts) if val_prompts else None
        d.components["text_encoder"].to("cpu")  # off the device even if the caller still holds the pipeline
        d.components["text_encoder"] = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    else:
        all_cond, val_cond = None, None
        neg_cond = encode([args.negative_prompt]) if need_neg else None

    image, image_conds = None, {}
    if getattr(args, "image", None):
        from diffusers.utils import load_image

        image = load_image(args.image)

    def batch_cond(index: torch.Tensor, size) -> dict:
        if all_cond is not None:
            cond = trim_padding(select_cond(all_cond, index, len(prompts)))
        else:
            cond = encode([prompts[i] for i in index.tolist()])
        cond = dict(cond, **family.size_cond(*size, batch_size=len(index)))
        if image is not None:
            if size not in image_conds:
                image_conds[size] = family.encode_image(d.components, image, args.train_batch_size, *size, device)
            cond.update(image_conds[size])
        return _to_device(cond, device)

    # -- optimizers, per phase ---------------------------------------------------------------------------------
    fake_lr = args.fake_learning_rate or (
        PAPER_DEFAULTS["fake_full_learning_rate"] if args.fake_full_finetune else args.learning_rate
    )
    opts = {}

    def make_opts(phase):
        gen_params = d.expert_params(phase)
        fake_params = d.fake_params(phase)
        for p in gen_params + fake_params:
            p.requires_grad_(True)
            p.data = p.data.float()
        g_opt = d.adamw(gen_params, args.learning_rate)
        f_opt = d.adamw(fake_params, fake_lr)
        g_sch = get_scheduler(
            args.lr_scheduler, g_opt, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps
        )
        f_sch = get_scheduler(
            args.lr_scheduler,
            f_opt,
            num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=args.max_train_steps * max(args.fake_updates_per_step, 1),
        )
        opts[phase] = (gen_params, fake_params, g_opt, f_opt, g_sch, f_sch)

    # -- state: load earlier experts, resume -------------------------------------------------------------------
    # One generator, seeded alike on every process: each draws the global batch and keeps its own slice, so a
    # run on P processes with batch b sees the same samples as one process with batch P * b.
    gen = torch.Generator().manual_seed(args.seed)
    n_proc, rank = d.layout.dp_size, d.layout.dp_rank  # a context-parallel group shares its samples
    global_step, last_ckpt, history = 0, None, []
    earlier = output_dir / hub.CONFIG_NAME
    if earlier.is_file() and args.resume_from_checkpoint is None:
        with d.full_params(writeback=True):  # collective under FSDP
            _load_experts(d, output_dir, skip=plan.phases if args.train_phase == "all" else [])
    if min(plan.phases) > 0 and not earlier.is_file() and args.resume_from_checkpoint is None:
        raise ValueError(
            f"Training phase {min(plan.phases)} needs the experts of phases 0..{min(plan.phases) - 1}: put the "
            f"output of their run in `--output_dir` ({output_dir}) first."
        )
    if args.resume_from_checkpoint is not None and resume is None:
        logger.info("No checkpoint in %s; starting from scratch.", output_dir)
    if resume is not None:
        files, state = ckpt.load_checkpoint(resume)
        global_step, history = state["global_step"], state.get("history", [])
        with d.full_params(writeback=True):  # collective under FSDP
            for j in range(plan.num_phases):
                if f"phase_{j}" in files:
                    _load_adapter(d.models[d.expert_base[j]], f"phase_{j}", files[f"phase_{j}"], resume / f"phase_{j}")
        phase, _ = plan.position(min(global_step, plan.total_steps - 1))
        for j in state["opt_phases"]:  # phases whose optimizers were live when the checkpoint was written
            if plan.order == "sequential" and j != phase:
                continue  # the checkpoint closed phase j: phase `phase` starts fresh, as in an uninterrupted run
            if args.fake_full_finetune:
                d.start_phase(j)
            with d.full_params(writeback=True):
                for name, model in d.models.items() if not args.fake_full_finetune else ():
                    _load_adapter(model, f"fake_{j}", files[f"fake_{j}.{name}"], resume / f"fake_{j}.{name}")
                for name, model in d.fake_full.items() if args.fake_full_finetune else ():
                    getattr(model, "raw", model).load_state_dict(files[f"fake_full.{name}"])
            make_opts(j)
            _, _, g_opt, f_opt, g_sch, f_sch = opts[j]
            for role, opt in (("gen", g_opt), ("fake", f_opt)):
                key = f"{role}_{j}"
                d.load_optimizer_state(opt, j, role, files["optimizers"], state["optimizers"][key], key)
            g_sch.load_state_dict(state["lr_schedulers"][f"gen_{j}"])
            f_sch.load_state_dict(state["lr_schedulers"][f"fake_{j}"])
        ckpt.set_rng_state(files["rng"], state["rng"], {"noise": gen})
        last_ckpt = resume
        logger.info("Resumed from %s at global step %d (phase %d).", resume, global_step, phase)
    progress_info.global_step, progress_info.last_ckpt = global_step, last_ckpt

    def save_ckpt():
        files, state = (
            {},
            {
                "global_step": global_step,
                "history": history,
                "optimizers": {},
                "lr_schedulers": {},
                "opt_phases": sorted(opts),
                "plan": {
                    "method": plan.method,
                    "boundaries": plan.boundaries,
                    "steps_per_phase": plan.steps_per_phase,
                    "phases": plan.phases,
                },
                "run": run,
                "recipe": runs.recipe_config(args),
            },
        )
        opt_tensors = {}
        with d.full_params():  # every process takes part under FSDP; only the main one writes
            for j in range(plan.num_phases):
                files[f"phase_{j}"] = ad.adapter_state_dict(d.models[d.expert_base[j]], f"phase_{j}")
            for j in opts:
                if not args.fake_full_finetune:
                    for name, model in d.models.items():
                        files[f"fake_{j}.{name}"] = ad.adapter_state_dict(model, f"fake_{j}")
                else:
                    for name, model in d.fake_full.items():
                        files[f"fake_full.{name}"] = {
                            k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                        }
        for j, (_, _, g_opt, f_opt, g_sch, f_sch) in opts.items():
            for role, opt in (("gen", g_opt), ("fake", f_opt)):
                key = f"{role}_{j}"
                tensors, meta = d.optimizer_state(opt, j, role, key)
                opt_tensors.update(tensors)
                state["optimizers"][key] = meta
            state["lr_schedulers"][f"gen_{j}"] = g_sch.state_dict()
            state["lr_schedulers"][f"fake_{j}"] = f_sch.state_dict()
        files["optimizers"] = opt_tensors
        files["rng"], state["rng"] = ckpt.rng_state({"noise": gen})
        path = output_dir / f"checkpoint-{global_step}"
        if accelerator.is_main_process:
            path = ckpt.save_checkpoint(output_dir, global_step, files, state)
            ckpt.prune_checkpoints(output_dir, args.checkpoints_total_limit)
        accelerator.wait_for_everyone()
        progress_info.last_ckpt = path
        return path

    # -- loop ---------------------------------------------------------------------------------------------------
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("phased-dmd", config=_tracker_config(args))
    b, ga = args.train_batch_size, args.gradient_accumulation_steps
    finished = global_step >= plan.total_steps
    current_phase = plan.position(global_step)[0] if plan.order == "sequential" and opts and not finished else None
    progress = tqdm(
        total=plan.total_steps,
        initial=global_step,
        desc="Phased DMD" if plan.method == "phased_dmd" else plan.method.upper(),
        disable=not accelerator.is_local_main_process,
    )

    mine = slice(rank * b, (rank + 1) * b)
    logit = {"logit_mean": args.logit_mean, "logit_std": args.logit_std}

    def draw_batch() -> _Batch:
        """Noise, prompts and size of one batch; with `--resolutions`, the bucket is drawn from the shared generator
        (every process draws the same one)."""
        size = buckets[int(torch.randint(len(buckets), (1,), generator=gen))] if len(buckets) > 1 else buckets[0]
        index = torch.randint(len(prompts), (b * n_proc,), generator=gen)[mine]
        z = family.prepare_latents(d.components, b * n_proc, *size, gen, "cpu", torch.float32)
        sigmas, shift = d.schedule(*size)
        return _Batch(z[mine].to(device), batch_cond(index, size), sigmas, shift)

    def t_and_eps(batch: _Batch, s, like):
        t = sample_t(s, b * n_proc, gen, sampling=args.timestep_sampling, shift=batch.shift, **logit)[mine].to(device)
        eps = torch.randn((b * n_proc, *like.shape[1:]), generator=gen)[mine].to(device)
        return t, eps

    def optimizer_step(params, opt, sch):
        if args.max_grad_norm:
            accelerator.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        sch.step()
        opt.zero_grad(set_to_none=True)

    # --fake_reuse_samples N: the back-simulated batches of one fake update serve the next N - 1 as well (fresh t and
    # noise each); never across a generator update, which changes the generator
    shared = {"uses_left": 0, "batches": []}

    def fake_update(phase: int, step: int) -> dict:
        """One fake-score update: subinterval score matching on stop-gradient generator samples (Eq. 13)."""
        _, fake_params, _, f_opt, _, f_sch = opts[phase]
        fresh = shared["uses_left"] == 0
        if fresh:
            shared["batches"], shared["uses_left"] = [], args.fake_reuse_samples
        shared["uses_left"] -= 1
        for i in range(ga):
            if fresh:
                batch = draw_batch()
                experts = [d.expert(j, batch.cond) for j in range(plan.num_phases)]
                with torch.no_grad():
                    x_s, s = generator_sample(
                        plan.method, batch.z, batch.sigmas, experts, phase, grad=False, generator=gen
                    )
                shared["batches"].append((batch, x_s, s))
            batch, x_s, s = shared["batches"][i]
            t, eps = t_and_eps(batch, s, x_s)
            loss, logs = fake_score_loss(d.fake(phase, batch.cond), x_s, s, t, eps, weighting=args.fake_weighting)
            _finite(loss, "Fake-score", phase, step, last_ckpt)
            accelerator.backward(loss / ga)
        optimizer_step(fake_params, f_opt, f_sch)
        return logs

    def generator_update(phase: int, step: int) -> dict:
        """One generator update: the DMD gradient on the reverse-nested interval (s, 1] (Eq. 11-12)."""
        gen_params, _, g_opt, _, g_sch, _ = opts[phase]
        shared["uses_left"] = 0
        for _ in range(ga):
            batch = draw_batch()
            experts = [d.expert(j, batch.cond) for j in range(plan.num_phases)]
            x_s, s = generator_sample(plan.method, batch.z, batch.sigmas, experts, phase, grad=True, generator=gen)
            t, eps = t_and_eps(batch, s, x_s)
            real, fake = d.teacher(batch.cond, neg_cond), d.fake(phase, batch.cond)
            loss, logs = dmd_loss(x_s, s, real, fake, t, eps, weighting=args.dmd_weighting)
            _finite(loss, "Generator (DMD)", phase, step, last_ckpt)
            # gradient checkpointing recomputes the expert's forward in backward: make it the active adapter
            d.switches[d.expert_base[phase]].set(f"phase_{phase}")
            accelerator.backward(loss / ga)
        optimizer_step(gen_params, g_opt, g_sch)
        return logs

    def enter_phase(phase: int) -> None:
        """Fresh fake score and optimizers when a phase starts (sequential) or is first met (alternate)."""
        nonlocal current_phase
        if plan.order == "sequential" and phase != current_phase:
            opts.clear()
            current_phase = phase
        elif plan.order == "sequential" or phase in opts:
            return
        d.start_phase(phase)
        make_opts(phase)

    while global_step < plan.total_steps:
        phase, step = plan.position(global_step)
        enter_phase(phase)
        started = _synchronized_clock(device)
        fake_logs = {}
        for _ in range(args.fake_updates_per_step):
            fake_logs = fake_update(phase, step)
        gen_logs = generator_update(phase, step)
        step_seconds = _synchronized_clock(device) - started
        global_step += 1
        progress_info.global_step = global_step
        logs = {**gen_logs, **fake_logs}
        if n_proc > 1:  # losses of the global batch: the mean over processes
            values = accelerator.reduce(torch.tensor(list(logs.values()), device=device), reduction="mean")
            logs = dict(zip(logs, values.tolist()))
        logs.update(phase=phase, lr=opts[phase][4].get_last_lr()[0], step_seconds=step_seconds)
        history.append({"step": global_step, **{k: float(v) for k, v in logs.items()}})
        progress.update(1)
        progress.set_postfix(
            phase=phase, dmd=f"{gen_logs['dmd_loss']:.4g}", fake=f"{fake_logs.get('fake_loss', float('nan')):.4g}"
        )
        accelerator.log(logs, step=global_step)
        if global_step % args.checkpointing_steps == 0:
            last_ckpt = save_ckpt()
        if val_prompts and global_step % args.validation_steps == 0:  # all processes: FSDP forwards are collective
            validate(d, val_prompts, val_cond, encode, output_dir / "validation" / f"step-{global_step}.png")
    progress.close()

    # -- the experts-only repo ----------------------------------------------------------------------------------
    last_ckpt = save_ckpt() if global_step % args.checkpointing_steps and not finished else last_ckpt
    with d.full_params():
        if accelerator.is_main_process:
            save_experts(d, output_dir, history)
    grid = validate(d, val_prompts, val_cond, encode, output_dir / "validation_grid.png") if val_prompts else None
    if accelerator.is_main_process:
        figures = _summary(history, plan)
        (output_dir / "training_summary.json").write_text(json.dumps(figures, indent=2))
        # every generator update's losses and wall time (`step_seconds`: its fake updates included, synchronised)
        (output_dir / args.logging_dir).mkdir(parents=True, exist_ok=True)
        (output_dir / args.logging_dir / "history.json").write_text(json.dumps(history, indent=1))
        config = hub.ExpertsConfig.load(output_dir)
        repo_id = args.hub_model_id or output_dir.name
        hub.write_model_card(
            output_dir,
            config,
            repo_id=args.hub_model_id,  # None: the folder's path, replaced by the real repo id when pushing
            prompt=val_prompts[0] if val_prompts else None,
            training_figures=figures,
            validation_images=[grid.name] if grid else None,
        )
        if args.push_to_hub:
            url = hub.push_experts_to_hub(
                output_dir, repo_id, token=args.hub_token, ignore_patterns=["checkpoint-*", ".checkpoint-*", "logs/*"]
            )
            logger.info("Pushed the experts to %s", url)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


@dataclass
class _Batch:
    """One batch: initial noise `z`, its conditioning, and the schedule of its size (sigmas by phase, time shift)."""

    z: torch.Tensor
    cond: dict
    sigmas: list[list[float]]
    shift: float


def _load_adapter(model, adapter_name: str, state_dict, path: Path) -> None:
    try:
        ad.load_adapter_state_dict(model, adapter_name, state_dict)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}.safetensors does not fit adapter {adapter_name!r} of this run: {e}") from e


def _summary(history: list[dict], plan: Plan) -> dict:
    out = {
        "method": plan.method,
        "phase_boundaries": plan.boundaries,
        "steps_per_phase": plan.steps_per_phase,
        "generator_updates": len(history),
    }
    for phase in sorted({int(h["phase"]) for h in history}):
        rows = [h for h in history if int(h["phase"]) == phase][-10:]
        out[f"phase_{phase}_final_dmd_loss"] = sum(r["dmd_loss"] for r in rows) / len(rows)
        if any("fake_loss" in r for r in rows):
            vals = [r["fake_loss"] for r in rows if "fake_loss" in r]
            out[f"phase_{phase}_final_fake_loss"] = sum(vals) / len(vals)
    return out


def _load_experts(d: Distiller, folder: Path, skip) -> None:
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
            from safetensors.torch import load_file

            prefix = hub.LORA_PREFIX + "."
            try:
                state_dict = {k.removeprefix(prefix): v for k, v in load_file(str(path)).items()}
                ad.load_adapter_state_dict(d.models[d.expert_base[j]], f"phase_{j}", state_dict)
            except Exception as err:
                raise ValueError(
                    f"The expert of phase {j} in `--output_dir`, {path}, cannot be loaded: {err}"
                ) from err


def save_experts(d: Distiller, output_dir: Path, history) -> None:
    """Write the experts-only repo: config, scheduler, one LoRA file per phase."""
    from .. import hub

    args = d.args
    experts = []
    for j in range(d.plan.num_phases):
        hub.save_lora_expert(d.models[d.expert_base[j]], f"phase_{j}", output_dir / f"phase_{j}")
        experts.append({"phase": j, "base_transformer": d.expert_base[j], "type": "lora", "path": f"phase_{j}"})
    base, revision = hub.base_model_reference(
        args.pretrained_model_name_or_path, args.revision, getattr(args, "base_model_id", None)
    )
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


@torch.no_grad()
def validate(d: Distiller, prompts: list[str], cached, encode, path: Path, seeds=None):
    """Sample each validation prompt with the current experts (one row per seed), save a PNG grid and log the
    diversity across seeds (`diffusers_pdmd.evaluate.validation_diversity`)."""
    from PIL import Image

    seeds = range(getattr(d.args, "validation_seeds", 2)) if seeds is None else seeds
    family, (h, w, f) = d.family, d.size()
    cond_all = cached if cached is not None else encode(prompts)
    images = []
    scheduler = d.scheduler()
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        n = len(prompts)
        cond = _to_device(dict(cond_all, **family.size_cond(h, w, f, batch_size=n)), d.device)
        if getattr(d.args, "image", None):  # the first frame of image-to-video, as in training
            from diffusers.utils import load_image

            cond.update(family.encode_image(d.components, load_image(d.args.image), n, h, w, f, d.device))
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
    if len(seeds) > 1:
        from ..evaluate import validation_diversity

        diversity = validation_diversity([images[p::cols] for p in range(cols)])
        d.accelerator.log({f"val/{k}": v for k, v in diversity.items()})
        logger.info("validation over %d seeds: val/pixel_diversity %.4g", len(seeds), diversity["pixel_diversity"])
    return path


__all__ = ["build_parser", "train", "TrainingDivergedError", "load_prompts", "make_plan", "Plan"]
