"""Metrics on generated digit images: the small-scale analogues of the paper's measurements.

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
        "feature_cosine_similarity": 1.0 - pairwise_diversity(feats, labels, metric="cosine"),
        "pixel_diversity": pairwise_diversity(to_grey(images), labels),
    }
    if reference_images is not None:
        out["frechet_distance"] = frechet_distance(feats, features(reference_images))
    return out
