# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""Measure samplers the way the paper does: diversity, motion, fidelity, prompt alignment, cost.

    python -m diffusers_pdmd.evaluate --sampler teacher=Qwen/Qwen-Image:steps=50,cfg=4 \\
        --sampler ours=YOU/qwen-image-phased-dmd --sampler lightning=LIGHTNING.safetensors:base=Qwen/Qwen-Image \\
        --prompts prompts.txt --seeds 8 --output_dir eval --height 1024 --width 1024

Samplers (`samplers.parse_sampler`): a base pipeline with its own sampler (the teacher), experts written here, or
released experts with their preset. Each is sampled at the same prompts, seeds and size; samples are written once
under ``OUTPUT_DIR/samples`` and reused. Metrics (`measure`, formulas in `diffusers_pdmd.metrics`) run on the
samples; ``report.md``, ``metrics.json``, ``contact_sheets/prompt_PPP.png`` and ``diversity_vs_cost.png`` are
written. `validation_diversity` is the small entry point for training scripts.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import torch

from .. import metrics as _metrics
from . import measure, report
from .measure import METRICS
from .samplers import SamplerSpec, check_samplers, generate, load_sample, parse_sampler, sample_path


DEFAULT_SIZES = {"qwen-image": (1024, 1024, None), "wan2.2-ti2v-5b": (704, 1280, 121)}
DEFAULT_VIDEO_SIZE = (480, 832, 81)


def load_prompts(source: str, column: str = "text", split: str = "train", limit: int | None = None) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped), a folder written by `datasets`'
    ``save_to_disk``, or a `datasets` dataset name (``column`` of ``split``); the first ``limit`` of them."""
    path = pathlib.Path(source)
    if path.is_file():
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        import datasets

        if path.is_dir():
            data = datasets.load_from_disk(str(path))
            data = data[split] if isinstance(data, datasets.DatasetDict) else data
        else:
            data = datasets.load_dataset(source, split=split)
        if column not in data.column_names:
            raise ValueError(f"`--prompt_column` {column!r} is not a column of {source} ({data.column_names}).")
        prompts = [str(x).strip() for x in data[column] if str(x).strip()]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"`--prompts` {source}: no prompts (empty file or dataset).")
    return prompts


def _resolve_size(specs: list[SamplerSpec], height, width, num_frames):
    families = {s.family for s in specs if s.family}
    if height is None or width is None:
        if not families:
            raise ValueError("`--height` and `--width` are needed: no sampler's family is known before loading.")
        family = sorted(families)[0]
        h, w, f = DEFAULT_SIZES.get(family, DEFAULT_VIDEO_SIZE)
        height, width = height or h, width or w
        num_frames = num_frames if num_frames is not None else f
    if num_frames is None and any(f != "qwen-image" for f in families):
        num_frames = DEFAULT_VIDEO_SIZE[2]
    return height, width, num_frames


def prepare(samplers, prompts, seeds, metrics, reference=None, height=None, width=None, num_frames=None, **checks):
    """Parse the samplers, resolve the seeds and the size, and run `check_arguments`: everything that needs no
    model. Returns ``(specs, seeds, height, width, num_frames)``."""
    if not samplers:
        raise ValueError("give at least one `--sampler NAME=SOURCE`.")
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    specs = [s if isinstance(s, SamplerSpec) else parse_sampler(s) for s in samplers]
    height, width, num_frames = _resolve_size(specs, height, width, num_frames)
    check_arguments(specs, prompts, seeds, metrics, reference, height, width, num_frames, **checks)
    return specs, seeds, height, width, num_frames


def check_arguments(
    specs, prompts, seeds, metrics, reference, height, width, num_frames, real_images=None, lpips_model=None
):
    """Every check that needs no model; raises `ValueError` naming the argument."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"`--metrics` must be a subset of {METRICS}, got unknown {unknown}.")
    check_samplers(specs, height, width, num_frames)
    if not prompts:
        raise ValueError("`--prompts`: no prompts.")
    if len(seeds) < 2 and {"diversity", "lpips", "fd"} & set(metrics):
        raise ValueError(f"`--seeds` must be >= 2 for diversity, LPIPS and Fréchet distances, got {len(seeds)}.")
    if reference is not None and reference not in [s.name for s in specs]:
        raise ValueError(f"`--reference` {reference!r} is not a sampler name ({[s.name for s in specs]}).")
    if real_images is not None and not pathlib.Path(real_images).is_dir():
        raise ValueError(f"`--real_images` {real_images} is not a folder of images.")
    needs = {"lpips": "torchvision", "flow": "torchvision"}
    for metric, module in needs.items():
        if metric in metrics and importlib.util.find_spec(module) is None:
            raise ValueError(f"`--metrics {metric}` needs {module}: pip install 'diffusers-pdmd[eval]'.")
    if "lpips" in metrics and lpips_model in ("alex", "vgg") and importlib.util.find_spec("lpips") is None:
        raise ValueError(
            f"`--lpips_model {lpips_model}` converts the `lpips` package's weights: pip install lpips, or pass a "
            "folder with config.json + model.safetensors (`evaluate.backbones.save_lpips_folder`)."
        )
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("the diversity-vs-cost plot needs matplotlib: pip install 'diffusers-pdmd[eval]'.")


