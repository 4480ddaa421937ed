"""PhasedMoEPipeline behaves like the family pipelines of diffusers: `guidance_scale`, `encode_prompt`, precomputed
negative embeddings, `variant`, `dtype=`, and loading several experts without peft warnings."""

import logging
import warnings

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline, WanPipeline
from test_pipeline_phased_moe import PHASES, SIZES, add_lora, phased  # noqa: F401  (the shared tiny set-up)

from diffusers_pdmd import tiny
from diffusers_pdmd.families import get_family
from diffusers_pdmd.pipelines import PhasedMoEPipeline


def run(pipe, prompt="a cat", **kwargs):
    family = get_family(pipe)
    defaults = {"generator": torch.Generator().manual_seed(0), "output_type": "np", "max_sequence_length": 32}
    kwargs = {**defaults, **SIZES[family.name], **kwargs}
    out = pipe(prompt, **kwargs)
    return out.frames if family.is_video else out.images


PIPE_LOGGER = "diffusers_pdmd.pipelines.pipeline_phased_moe"


# ---------------------------------------------------------------------------------------------- guidance_scale


def test_qwen_guidance_scale_is_ignored_with_a_warning_like_qwen_image_pipeline(caplog):
    pipe = phased("qwen-image", tiny.build_components("qwen-image"))
    with caplog.at_level(logging.WARNING, logger=PIPE_LOGGER):
        guided = run(pipe, guidance_scale=4.0)
    assert any("`guidance_scale`=4.0 is ignored" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(guided, run(pipe))  # not guidance-distilled: no effect, as in QwenImagePipeline


class _Stop(Exception):
    pass


def _first_transformer_call(pipe_call, transformer) -> dict:
    """The keyword arguments of the first transformer call made by `pipe_call()` (which is then stopped)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)
        raise _Stop

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(_Stop):
            pipe_call()
    finally:
        handle.remove()
    return seen


def test_guidance_distilled_qwen_transformer_gets_guidance_scale_as_in_qwen_image_pipeline():
    # diffusers 0.42.1's QwenImageTransformer2DModel cannot run with guidance_embeds=True (its timestep embedding
    # takes no guidance), so the call is stopped at the transformer and its inputs compared.
    components = tiny.build_components("qwen-image", transformer_kwargs={"guidance_embeds": True})
    pipe = phased("qwen-image", components)
    kwargs = {"height": 32, "width": 32, "max_sequence_length": 32, "output_type": "latent"}
    ours = _first_transformer_call(
        lambda: pipe(["a cat", "a dog"], guidance_scale=3.5, **kwargs), components["transformer"]
    )
    theirs_pipe = QwenImagePipeline(**components)
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs = _first_transformer_call(
        lambda: theirs_pipe(["a cat", "a dog"], guidance_scale=3.5, num_inference_steps=2, **kwargs),
        components["transformer"],
    )
    assert theirs["guidance"] is not None
    torch.testing.assert_close(ours["guidance"], theirs["guidance"])
    with pytest.raises(ValueError, match="`guidance_scale` is required"):
        pipe("a cat", **kwargs)


# ---------------------------------------------------------------------------------------------- encode_prompt


def test_encode_prompt_returns_what_the_qwen_image_pipeline_returns():
    components = tiny.build_components("qwen-image")
    pipe = phased("qwen-image", components)
    prompts = ["a cat", "a very large brown dog sitting on the grass"]
    embeds, mask = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=32)
    ref_embeds, ref_mask = QwenImagePipeline(**components).encode_prompt(prompts, device="cpu", max_sequence_length=32)
    torch.testing.assert_close(embeds, ref_embeds)
    torch.testing.assert_close(mask, ref_mask)
    assert mask is not None and not mask.all()  # the shorter prompt is padded
    from_embeds = pipe(
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        generator=torch.Generator().manual_seed(0),
        height=32,
        width=32,
        output_type="np",
    ).images
    np.testing.assert_allclose(from_embeds, run(pipe, prompt=prompts, generator=torch.Generator().manual_seed(0)))


def test_encode_prompt_returns_what_the_wan_pipeline_returns():
    components = tiny.build_components("wan2.2-ti2v-5b")
    pipe = phased("wan2.2-ti2v-5b", components)
    ours = pipe.encode_prompt("a cat", negative_prompt="blurry", device="cpu", max_sequence_length=32)
    theirs = WanPipeline(**components).encode_prompt(
        "a cat", negative_prompt="blurry", device="cpu", max_sequence_length=32
    )
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_negative_prompt_embeds_without_mask_with_a_text_prompt():
    # QwenImagePipeline takes `negative_prompt_embeds` without its mask (all tokens valid) next to a text prompt.
    pipe = phased("qwen-image", tiny.build_components("qwen-image"))
    negative_embeds, negative_mask = pipe.encode_prompt("blurry", device="cpu", max_sequence_length=32)
    assert negative_mask is None  # one prompt: no padding, so no mask to pass
    from_embeds = run(pipe, negative_prompt_embeds=negative_embeds, true_cfg_scale=3.0)
    np.testing.assert_allclose(from_embeds, run(pipe, negative_prompt="blurry", true_cfg_scale=3.0), atol=1e-6)


# ---------------------------------------------------------------------------------------------- variant, dtype


def test_variant_save_and_load_of_lora_experts(tmp_path):
    base_dir = tiny.save_pipeline("qwen-image", tmp_path / "base")
    components = tiny.build_components("qwen-image")
    add_lora(components["transformer"], "first", seed=3)
    add_lora(components["transformer"], "second", seed=4)
    pipe = phased("qwen-image", components, experts=[("transformer", "first"), ("transformer", "second")])
    pipe.register_to_config(base_model=str(base_dir))
    expected = run(pipe)
    pipe.save_pretrained(tmp_path / "experts", experts_only=True, variant="fp16")
    pipe.save_pretrained(tmp_path / "full", variant="fp16")
    for k in (0, 1):
        for form in ("experts", "full"):
            names = sorted(p.name for p in (tmp_path / form / f"phase_{k}").iterdir())
            assert names == ["pytorch_lora_weights.fp16.safetensors"], (form, names)
    assert (tmp_path / "full" / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    for folder in ("experts", "full"):
        loaded = PhasedMoEPipeline.from_pretrained(tmp_path / folder, variant="fp16")
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(run(loaded), expected, atol=1e-6, rtol=0, err_msg=folder)
    with pytest.raises(ValueError, match="pytorch_lora_weights.safetensors"):
        PhasedMoEPipeline.from_pretrained(tmp_path / "experts")  # no plain files were written


def test_from_pretrained_takes_dtype_and_deprecated_torch_dtype(tmp_path):
    base_dir = tiny.save_pipeline("qwen-image", tmp_path / "base")
    pipe = phased("qwen-image", tiny.build_components("qwen-image"))
    pipe.save_pretrained(tmp_path / "experts", experts_only=True, base_model=str(base_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        loaded = PhasedMoEPipeline.from_pretrained(tmp_path / "experts", dtype=torch.bfloat16)
    assert loaded.transformer.dtype == torch.bfloat16
    with pytest.warns(FutureWarning, match="torch_dtype"):
        loaded = PhasedMoEPipeline.from_pretrained(tmp_path / "experts", torch_dtype=torch.bfloat16)
    assert loaded.transformer.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="both `dtype` and `torch_dtype`"):
        PhasedMoEPipeline.from_pretrained(tmp_path / "experts", dtype=torch.float32, torch_dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- no peft warning


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


def test_loading_two_lora_experts_warns_nothing(tmp_path):
    # peft warns "Already found a `peft_config` attribute" for every adapter after the first; one adapter per phase is
    # the design, so loading must not pass that warning on (nor any other, through `warnings` or diffusers' logger).
    base_dir = tiny.save_pipeline("qwen-image", tmp_path / "base")
    components = tiny.build_components("qwen-image")
    add_lora(components["transformer"], "first", seed=3)
    add_lora(components["transformer"], "second", seed=4)
    pipe = phased("qwen-image", components, experts=[("transformer", "first"), ("transformer", "second")])
    pipe.save_pretrained(tmp_path / "experts", experts_only=True, base_model=str(base_dir))
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers", "diffusers_pdmd")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = PhasedMoEPipeline.from_pretrained(tmp_path / "experts")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert sorted(loaded.transformer.peft_config) == ["phase_0", "phase_1"]
    assert [str(w.message) for w in caught] == []
    assert handler.messages == []


# ---------------------------------------------------------------------------------------------- diffusers' idioms


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("family", ["qwen-image", "wan2.2-t2v-a14b"])
def test_callback_can_raise_the_guidance_scale(family, lora):
    # diffusers' PipelineTesterMixin.test_callback_cfg: `pipe._guidance_scale += 1.0` at every step end.
    components = tiny.build_components(family)
    experts = None
    if lora:
        slots = ["transformer"] * 2 if family == "qwen-image" else ["transformer", "transformer_2"]
        for k, slot in enumerate(slots):
            add_lora(components[slot], f"phase_{k}", seed=k)
        experts = [(slot, f"phase_{k}") for k, slot in enumerate(slots)]
    pipe = phased(family, components, experts=experts)

    def raise_guidance(pipe, i, t, callback_kwargs):
        pipe._guidance_scale += 1.0
        return callback_kwargs

    run(pipe, guidance_scale=2.0, callback_on_step_end=raise_guidance)
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps


@pytest.mark.parametrize("family", ["qwen-image", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b"])
def test_a_pipeline_of_text_components_only_encodes_prompts(family):
    # diffusers' PipelineTesterMixin.test_encode_prompt_works_in_isolation builds the pipeline with every component
    # but the text encoder and tokenizer set to None.
    pipe = phased(family, tiny.build_components(family))
    text_only = {k: (v if k in ("text_encoder", "tokenizer") else None) for k, v in pipe.components.items()}
    alone = PhasedMoEPipeline(**text_only)
    ours = alone.encode_prompt("a cat", device="cpu", max_sequence_length=32)
    theirs = pipe.encode_prompt("a cat", device="cpu", max_sequence_length=32)
    for a, b in zip(ours, theirs):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b)
    assert alone.config.family.startswith("qwen") == family.startswith("qwen")
    with pytest.raises(ValueError, match="`scheduler`"):
        alone("a cat", **SIZES.get(family, {"height": 32, "width": 32, "num_frames": 5}))
