"""The metrics of the paper, as small functions of features, activations and flows; and the digits backbone.

One metrics path: `python -m diffusers_pdmd.evaluate` (any sampler, any backbone: DINO, CLIP, LPIPS, RAFT, see
`diffusers_pdmd.evaluate.backbones`), the digits demo and `benchmarks/quality_digits.py` all compute diversity and
Fréchet distances with `pairwise_diversity`, `mean_pairwise_cosine_similarity` and `frechet_distance` below; only
the feature network differs (the digits use the small classifier of this module as their backbone).

Model-free formulas: `mean_pairwise_cosine_similarity` (DINO diversity), `lpips_distance` (LPIPS from a backbone's
activations and its calibrated linear heads), `flow_magnitude` / `top_fraction_mean` / `is_dynamic` /
`dynamic_degree` (motion, VBench style), `clip_score` (prompt alignment), `frechet_distance` (FID / FD-DINO).

Digits: the small-scale analogues of the paper's measurements.

Phased DMD (arXiv 2510.27684) compares generators by prompt following, by the diversity of the samples of one
prompt (DINOv3 mean pairwise cosine similarity and LPIPS mean pairwise distance over 8 seeds per prompt), and by a
Fréchet distance to the base model's samples. On the digits teacher (`diffusers_pdmd.digits`) the analogues are:

- `prompt_accuracy`: how often a digit classifier reads the prompted digit;
- `pairwise_diversity` in the classifier's penultimate-feature space (the DINOv3 analogue) and in pixel space
  (the LPIPS analogue);
- `frechet_distance` between classifier features of two image sets (the FID analogue).

The classifier is a tiny CNN trained on scikit-learn's bundled digits at the teacher's resolution (16x16, upsampled
from 8x8), on the train split of `real_digits` (also the data of the digits teacher, `diffusers_pdmd.digits`, which
imports it from here: metrics never import the teacher); its held-out accuracy is in `DigitClassifier.test_accuracy`
(0.997 with the default seed). It is trained on first use (about 4 s on one CPU core), from a fixed seed, and cached
per process.

Images are given as diffusers pipelines return them: values in [0, 1], as a `torch.Tensor` or `numpy.ndarray` of
shape (N, C, H, W) or (N, H, W, C) with C in {1, 3} (channels are averaged to grey), (N, H, W) grey, or a list of
`PIL.Image.Image`. Images of another size are resized to 16x16 (area averaging).

Example::

    from diffusers_pdmd import metrics

    images, labels = metrics.real_digits("test")
    metrics.prompt_accuracy(images, labels)  # 0.997
    metrics.pairwise_diversity(metrics.features(images), labels)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


IMAGE_SIZE = 16
FEATURE_DIM = 64


@functools.lru_cache(maxsize=1)
def _digit_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images, labels = data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0)
    return {"train": (train_x, train_y), "test": (test_x, test_y), "all": (images, labels)}


def real_digits(split: str = "train", size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits at the teacher's resolution, in the format a pipeline returns with ``output_type="pt"``.

    Args:
        split: ``"train"`` (1437 digits), ``"test"`` (360) or ``"all"`` (1797). The split is stratified by class
            and fixed (``random_state=0``).
        size: Side of the images; the 8x8 sources are resized bilinearly.

    Returns:
        ``(images, labels)``: float32 (N, 3, size, size) in [0, 1] (ink bright on a dark background, grey replicated
        to RGB), and int64 (N,) digits.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"`split` must be 'train', 'test' or 'all', got {split!r}.")
    images, labels = _digit_splits()[split]
    x = torch.from_numpy(images)[:, None]
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels)


def to_grey(images, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Converts images in [0, 1] to a float32 grey batch of shape (N, 1, size, size).

    Args:
        images: A tensor or array of shape (N, C, H, W), (N, H, W, C) with C in {1, 3}, or (N, H, W); or a list of
            PIL images. Values in [0, 1] (PIL images: 0..255).
        size: Output side; other sizes are resized with area averaging (or bilinear when upsampling).

    Returns:
        A (N, 1, size, size) float32 tensor on CPU.
    """
    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "convert"):
        images = np.stack([np.asarray(image.convert("L"), dtype=np.float32) / 255.0 for image in images])
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    x = x.detach().to("cpu", torch.float32)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim != 4:
        raise ValueError(f"`images` must have 3 or 4 dimensions, got shape {tuple(x.shape)}.")
    elif x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"`images` must have 1 or 3 channels, got shape {tuple(x.shape)}.")
    x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (size, size):
        mode = "area" if x.shape[-1] > size else "bilinear"
        x = nn.functional.interpolate(x, size=(size, size), mode=mode)
    return x


