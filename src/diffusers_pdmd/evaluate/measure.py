# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""The metrics of a set of samplers, from their samples on disk (formulas in `diffusers_pdmd.metrics`).

Per sampler, with the samples of one prompt (its seeds) as a group:

- ``dino_similarity``: `metrics.mean_pairwise_cosine_similarity` of the feature model's features (lower = more
  diverse), per prompt and averaged over prompts; a video's feature is the mean over up to 8 evenly spaced frames.
- ``lpips``: mean over the pairs of seeds of a prompt of the LPIPS distance (higher = more diverse); videos: the
  mean over up to 4 evenly spaced frames.
- ``flow`` (videos): per video the mean `metrics.flow_magnitude` over all pixels and consecutive frame pairs
  (pixels per frame); ``dynamic_degree``: the share of videos `metrics.is_dynamic`.
- ``fd``: `metrics.frechet_distance` of the features to each other sampler's (the matrix), to the reference sampler
  (``fd_to_reference``), and to real images (``fd_to_real``) when given.
- ``clip``: mean `metrics.clip_score` of each sample with its prompt (videos: mean over the feature frames).
- ``cost``: mean seconds and transformer forwards per sample (the first sample of a pipeline load, which warms up,
  is left out of the seconds when there are others).

Every value is a function of the set of samples of each prompt: permuting seeds changes nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import metrics


METRICS = ("diversity", "lpips", "flow", "fd", "clip", "cost")


def evenly(n: int, k: int) -> list[int]:
    """Up to ``k`` evenly spaced indices of ``range(n)`` (first and last included)."""
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(min(n, k))}) if n > 1 else [0]


def frames_of(sample: torch.Tensor, k: int) -> torch.Tensor:
    """(k', 3, H, W) frames of an image (3, H, W) (itself) or a video (F, 3, H, W) (`evenly` spaced)."""
    return sample[None] if sample.ndim == 3 else sample[evenly(len(sample), k)]


def features_of(samples: list[torch.Tensor], feature_model, frames: int = 8, batch_size: int = 16, desc="features"):
    """(N, D) features: an image's own, a video's mean over `frames_of`."""
    from tqdm.auto import tqdm

    out = []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
        chunk = [frames_of(s, frames) for s in samples[start : start + batch_size]]
        feats = feature_model(torch.cat(chunk))
        counts = np.cumsum([0] + [len(c) for c in chunk])
        out += [feats[a:b].mean(0) for a, b in zip(counts[:-1], counts[1:])]
    return np.stack(out)


def lpips_pairs(samples, groups, lpips_model, frames: int = 4, batch_size: int = 16, desc="lpips") -> dict:
    """``{prompt: mean LPIPS over its pairs of seeds}`` (videos: mean over `frames_of` frames)."""
    from tqdm.auto import tqdm

    first, second, owner = metrics.pair_indices(groups)
    values = []
    for start in tqdm(range(0, len(first), batch_size), desc=desc, leave=False):
        a = [frames_of(samples[i], frames) for i in first[start : start + batch_size]]
        b = [frames_of(samples[j], frames) for j in second[start : start + batch_size]]
        d = lpips_model(torch.cat(a).to(_device(lpips_model)), torch.cat(b).to(_device(lpips_model))).cpu()
        counts = np.cumsum([0] + [len(x) for x in a])
        values += [float(d[x:y].mean()) for x, y in zip(counts[:-1], counts[1:])]
    return metrics.group_means(values, owner)


def _device(module) -> torch.device:
    return next(iter(module.parameters()), torch.empty(0)).device


def motion(samples, flow_model, desc="flow") -> tuple[list[float], list[bool]]:
    """Per video: mean flow magnitude (pixels per frame) and VBench's dynamic flag."""
    from tqdm.auto import tqdm

    from .backbones import video_flow

    magnitudes, flags = [], []
    for video in tqdm(samples, desc=desc, leave=False):
        flow = video_flow(flow_model, video)
        magnitude = metrics.flow_magnitude(flow)
        magnitudes.append(float(magnitude.mean()))
        scores = metrics.top_fraction_mean(magnitude).cpu().numpy()
        flags.append(metrics.is_dynamic(scores, video.shape[-2], video.shape[-1], num_frames=len(video)))
    return magnitudes, flags


def diversity(features: np.ndarray, groups) -> dict:
    """``{"dino_similarity": mean over prompts, "dino_similarity_per_prompt": {prompt: value}}``."""
    groups = np.asarray(groups)
    per_prompt = {
        int(g): metrics.mean_pairwise_cosine_similarity(features[groups == g], np.zeros((groups == g).sum()))
        for g in np.unique(groups)
        if (groups == g).sum() > 1
    }
    return {"dino_similarity": float(np.mean(list(per_prompt.values()))), "dino_similarity_per_prompt": per_prompt}


def cost(records: list[dict]) -> dict:
    """Sampling steps (the scheduler's, most common), mean seconds (without the warm-up sample when there are
    others) and mean transformer forwards per sample."""
    seconds = [r["seconds"] for r in records if not r.get("warmup")] or [r["seconds"] for r in records]
    steps = [r["steps"] for r in records if r.get("steps")]
    return {
        "steps": int(np.bincount(steps).argmax()) if steps else None,
        "seconds_per_sample": float(np.mean(seconds)),
        "forwards_per_sample": float(np.mean([r["forwards"] for r in records])),
    }


def clip_scores(samples, prompts_of, clip_model, frames: int = 8, desc="clip") -> np.ndarray:
    """(N,) CLIP scores of each sample with its prompt (videos: mean over `frames_of` frames)."""
    from tqdm.auto import tqdm

    out = []
    for sample, prompt in tqdm(list(zip(samples, prompts_of)), desc=desc, leave=False):
        images = clip_model.image_embeds(frames_of(sample, frames))
        text = np.repeat(clip_model.text_embeds([prompt]), len(images), axis=0)
        out.append(float(metrics.clip_score(images, text).mean()))
    return np.asarray(out)


def fd_matrix(features: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """`metrics.frechet_distance` between every two samplers' features (0 on the diagonal, clipped at 0)."""
    names = list(features)
    out = {a: {} for a in names}
    for i, a in enumerate(names):
        out[a][a] = 0.0
        for b in names[i + 1 :]:
            out[a][b] = out[b][a] = max(0.0, metrics.frechet_distance(features[a], features[b]))
    return out


__all__ = ["METRICS", "clip_scores", "cost", "diversity", "fd_matrix", "features_of", "lpips_pairs", "motion"]
