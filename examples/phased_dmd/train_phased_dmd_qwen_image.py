#!/usr/bin/env python
# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""Distill Qwen-Image into a few-step phased mixture of LoRA experts with Phased DMD.

    accelerate launch examples/phased_dmd/train_phased_dmd_qwen_image.py \\
        --pretrained_model_name_or_path Qwen/Qwen-Image --prompts prompts.txt \\
        --phase_boundaries 0.875 --steps_per_phase 2 2 --mixed_precision bf16 \\
        --gradient_checkpointing --cache_text_embeddings --output_dir qwen-image-phased-dmd

The result in `--output_dir` is an experts-only repo: `PhasedMoEPipeline.from_pretrained(output_dir)` samples
from it. See examples/phased_dmd/README.md for hardware and multi-GPU commands, docs/training.md for the knobs.
"""

from diffusers_pdmd.training.cli import build_parser, exit_on_user_error  # torch-free: `--help` answers at once


def make_parser():
    return build_parser("Phased DMD distillation of Qwen-Image.")


def parse_args(argv=None):
    return make_parser().parse_args(argv)


def main(argv=None, load_pipeline=None):
    """Parse `argv` and train; `load_pipeline(settings, dtype)` replaces loading the base from disk or the Hub."""
    args = parse_args(argv)
    from diffusers_pdmd.training.distill import train

    kwargs = {"load_pipeline": load_pipeline} if load_pipeline is not None else {}
    train(args, expected_families=("qwen-image",), **kwargs)


if __name__ == "__main__":
    exit_on_user_error(main)
