"""Tests of the digits teacher (`diffusers_pdmd.digits`): data, on-disk format, latent convention, shipped teacher."""

import json

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from safetensors.torch import load_file

from diffusers_pdmd import digits


@pytest.fixture(scope="module")
def quick_teacher(tmp_path_factory):
    """A teacher built through the CLI with two training steps per model (format checks only, not quality)."""
    out = tmp_path_factory.mktemp("digits") / "teacher"
    args = ["build-teacher", str(out), "--steps", "2", "--vae-steps", "2", "--threads", "1"]
    assert digits.main(args) == 0
    return out


def _pipe(path):
    pipe = QwenImagePipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_prompts():
    assert len(digits.PROMPTS) == 10 and len(set(digits.PROMPTS)) == 10
    assert digits.prompt_for(7) == "a handwritten digit seven"
    assert digits.prompt_for(np.int64(0)) == "a handwritten digit zero"
    assert all(digits.label_for(digits.prompt_for(k)) == k for k in range(10))
    with pytest.raises(ValueError, match="label"):
        digits.prompt_for(10)


def test_real_digits():
    train_x, train_y = digits.real_digits("train")
    test_x, test_y = digits.real_digits("test")
    assert train_x.shape == (1437, 3, 16, 16) and test_x.shape == (360, 3, 16, 16)
    assert train_x.dtype == torch.float32 and 0 <= train_x.min() and train_x.max() <= 1
    assert torch.equal(train_x[:, 0], train_x[:, 2])
    assert sorted(set(train_y.tolist())) == list(range(10)) and np.bincount(test_y).min() >= 35
    all_x, _ = digits.real_digits("all", size=8)
    assert all_x.shape == (1797, 3, 8, 8)


def test_quick_teacher_loads_and_samples(quick_teacher):
    info = json.loads((quick_teacher / "digits_teacher.json").read_text())
    assert info["transformer_steps"] == 2 and info["vae_steps"] == 2
    pipe = _pipe(quick_teacher)
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder.config.text_config.hidden_size
    assert pipe.vae_scale_factor == 2 and len(pipe.vae.config.latents_mean) == pipe.vae.config.z_dim
    out = pipe(
        [digits.prompt_for(3), digits.prompt_for(8)],
        negative_prompt=[""] * 2,
        true_cfg_scale=3.0,
        num_inference_steps=3,
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (2, 16, 16, 3) and np.isfinite(out).all()


def test_latent_convention_matches_pipeline(quick_teacher):
    """`decode_latents` of the pipeline's packed output latents reproduces the pipeline's own decoded images."""
    pipe = _pipe(quick_teacher)
    pipe.vae.register_to_config(latents_mean=[0.5, -1.0, 0.0, 2.0], latents_std=[2.0, 0.5, 1.0, 3.0])
    kwargs = {"num_inference_steps": 2, "height": 16, "width": 16}
    packed = pipe(digits.PROMPTS[1], generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images
    images = pipe(digits.PROMPTS[1], generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
    latents = pipe._unpack_latents(packed, 16, 16, pipe.vae_scale_factor)[:, :, 0]
    torch.testing.assert_close(digits.decode_latents(pipe.vae, latents), images, atol=1e-5, rtol=0)
    # encode_latents is the inverse normalisation: mean 0, std 1 per channel on the set the stats come from.
    real, _ = digits.real_digits("test")
    digits.set_latent_stats(pipe.vae, real)
    z = digits.encode_latents(pipe.vae, real)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)


def test_build_is_deterministic(quick_teacher, tmp_path):
    again = digits.build_digits_teacher(tmp_path / "again", steps=2, vae_steps=2, num_threads=1, progress=False)
    for part in ("transformer", "vae"):
        a = load_file(quick_teacher / part / "diffusion_pytorch_model.safetensors")
        b = load_file(again / part / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_or_build_teacher_reuses_folders(quick_teacher, tmp_path):
    assert digits.load_or_build_teacher(quick_teacher) == quick_teacher
    if (digits.ASSET_DIR / "model_index.json").is_file():
        assert digits.load_or_build_teacher() == digits.ASSET_DIR
        copied = digits.load_or_build_teacher(tmp_path / "copy")
        assert (copied / "model_index.json").is_file()


@pytest.mark.skipif(not (digits.ASSET_DIR / "model_index.json").is_file(), reason="no shipped digits teacher")
def test_shipped_teacher_follows_prompts():
    from diffusers_pdmd import metrics

    pipe = _pipe(digits.ASSET_DIR)
    labels = torch.arange(10).repeat(4)
    images = digits.sample_digits(pipe, labels, num_inference_steps=16, true_cfg_scale=digits.TRUE_CFG_SCALE, seed=0)
    assert images.shape == (40, 3, 16, 16)
    assert metrics.prompt_accuracy(images, labels) >= 0.8