def load_samples(out_dir, name: str, n_prompts: int, seeds) -> tuple[list[torch.Tensor], np.ndarray, list[dict]]:
    """One sampler's samples (prompt-major), their prompt indices and their records."""
    samples, groups, records = [], [], []
    for p in range(n_prompts):
        for seed in seeds:
            x, record = load_sample(sample_path(out_dir, name, p, seed))
            samples.append(x)
            groups.append(p)
            records.append(record)
    return samples, np.asarray(groups), records


def _load_real(folder, height: int, width: int) -> list[torch.Tensor]:
    from PIL import Image

    files = sorted(p for p in pathlib.Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if len(files) < 2:
        raise ValueError(f"`--real_images` {folder}: needs at least 2 images, found {len(files)}.")
    out = []
    for f in files:
        image = Image.open(f).convert("RGB").resize((width, height), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return out


def measure_all(data: dict, prompts, metrics, models: dict, reference: str, real=None) -> dict:
    """Per sampler metrics and the Fréchet matrix; ``data[name] = (samples, groups, records)``."""
    rows, feats = {}, {}
    for name, (samples, groups, records) in data.items():
        row = rows[name] = {}
        if "cost" in metrics:
            row.update(measure.cost(records))
        if {"diversity", "fd"} & set(metrics):
            feats[name] = measure.features_of(samples, models["features"], desc=f"features {name}")
        if "diversity" in metrics:
            row.update(measure.diversity(feats[name], groups))
        if "lpips" in metrics:
            per_prompt = measure.lpips_pairs(samples, groups, models["lpips"], desc=f"lpips {name}")
            row.update(lpips=float(np.mean(list(per_prompt.values()))), lpips_per_prompt=per_prompt)
        if "flow" in metrics and samples[0].ndim == 4:
            magnitudes, flags = measure.motion(samples, models["flow"], desc=f"flow {name}")
            row.update(flow=float(np.mean(magnitudes)), dynamic_degree=_metrics.dynamic_degree(flags))
            row["flow_per_prompt"] = _metrics.group_means(magnitudes, groups)
        if "clip" in metrics:
            scores = measure.clip_scores(samples, [prompts[g] for g in groups], models["clip"], desc=f"clip {name}")
            row.update(clip=float(scores.mean()), clip_per_prompt=_metrics.group_means(scores, groups))
    fd = measure.fd_matrix(feats) if "fd" in metrics else {}
    for name, row in rows.items():
        if fd:
            row["fd_to_reference"] = fd[name][reference]
        if real is not None and "fd" in metrics:
            row["fd_to_real"] = max(0.0, _metrics.frechet_distance(feats[name], real))
    return {"samplers": rows, "fd": fd}


def _load_models(metrics, feature_model, clip_model, lpips_model, flow_model, device) -> dict:
    from . import backbones

    models = {}
    if {"diversity", "fd"} & set(metrics):
        models["features"] = backbones.load_feature_model(feature_model, device)
    if "lpips" in metrics:
        models["lpips"] = backbones.load_lpips_model(lpips_model, device)
    if "flow" in metrics:
        models["flow"] = backbones.load_flow_model(flow_model, device)
    if "clip" in metrics:
        models["clip"] = backbones.load_clip_model(clip_model, device)
    return models


def evaluate(
    samplers,
    prompts: list[str],
    output_dir,
    seeds=8,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    metrics=METRICS,
    feature_model: str | None = None,
    clip_model: str | None = None,
    lpips_model: str = "alex",
    flow_model: str = "raft_large",
    reference: str | None = None,
    real_images=None,
    dtype=torch.float32,
    device="cpu",
    image=None,
    command: str = "",
) -> dict:
    """Sample what is missing, measure, and write the report; returns what ``metrics.json`` holds.

    Args:
        samplers: ``NAME=SOURCE[:options]`` strings or `SamplerSpec`s; the first is the reference of the Fréchet
            distances unless ``reference`` names another.
        prompts: The prompts (see `load_prompts`).
        seeds: A number N (seeds 0..N-1) or a list of seeds.
        metrics: A subset of `METRICS`. ``flow`` is measured on videos only.
        feature_model, clip_model, lpips_model, flow_model: Hub ids or folders (see `backbones`); ``feature_model
            ="digits"`` uses the digits classifier.
        real_images: A folder of real images for ``fd_to_real``.
    """
    metrics = tuple(metrics)
    specs, seeds, height, width, num_frames = prepare(
        samplers, prompts, seeds, metrics, reference, height, width, num_frames, real_images=real_images,
        lpips_model=lpips_model,
    )  # fmt: skip
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    for spec in specs:
        generate(spec, prompts, seeds, out, height, width, num_frames, dtype, device, image)
    data = {s.name: load_samples(out, s.name, len(prompts), seeds) for s in specs}
    is_video = next(iter(data.values()))[0][0].ndim == 4
    if not is_video:  # motion is measured on videos only: no flow model to load
        metrics = tuple(m for m in metrics if m != "flow")
    models = _load_models(metrics, feature_model, clip_model, lpips_model, flow_model, device)
    real = None
    if real_images is not None and {"diversity", "fd"} & set(metrics):
        real = measure.features_of(_load_real(real_images, height, width), models["features"], desc="features real")
    reference = reference or specs[0].name
    result = measure_all(data, prompts, metrics, models, reference, real)
    size = f"{num_frames}x{height}x{width}" if is_video else f"{height}x{width}"
    feature_name = getattr(models.get("features"), "name", feature_model)
    result.update(prompts=prompts, seeds=seeds, size=size, reference=reference, feature_model=feature_name)
    result["settings"] = {s.name: json.loads((out / "samples" / s.name / "sampler.json").read_text()) for s in specs}
    write_outputs(out, result, data, command)
    return result


def write_outputs(out: pathlib.Path, result: dict, data: dict, command: str = "") -> None:
    """``report.md``, ``metrics.json``, the contact sheets and the plot."""
    from tqdm.auto import tqdm

    report.write_json(out, result)
    report.write_report(out, result, command)
    seeds = result["seeds"]
    for p, prompt in enumerate(tqdm(result["prompts"], desc="contact sheets", leave=False)):
        rows = {name: [s for s, g in zip(samples, groups) if g == p] for name, (samples, groups, _) in data.items()}
        report.contact_sheet(rows, seeds, prompt, out / "contact_sheets" / f"prompt_{p:03d}.png")
    report.plot_diversity_vs_cost(result["samplers"], out / "diversity_vs_cost.png")


def validation_diversity(images_by_prompt, feature_model=None) -> dict[str, float]:
    """Diversity of the current experts at validation: images grouped by prompt (a list, per prompt, of the PIL
    images or (3, H, W) tensors of its seeds; videos: their first frame).

    Returns ``{"pixel_diversity": mean pairwise L2 of 16x16 grey pixels per prompt (`metrics.pairwise_diversity`),
    "dino_similarity": mean pairwise cosine similarity of ``feature_model`` features}`` (the second only with a
    feature model, a callable as `backbones.load_feature_model` returns).
    """
    tensors, groups = [], []
    for p, images in enumerate(images_by_prompt):
        for image in images:
            if not isinstance(image, torch.Tensor):
                image = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
            tensors.append(image.float())
            groups.append(p)
    x = torch.stack(tensors)
    out = {"pixel_diversity": _metrics.pairwise_diversity(_metrics.to_grey(x), groups)}
    if feature_model is not None:
        out["dino_similarity"] = _metrics.mean_pairwise_cosine_similarity(feature_model(x), groups)
    return out


__all__ = ["METRICS", "SamplerSpec", "check_arguments", "evaluate", "load_prompts", "parse_sampler", "prepare"]
__all__ += ["validation_diversity", "write_outputs"]
