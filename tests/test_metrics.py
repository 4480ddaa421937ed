"""Tests of the digit metrics (`diffusers_pdmd.metrics`): closed forms, invariants and the classifier's accuracy."""

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.special import gammaln

from diffusers_pdmd import metrics
from diffusers_pdmd.digits import real_digits


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_from_stats_diagonal_closed_form():
    # Commuting (diagonal) covariances: d = |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    got = metrics.frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_from_stats_matches_sqrtm_formula():
    rng = np.random.default_rng(0)
    d = 6
    cov_a, cov_b = _random_spd(rng, d), _random_spd(rng, d)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert metrics.frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-8)
    assert metrics.frechet_distance_from_stats(mu_a, cov_a, mu_a, cov_a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_gaussian_samples_matches_closed_form():
    rng = np.random.default_rng(1)
    d, n = 4, 200_000
    cov_a, cov_b = _random_spd(rng, d), _random_spd(rng, d)
    mu_a, mu_b = np.zeros(d), np.full(d, 0.5)
    a = rng.multivariate_normal(mu_a, cov_a, size=n)
    b = rng.multivariate_normal(mu_b, cov_b, size=n)
    expected = metrics.frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=0.03)
    assert metrics.frechet_distance(torch.from_numpy(a), a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="feature sets"):
        metrics.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_diversity_of_identical_samples_is_zero():
    x = np.tile(np.random.default_rng(0).normal(size=(1, 7)), (6, 1))
    groups = [0, 0, 0, 1, 1, 1]
    assert metrics.pairwise_diversity(x, groups) == pytest.approx(0.0, abs=1e-6)
    assert metrics.pairwise_diversity(x, groups, metric="cosine") == pytest.approx(0.0, abs=1e-12)


def test_diversity_of_iid_gaussians_matches_expectation():
    # x_i - x_j ~ N(0, 2 sigma^2 I_d): E|x_i - x_j| = 2 sigma Gamma((d + 1) / 2) / Gamma(d / 2) ~ sigma sqrt(2 d).
    rng = np.random.default_rng(0)
    d, sigma, groups, per_group = 256, 0.3, 10, 60
    x = rng.normal(scale=sigma, size=(groups * per_group, d)) + np.repeat(rng.normal(size=(groups, d)), per_group, 0)
    expected = 2 * sigma * np.exp(gammaln((d + 1) / 2) - gammaln(d / 2))
    assert expected == pytest.approx(sigma * np.sqrt(2 * d), rel=0.01)
    got = metrics.pairwise_diversity(torch.from_numpy(x).view(-1, 16, 16), np.repeat(np.arange(groups), per_group))
    assert got == pytest.approx(expected, rel=0.01)


def test_diversity_averages_groups_equally_and_skips_singletons():
    x = np.array([[0.0], [1.0], [0.0], [3.0], [0.0], [3.0], [100.0]])
    groups = np.array([0, 0, 1, 1, 1, 1, 2])
    # Group 0: one pair at distance 1. Group 1: pairs (0,3,0,3) -> distances 3,0,3,3,0,3 -> mean 2. Group 2 skipped.
    assert metrics.pairwise_diversity(x, groups) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="two or more"):
        metrics.pairwise_diversity(x[:1], groups[:1])
    with pytest.raises(ValueError, match="metric"):
        metrics.pairwise_diversity(x, groups, metric="lpips")


def test_cosine_diversity():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, -1.0]])
    assert metrics.pairwise_diversity(x[:2], [0, 0], metric="cosine") == pytest.approx(1.0)
    assert metrics.pairwise_diversity(x[2:], [0, 0], metric="cosine") == pytest.approx(2.0)


def test_to_grey_accepts_pipeline_formats():
    images, _ = real_digits("test")
    images = images[:4]
    reference = metrics.to_grey(images)
    assert reference.shape == (4, 1, 16, 16)
    nhwc = images.permute(0, 2, 3, 1).numpy()
    torch.testing.assert_close(metrics.to_grey(nhwc), reference)
    torch.testing.assert_close(metrics.to_grey(images[:, 0]), reference)
    from PIL import Image

    pil = [Image.fromarray((image * 255).round().astype(np.uint8)) for image in nhwc]
    torch.testing.assert_close(metrics.to_grey(pil), reference, atol=1 / 255, rtol=0)
    upsampled = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    torch.testing.assert_close(metrics.to_grey(upsampled), reference)


def test_classifier_is_deterministic():
    a, b = metrics.DigitClassifier(seed=3, epochs=1), metrics.DigitClassifier(seed=3, epochs=1)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_classifier_heldout_accuracy():
    classifier = metrics.digit_classifier()
    assert classifier.test_accuracy > 0.95
    images, labels = real_digits("test")
    feats = metrics.features(images)
    assert feats.shape == (len(images), metrics.FEATURE_DIM)
    assert metrics.predict(images).shape == (len(images),)


def test_prompt_accuracy_of_real_digits():
    images, labels = real_digits("test")
    assert metrics.prompt_accuracy(images, labels) > 0.9
    # Wrong labels are caught: shifting every label by one makes almost all of them wrong.
    assert metrics.prompt_accuracy(images, (labels + 1) % 10) < 0.1


def test_digit_metrics_real_vs_real():
    train, _ = real_digits("train")
    test, labels = real_digits("test")
    out = metrics.digit_metrics(test, labels, reference_images=train)
    assert out["accuracy"] > 0.9
    assert 0 < out["feature_cosine_similarity"] < 1
    assert out["pixel_diversity"] > 0
    # Real test digits are much closer to real train digits than to blank images.
    blank = torch.zeros(50, 3, 16, 16)
    assert out["frechet_distance"] < 0.1 * metrics.frechet_distance(metrics.features(blank), metrics.features(test))
