#!/usr/bin/env python
# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""Distill Wan2.2 (T2V-A14B or I2V-A14B with their two teacher experts, or TI2V-5B) into a few-step phased mixture of
experts.

    accelerate launch examples/phased_dmd/train_phased_dmd_wan22.py \\
        --pretrained_model_name_or_path Wan-AI/Wan2.2-T2V-A14B-Diffusers --prompts prompts.txt \\
        --steps_per_phase 2 2 --guidance_scale 4.0 --guidance_scale_2 3.0 --mixed_precision bf16 \\
        --gradient_checkpointing --cache_text_embeddings --output_dir wan22-a14b-phased-dmd

I2V-A14B (`Wan-AI/Wan2.2-I2V-A14B-Diffusers`) needs `--image first_frame.png`, the first frame of every sample.
For A14B the phase boundary defaults to the teacher's own switch (`boundary_ratio`, 0.875 for T2V, 0.9 for I2V): the expert of
each phase is a LoRA on the teacher transformer that owns its subinterval, and the real score for a noise level t
comes from the teacher transformer that owns t. Only the model family differs from the Qwen-Image script.
"""

from diffusers_pdmd.training.cli import build_parser, exit_on_user_error  # torch-free: `--help` answers at once


def make_parser():
    parser = build_parser("Phased DMD distillation of Wan2.2 (T2V-A14B, I2V-A14B, TI2V-5B).", video=True)
    parser.set_defaults(guidance_scale=4.0, max_sequence_length=512)
    return parser


def parse_args(argv=None):
    return make_parser().parse_args(argv)


def main(argv=None, load_pipeline=None):
    """Parse `argv` and train; `load_pipeline(settings, dtype)` replaces loading the base from disk or the Hub."""
    args = parse_args(argv)
    from diffusers_pdmd.training.distill import train

    kwargs = {"load_pipeline": load_pipeline} if load_pipeline is not None else {}
    train(args, expected_families=("wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"), **kwargs)


if __name__ == "__main__":
    exit_on_user_error(main)