class DigitCNN(nn.Module):
    """Two 3x3 conv + max-pool stages (16 and 32 channels), a 64-unit feature layer and a 10-way linear head."""

    def __init__(self, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (IMAGE_SIZE // 4) ** 2, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of grey images ``x`` (N, 1, 16, 16) in [0, 1]."""
        return self.body(2.0 * x - 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translates each image by up to ``max_shift`` pixels (background fill), a cheap augmentation."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (max_shift,) * 4, value=0.0)
    span = 2 * max_shift + 1
    shifted = torch.stack([padded[:, :, dy : dy + h, dx : dx + w] for dy in range(span) for dx in range(span)])
    return shifted[torch.randint(0, span * span, (n,), generator=generator), torch.arange(n)]


class DigitClassifier:
    """A `DigitCNN` trained on the real digits of `real_digits` (train split).

    Training is deterministic given ``seed`` (fixed init, batch order and augmentation; one CPU thread's float
    arithmetic). Prefer `digit_classifier`, which caches one instance per seed.

    Args:
        seed: Seed of the initial weights, batch order and augmentation.
        epochs: Passes over the 1437 training digits.

    Attributes:
        test_accuracy (`float`): Accuracy on the held-out 360 digits of the test split.
    """

    def __init__(self, seed: int = 0, epochs: int = 20):
        train_x, train_y = real_digits("train")
        test_x, test_y = real_digits("test")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = DigitCNN()
        generator = torch.Generator().manual_seed(seed)
        train_x = to_grey(train_x)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=3e-3)
        steps_per_epoch = -(-len(train_x) // 64)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * steps_per_epoch)
        self.model.train()
        for _ in range(epochs):
            order = torch.randperm(len(train_x), generator=generator)
            for batch in order.split(64):
                logits = self.model(_random_shift(train_x[batch], generator))
                loss = nn.functional.cross_entropy(logits, train_y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
        self.model.eval().requires_grad_(False)
        self.test_accuracy = float((self.predict(test_x) == test_y.numpy()).mean())

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        """Penultimate-layer features, a (N, 64) float64 array (see `to_grey` for accepted image formats)."""
        return self.model.features(to_grey(images)).double().numpy()

    @torch.no_grad()
    def logits(self, images) -> np.ndarray:
        """Class logits, a (N, 10) float64 array."""
        return self.model(to_grey(images)).double().numpy()

    def predict(self, images) -> np.ndarray:
        """Predicted digits, a (N,) int64 array."""
        return self.logits(images).argmax(axis=1)


@functools.lru_cache(maxsize=4)
def digit_classifier(seed: int = 0) -> DigitClassifier:
    """The `DigitClassifier` of ``seed``, trained on first call and cached for the process."""
    return DigitClassifier(seed=seed)


def features(images) -> np.ndarray:
    """Penultimate features (N, 64) of the default (seed 0) digit classifier."""
    return digit_classifier().features(images)


def predict(images) -> np.ndarray:
    """Digits (N,) predicted by the default (seed 0) digit classifier."""
    return digit_classifier().predict(images)


def prompt_accuracy(images, labels) -> float:
    """Fraction of ``images`` that the default digit classifier reads as the prompted digit ``labels`` (N,)."""
    labels = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
    predictions = predict(images)
    if len(predictions) != len(labels):
        raise ValueError(f"`labels` has {len(labels)} entries for {len(predictions)} images.")
    return float((predictions == labels).mean())


def _as_rows(x) -> np.ndarray:
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return x.reshape(len(x), -1).astype(np.float64)


def pairwise_diversity(x, groups: Sequence | np.ndarray | torch.Tensor, metric: str = "euclidean") -> float:
    """Mean pairwise distance between the samples of each group, averaged over groups (higher = more diverse).

    With ``groups`` the prompt of each sample this is the paper's per-prompt diversity: on classifier features
    (`features`) the analogue of its DINOv3 measure, on pixels the analogue of its LPIPS measure.

    Args:
        x: Samples, (N, ...) (flattened to (N, D)): features, or pixels.
        groups: (N,) group id (e.g. the prompt's label) of each sample. Groups with fewer than two samples are
            skipped; each remaining group counts equally.
        metric: ``"euclidean"`` (L2 distance; for i.i.d. N(0, sigma^2 I_D) samples its expectation is
            ``2 * sigma * Gamma((D + 1) / 2) / Gamma(D / 2)``, about ``sigma * sqrt(2 D)``) or ``"cosine"``
            (cosine distance ``1 - cos``, so the paper's mean cosine similarity is one minus it).

    Returns:
        The mean over groups of the mean over unordered pairs i < j of d(x_i, x_j).
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"`metric` must be 'euclidean' or 'cosine', got {metric!r}.")
    x = _as_rows(x)
    groups = np.asarray(torch.as_tensor(groups).cpu() if isinstance(groups, torch.Tensor) else groups).reshape(-1)
    if len(groups) != len(x):
        raise ValueError(f"`groups` has {len(groups)} entries for {len(x)} samples.")
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    means = []
    for group in np.unique(groups):
        members = x[groups == group]
        if len(members) < 2:
            continue
        if metric == "cosine":
            distances = 1.0 - members @ members.T
        else:
            squared = (members**2).sum(1)
            distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2.0 * members @ members.T, 0.0))
        upper = np.triu_indices(len(members), k=1)
        means.append(distances[upper].mean())
    if not means:
        raise ValueError("`pairwise_diversity` needs at least one group with two or more samples.")
    return float(np.mean(means))


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigen-decomposition, negative eigenvalues clipped)."""
    eigenvalues, eigenvectors = np.linalg.eigh((a + a.T) / 2.0)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu_a, cov_a) and N(mu_b, cov_b).

    ``||mu_a - mu_b||^2 + tr(cov_a + cov_b - 2 (cov_a^1/2 cov_b cov_a^1/2)^1/2)``; the last trace equals
    ``tr((cov_a cov_b)^1/2)`` of the usual FID formula, computed here with symmetric eigen-decompositions only.
    """
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D): the FID formula.

    With `features` of generated and reference digits this is the analogue of the paper's FID to base samples.
    Covariances are unbiased (``ddof=1``); each set needs at least two samples.
    """
    a, b = _as_rows(feats_a), _as_rows(feats_b)
    if a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of equal D, got {a.shape} and {b.shape}.")
    return frechet_distance_from_stats(
        a.mean(0), np.cov(a, rowvar=False, ddof=1), b.mean(0), np.cov(b, rowvar=False, ddof=1)
    )


def mean_pairwise_cosine_similarity(features, groups) -> float:
    """The paper's DINO diversity measure (lower = more diverse).

    ``S = mean_g [ 2 / (n_g (n_g - 1)) * sum_{i<j in g} cos(f_i, f_j) ]``, ``cos(a, b) = a.b / (|a| |b|)``: the mean
    cosine similarity of the features of the samples of one prompt (group g, n_g seeds), averaged over prompts.
    Identical samples give 1. It is ``1 - pairwise_diversity(features, groups, metric="cosine")``.
    """
    return 1.0 - pairwise_diversity(features, groups, metric="cosine")


def lpips_distance(activations_a, activations_b, weights, eps: float = 1e-10) -> torch.Tensor:
    """LPIPS (Zhang et al. 2018) between two batches, from a backbone's activations and the linear heads.

    ``d(x, y) = sum_l 1 / (H_l W_l) sum_{h,w} || w_l * (yhat^l_{hw}(x) - yhat^l_{hw}(y)) ||_2^2``, where
    ``yhat^l = y^l / ||y^l||_channels`` is layer l's activation normalised to unit length over channels at each
    position and ``w_l >= 0`` (C_l,) is the calibrated per-channel weight (the "lin" layer, a 1x1 convolution
    without bias). Identical inputs give 0.

    Args:
        activations_a, activations_b: Lists of (N, C_l, H_l, W_l) tensors, layer by layer.
        weights: List of (C_l,) tensors (a 1x1 conv weight of shape (1, C_l, 1, 1) is flattened).
        eps: Added to the channel norm.

    Returns:
        (N,) distances.
    """
    if not (len(activations_a) == len(activations_b) == len(weights)):
        raise ValueError("`activations_a`, `activations_b` and `weights` must have one entry per layer.")
    total = 0.0
    for a, b, w in zip(activations_a, activations_b, weights):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + eps)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + eps)
        w = w.reshape(1, -1, 1, 1).to(a)
        total = total + ((a - b).pow(2) * w).sum(1).mean(dim=(1, 2))
    return total


def pair_indices(groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All unordered pairs i < j of samples in the same group: ``(i, j, group of the pair)``, groups sorted."""
    groups = np.asarray(groups).reshape(-1)
    first, second, owner = [], [], []
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        upper = np.triu_indices(len(members), k=1)
        first.append(members[upper[0]])
        second.append(members[upper[1]])
        owner.append(np.full(len(upper[0]), group))
    return np.concatenate(first), np.concatenate(second), np.concatenate(owner)


def group_means(values, groups) -> dict:
    """``{group: mean of values of that group}`` for a per-item (or per-pair) array and its group ids."""
    values, groups = np.asarray(values, np.float64).reshape(-1), np.asarray(groups).reshape(-1)
    return {g.item() if hasattr(g, "item") else g: float(values[groups == g].mean()) for g in np.unique(groups)}


def flow_magnitude(flow: torch.Tensor) -> torch.Tensor:
    """Per-pixel optical-flow magnitude ``|f|_{hw} = sqrt(u_{hw}^2 + v_{hw}^2)`` of flows (N, 2, H, W): (N, H, W)."""
    if flow.ndim != 4 or flow.shape[1] != 2:
        raise ValueError(f"`flow` must have shape (N, 2, H, W), got {tuple(flow.shape)}.")
    return flow.float().pow(2).sum(1).sqrt()


def top_fraction_mean(magnitude: torch.Tensor, fraction: float = 0.05) -> torch.Tensor:
    """Mean of the largest ``ceil(fraction * H * W)`` values of each (H, W) map of (N, H, W): VBench's per-frame-pair
    motion score (the top 5% of flow magnitudes)."""
    flat = magnitude.reshape(len(magnitude), -1)
    k = max(1, int(np.ceil(fraction * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(1)


def is_dynamic(pair_scores, height: int, width: int, num_frames: int | None = None) -> bool:
    """VBench's dynamic-degree test of one video from its per-frame-pair scores (`top_fraction_mean`).

    With ``tau = 6 * min(H, W) / 256`` (pixels, scaled with the frame size) and ``c = round(4 * F / 16)`` (F frames,
    default ``len(pair_scores) + 1``), the video is dynamic when at least ``max(c, 1)`` pair scores exceed ``tau``.
    """
    scores = np.asarray(pair_scores, np.float64).reshape(-1)
    frames = len(scores) + 1 if num_frames is None else num_frames
    threshold = 6.0 * min(height, width) / 256.0
    return int((scores > threshold).sum()) >= max(1, round(4 * frames / 16))


def dynamic_degree(flags) -> float:
    """The share of dynamic videos ``(1 / N) sum_n 1[video n is dynamic]`` (`is_dynamic` flags)."""
    flags = np.asarray(flags, dtype=bool).reshape(-1)
    if not len(flags):
        raise ValueError("`dynamic_degree` needs at least one video.")
    return float(flags.mean())


def clip_score(image_embeds, text_embeds) -> np.ndarray:
    """CLIP score of each (image, prompt) pair: ``100 * max(cos(E_I(x), E_T(c)), 0)`` (as torchmetrics computes it).

    Args:
        image_embeds, text_embeds: (N, D) projected CLIP embeddings of the images and of their own prompts.

    Returns:
        (N,) scores in [0, 100].
    """
    a, b = _as_rows(image_embeds), _as_rows(text_embeds)
    if a.shape != b.shape:
        raise ValueError(f"`image_embeds` {a.shape} and `text_embeds` {b.shape} must have the same shape.")
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return 100.0 * np.clip(cos, 0.0, None)


def digit_metrics(images, labels, reference_images=None) -> dict[str, float]:
    """All digit metrics of a set of samples at once.

    Args:
        images: Generated images (see `to_grey`), in [0, 1].
        labels: (N,) prompted digit of each image; also the groups of the diversity measures.
        reference_images: Optional images (e.g. the teacher's samples, or `real_digits("test")[0]`) to measure a
            Fréchet distance to.

    Returns:
        ``accuracy``, ``feature_diversity`` (mean pairwise L2 of classifier features per prompt),
        ``feature_cosine_similarity`` (mean pairwise cosine similarity, the paper's DINOv3 form: lower = more
        diverse), ``pixel_diversity`` (mean pairwise L2 of grey 16x16 pixels per prompt) and, with
        ``reference_images``, ``frechet_distance``.
    """
    feats = features(images)
    out = {
        "accuracy": prompt_accuracy(images, labels),
        "feature_diversity": pairwise_diversity(feats, labels),
        "feature_cosine_similarity": mean_pairwise_cosine_similarity(feats, labels),
        "pixel_diversity": pairwise_diversity(to_grey(images), labels),
    }
    if reference_images is not None:
        out["frechet_distance"] = frechet_distance(feats, features(reference_images))
    return out
