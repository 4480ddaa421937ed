# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""``python -m diffusers_pdmd.evaluate``: see `diffusers_pdmd.evaluate`."""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from . import METRICS, evaluate, load_prompts, prepare


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_pdmd.evaluate",
        description="Compare samplers (teacher, our experts, released experts): diversity, motion, Fréchet "
        "distances, CLIP score, cost.",
    )
    a = parser.add_argument
    a("--sampler", action="append", default=[], metavar="NAME=SOURCE[:key=value,...]", help="repeatable; keys: "
      "base, preset, steps, cfg, negative (see diffusers_pdmd.evaluate.samplers)")  # fmt: skip
    a("--prompts", required=True, help="a text file (one prompt a line), a saved `datasets` folder or dataset name")
    a("--prompt_column", default="text", help="dataset column of the prompts (default: text)")
    a("--prompt_split", default="train", help="dataset split (default: train)")
    a("--num_prompts", type=int, default=None, help="use the first N prompts")
    a("--seeds", type=int, default=8, help="seeds per prompt, 0..N-1 (default: 8)")
    a("--output_dir", required=True)
    a("--height", type=int, default=None)
    a("--width", type=int, default=None)
    a("--num_frames", type=int, default=None)
    a("--metrics", default=",".join(METRICS), help=f"comma-separated subset of {','.join(METRICS)}")
    a("--feature_model", default=None, help="DINO Hub id or folder (default: DINOv3 ViT-B/16, or DINOv2 ViT-B/14 "
      "where transformers has no DINOv3); 'digits': the digits classifier")  # fmt: skip
    a("--clip_model", default=None, help="CLIP Hub id or folder (default: openai/clip-vit-large-patch14)")
    a("--lpips_model", default="alex", help="LPIPS folder or Hub id, or alex/vgg (from the lpips package)")
    a("--flow_model", default="raft_large", help="raft_large / raft_small (torchvision weights) or a folder")
    a("--reference", default=None, help="sampler the FD column is measured to (default: the first)")
    a("--real_images", default=None, help="folder of real images for the FD to real data")
    a("--image", default=None, help="first frame for image-to-video samplers")
    a("--dtype", default="float32", choices=sorted(DTYPES))
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_prompts is not None and args.num_prompts < 1:
        parser.error("--num_prompts must be >= 1")
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    sizes = (args.height, args.width, args.num_frames)
    try:  # every check that needs no model, before any model loads
        prompts = load_prompts(args.prompts, args.prompt_column, args.prompt_split, args.num_prompts)
        specs, seeds, height, width, num_frames = prepare(
            args.sampler, prompts, args.seeds, metrics, args.reference, *sizes, real_images=args.real_images,
            lpips_model=args.lpips_model,
        )  # fmt: skip
    except ValueError as err:
        parser.error(str(err))
    image = None
    if args.image:
        from diffusers.utils import load_image

        image = load_image(args.image)
    command = "python -m diffusers_pdmd.evaluate " + shlex.join(sys.argv[1:] if argv is None else map(str, argv))
    result = evaluate(
        specs, prompts, args.output_dir, seeds, height, width, num_frames, metrics, args.feature_model,
        args.clip_model, args.lpips_model, args.flow_model, args.reference, args.real_images, DTYPES[args.dtype],
        args.device, image, command,
    )  # fmt: skip
    from .report import markdown_table

    print(markdown_table(result["samplers"]))
    print(f"\nreport: {args.output_dir}/report.md; metrics: {args.output_dir}/metrics.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
