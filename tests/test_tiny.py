"""Tests of the tiny random-weight pipelines (`diffusers_pdmd.tiny`)."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_pdmd import tiny


# Smallest valid sizes: Qwen VAE factor 4 x patch 2; Wan2.1 VAE 8 x 2; Wan2.2 VAE 16 x 2; 5 frames -> 2 latent frames.
CALL_KWARGS = {
    "qwen-image": {"height": 32, "width": 32},
    "wan2.2-t2v-a14b": {"height": 16, "width": 16, "num_frames": 5},
    "wan2.2-i2v-a14b": {"height": 16, "width": 16, "num_frames": 5},
    "wan2.2-ti2v-5b": {"height": 32, "width": 32, "num_frames": 5},
}
EXPECTED_SHAPE = {
    "qwen-image": (1, 32, 32, 3),
    "wan2.2-t2v-a14b": (1, 5, 16, 16, 3),
    "wan2.2-i2v-a14b": (1, 5, 16, 16, 3),
    "wan2.2-ti2v-5b": (1, 5, 32, 32, 3),
}
PROMPTS = ("a handwritten digit seven", "a handwritten digit one")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family built in memory and saved once: {family: (in-memory pipeline, folder)}."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for family in tiny.FAMILIES:
        pipe = tiny.build_pipeline(family, seed=0)
        pipe.save_pretrained(root / family, safe_serialization=True)
        out[family] = (pipe, root / family)
    return out


def _generate(pipe, family, prompt=PROMPTS[0], **kwargs):
    pipe.set_progress_bar_config(disable=True)
    if family == "wan2.2-i2v-a14b":
        # WanImageToVideoPipeline needs `ftfy` to encode prompts; the text encoder is WanPipeline's anyway.
        from PIL import Image

        parts = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "image_processor")}
        embeds = _prompt_embeds(tiny.pipeline_class("wan2.2-t2v-a14b")(**parts), family, prompt)
        kwargs.update(prompt_embeds=embeds, negative_prompt_embeds=embeds, image=Image.new("RGB", (16, 16), "red"))
        prompt = None
    out = pipe(
        prompt=prompt,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **CALL_KWARGS[family],
        **kwargs,
    )
    return np.asarray(out.images if family == "qwen-image" else out.frames)


def _prompt_embeds(pipe, family, prompt):
    if family == "qwen-image":
        return pipe.encode_prompt(prompt, device="cpu")[0]
    return pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=16, device="cpu")[0]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_save_load_generate(saved, family):
    pipe, folder = saved[family]
    assert (folder / "model_index.json").is_file()
    assert not list(folder.rglob("*.bin")), "weights must be saved as safetensors only"
    loaded = tiny.pipeline_class(family).from_pretrained(folder)
    assert type(loaded) is type(pipe)

    expected = _generate(pipe, family)
    got = _generate(loaded, family)
    assert got.shape == EXPECTED_SHAPE[family]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("family", [f for f in tiny.FAMILIES if f != "wan2.2-i2v-a14b"])  # same encoder as t2v
def test_prompts_give_different_embeddings(saved, family):
    pipe, _ = saved[family]
    first, second = (_prompt_embeds(pipe, family, prompt) for prompt in PROMPTS)
    assert first.shape[1] > 0 and torch.isfinite(first).all()
    assert first.shape == second.shape  # same number of tokens: "seven" and "one" are single tokens
    assert not torch.allclose(first, second)


def test_qwen_template_prefix_is_dropped_exactly(saved):
    pipe, _ = saved["qwen-image"]
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    prefix = template.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == drop == 34  # same length as with the real Qwen tokenizer
    prompt_ids = pipe.tokenizer(template.format(PROMPTS[0])).input_ids[drop:]
    assert pipe.tokenizer.decode(prompt_ids).startswith(PROMPTS[0])
    assert max(pipe.tokenizer.get_vocab().values()) < pipe.text_encoder.config.text_config.vocab_size


def test_wan_tokenizer_pads_to_max_length():
    tokenizer = tiny.build_tokenizer("wan2.2-t2v-a14b")
    batch = tokenizer(list(PROMPTS), padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 32)
    assert batch.attention_mask.sum(1).tolist() == [5, 5]  # 4 known words + </s>
    assert batch.input_ids[0, 4] == tokenizer.eos_token_id and batch.input_ids[0, 5] == tokenizer.pad_token_id
    assert tokenizer("zebra!").input_ids[-1] == tokenizer.eos_token_id  # unknown words fall back to bytes
    assert not torch.equal(batch.input_ids[0], batch.input_ids[1])


def test_a14b_has_two_experts(saved):
    pipe, folder = saved["wan2.2-t2v-a14b"]
    loaded = tiny.pipeline_class("wan2.2-t2v-a14b").from_pretrained(folder)
    assert loaded.config.boundary_ratio == 0.875
    assert not loaded.config.expand_timesteps
    assert loaded.transformer_2 is not None
    first = dict(loaded.transformer.named_parameters())
    assert any(not torch.equal(p, first[n]) for n, p in loaded.transformer_2.named_parameters())
    assert loaded.scheduler.config.flow_shift == 12.0


def test_i2v_a14b_config(saved):
    pipe, folder = saved["wan2.2-i2v-a14b"]
    loaded = tiny.pipeline_class("wan2.2-i2v-a14b").from_pretrained(folder)
    assert type(loaded).__name__ == "WanImageToVideoPipeline"
    assert loaded.config.boundary_ratio == 0.9 and not loaded.config.expand_timesteps
    assert loaded.transformer_2 is not None and loaded.image_encoder is None
    for module in (loaded.transformer, loaded.transformer_2):  # noisy latents + 4 mask channels + image latents
        assert module.config.in_channels == 2 * loaded.vae.config.z_dim + 4
        assert module.config.out_channels == loaded.vae.config.z_dim
    assert loaded.scheduler.config.flow_shift == 5.0


def test_ti2v_config_and_image_to_video(saved):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    t2v, folder = saved["wan2.2-ti2v-5b"]
    assert t2v.config.expand_timesteps and t2v.config.boundary_ratio is None and t2v.transformer_2 is None
    assert t2v.vae.config.z_dim == 48 and t2v.vae.config.patch_size == 2 and t2v.vae.config.scale_factor_spatial == 16

    i2v = WanImageToVideoPipeline.from_pretrained(folder)
    i2v.set_progress_bar_config(disable=True)
    assert i2v.config.expand_timesteps and i2v.image_encoder is None
    # WanImageToVideoPipeline (diffusers 0.42.1) needs ftfy to clean text prompts: pass embeddings instead.
    embeds = t2v.encode_prompt(PROMPTS[0], negative_prompt="", max_sequence_length=16, device="cpu")
    frames = i2v(
        image=Image.new("RGB", (32, 32), (200, 30, 30)),
        prompt_embeds=embeds[0],
        negative_prompt_embeds=embeds[1],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **CALL_KWARGS["wan2.2-ti2v-5b"],
    ).frames
    assert np.asarray(frames).shape == EXPECTED_SHAPE["wan2.2-ti2v-5b"]
    assert np.isfinite(frames).all()


def test_build_is_deterministic_and_seeded():
    first = tiny.build_components("wan2.2-ti2v-5b", seed=0)["transformer"]
    again = tiny.build_components("wan2.2-ti2v-5b", seed=0)["transformer"]
    other = tiny.build_components("wan2.2-ti2v-5b", seed=1)["transformer"]
    weight = "proj_out.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


def test_overrides():
    components = tiny.build_components("qwen-image", transformer_kwargs={"num_layers": 1}, vae_kwargs={"z_dim": 8})
    assert components["transformer"].config.num_layers == 1
    assert components["vae"].config.latents_mean == [0.0] * 8


def test_unknown_family():
    with pytest.raises(ValueError, match="family"):
        tiny.build_components("sdxl")


def _run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    src = str(pathlib.Path(tiny.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "diffusers_pdmd.tiny", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_cli(tmp_path):
    result = _run_cli("qwen-image", str(tmp_path / "q"), "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "q" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()

    result = _run_cli("not-a-family", str(tmp_path / "x"))
    assert result.returncode != 0
    assert "invalid choice" in result.stderr
    assert not (tmp_path / "x").exists()
