"""Released experts in their published key layouts (fabricated at tiny shapes) load with one `from_pretrained` call
and sample exactly as their authors' sampler, re-implemented plainly here."""

import copy
import warnings

import pytest
import torch
from safetensors.torch import save_file

from diffusers_pdmd import PhasedMoEPipeline, tiny
from diffusers_pdmd.released import PRESETS, detect_layout


# Native Wan2.2 module names of diffusers' WanTransformer3DModel modules: the published layout of Wan2.2-Lightning's
# `diffusion_model.blocks.N.<native>.lora_down/lora_up/alpha` keys (written out here to fabricate such files).
WAN_NATIVE = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
# Qwen-Image-Lightning names its modules as diffusers does (bare `transformer_blocks.N.attn.to_q`).
QWEN_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "img_mlp.net.2")
RANK, ALPHA = 4, 8.0


def fabricate_lora(transformer, names: dict, blocks_attr: str, prefix: str, seed: int, diff_b: bool = False):
    """A LoRA file's tensors in a native layout, and the weight deltas alpha / rank * up @ down it stands for."""
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for i, _ in enumerate(getattr(transformer, blocks_attr)):
        for ours, native in names.items():
            module = transformer.get_submodule(f"{blocks_attr}.{i}.{ours}")
            down = torch.randn(RANK, module.in_features, generator=g) * 0.3
            up = torch.randn(module.out_features, RANK, generator=g) * 0.3
            key = f"{prefix}{blocks_attr}.{i}.{native}"
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
            deltas[f"{blocks_attr}.{i}.{ours}"] = (ALPHA / RANK) * up @ down
            if diff_b:
                tensors[f"{key}.diff_b"] = torch.randn(module.out_features, generator=g) * 0.1
                deltas[f"{blocks_attr}.{i}.{ours}.bias"] = tensors[f"{key}.diff_b"]
        if diff_b:  # extracted LoRAs also carry (zero) norm differences, which diffusers drops
            tensors[f"{prefix}{blocks_attr}.{i}.norm3.diff"] = torch.zeros(transformer.config.num_attention_heads)
    return tensors, deltas


def merged(transformer, deltas):
    """The transformer with the LoRA merged into its weights by hand (what the authors' code samples with)."""
    model = copy.deepcopy(transformer)
    with torch.no_grad():
        for name, delta in deltas.items():
            if name.endswith(".bias"):
                model.get_submodule(name.removesuffix(".bias")).bias += delta
            else:
                model.get_submodule(name).weight += delta
    return model


def euler(models_for_t, sigmas, x, velocity):
    """The authors' sampler: Euler on their sigmas, the model chosen by the timestep t = 1000 sigma."""
    sigmas = torch.tensor([*sigmas, 0.0], dtype=torch.float32)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * velocity(models_for_t(1000 * s), x, s)
    return x


@pytest.fixture(scope="module")
def wan_base(tmp_path_factory):
    return tiny.save_pipeline("wan2.2-t2v-a14b", tmp_path_factory.mktemp("wan") / "base")


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory):
    return tiny.save_pipeline("qwen-image", tmp_path_factory.mktemp("qwen") / "base")


def _wan_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, 2, 2, 2, generator=g), torch.randn(1, 6, 32, generator=g)


def _wan_velocity(embeds, concat=None):
    def velocity(model, x, s):
        x_in = x if concat is None else torch.cat([x, concat], dim=1)
        t = (1000 * s).reshape(1)
        return model(hidden_states=x_in, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]

    return velocity


@pytest.mark.parametrize(
    "family, boundary, diff_b",
    [("wan2.2-t2v-a14b", 875, False), ("wan2.2-t2v-a14b", 875, True), ("wan2.2-i2v-a14b", 900, False)],
)
def test_wan22_lightning_matches_authors_sampler(family, boundary, diff_b, tmp_path):
    from PIL import Image

    from diffusers_pdmd.families import get_family

    base_dir = tiny.save_pipeline(family, tmp_path / "base")
    ref = tiny.build_pipeline(family)  # the same weights as the saved base (same seeds)
    high, d_high = fabricate_lora(ref.transformer, WAN_NATIVE, "blocks", "diffusion_model.", 0, diff_b)
    low, d_low = fabricate_lora(ref.transformer_2, WAN_NATIVE, "blocks", "diffusion_model.", 1, diff_b)
    folder = tmp_path / "Wan2.2-A14B-4steps-lora-rank64-Seko"
    folder.mkdir()
    save_file(high, folder / "high_noise_model.safetensors")
    save_file(low, folder / "low_noise_model.safetensors")

    pipe = PhasedMoEPipeline.from_pretrained(base_dir, experts=folder)
    assert pipe.config.method == f"{family}-lightning"
    x, embeds = _wan_inputs()
    authors = [1.0, 0.9375, 5 / 6, 0.625]  # shift 5 on linspace(1, 0, 5)[:-1], as the authors compute them
    kwargs, concat = {}, None
    if family == "wan2.2-i2v-a14b":
        kwargs["image"] = Image.new("RGB", (16, 16), (200, 40, 90))
        concat = get_family(ref).encode_image(ref, kwargs["image"], 1, 16, 16, 5, "cpu")["concat_condition"]
    out = pipe(
        prompt_embeds=embeds, latents=x.clone(), output_type="latent", height=16, width=16, num_frames=5, **kwargs
    )

    hi, lo = merged(ref.transformer, d_high), merged(ref.transformer_2, d_low)
    expected = euler(lambda t: hi if t >= boundary else lo, authors, x, _wan_velocity(embeds, concat))
    torch.testing.assert_close(out.frames, expected, atol=1e-5, rtol=1e-5)
    # Saved in our format (its config names the base it was loaded on) they load back as the same sampler.
    with warnings.catch_warnings(record=True) as caught:  # peft's false "invalid shape" for the biases of .diff_b
        warnings.simplefilter("always")
        pipe.save_pretrained(tmp_path / "ours", experts_only=True)
    assert not [w for w in caught if "invalid shape" in str(w.message)]
    resaved = PhasedMoEPipeline.from_pretrained(tmp_path / "ours")
    again = resaved(
        prompt_embeds=embeds, latents=x.clone(), output_type="latent", height=16, width=16, num_frames=5, **kwargs
    )
    torch.testing.assert_close(again.frames, expected, atol=1e-5, rtol=1e-5)
    # The authors' grid passed explicitly, their threshold as the (off-grid) phase boundary: the same sampler.
    from diffusers_pdmd import PhasedDMDScheduler

    pipe.scheduler = PhasedDMDScheduler(phase_boundaries=[boundary / 1000], steps_per_phase=[2, 2])
    pipe.set_experts(pipe.config.experts, phase_boundaries=[boundary / 1000])
    again = pipe(
        prompt_embeds=embeds,
        latents=x.clone(),
        output_type="latent",
        height=16,
        width=16,
        num_frames=5,
        sigmas=authors,
        **kwargs,
    )
    torch.testing.assert_close(again.frames, expected, atol=1e-5, rtol=1e-5)
    # The LoRAs really changed the output (the test can fail).
    plain = euler(
        lambda t: ref.transformer if t >= boundary else ref.transformer_2, authors, x, _wan_velocity(embeds, concat)
    )
    assert (plain - expected).abs().max() > 1e-3


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
@pytest.mark.parametrize("steps", [4, 8])
def test_qwen_image_lightning_matches_authors_sampler(qwen_base, tmp_path, prefix, steps):
    ref = tiny.build_pipeline("qwen-image")
    names = {m: m for m in QWEN_MODULES}
    tensors, deltas = fabricate_lora(ref.transformer, names, "transformer_blocks", prefix, 0)
    file = tmp_path / f"Qwen-Image-Lightning-{steps}steps-V1.0.safetensors"
    save_file(tensors, file)

    pipe = PhasedMoEPipeline.from_pretrained(qwen_base, experts=file)
    assert pipe.config.method == f"qwen-image-lightning-{steps}steps"
    g = torch.Generator().manual_seed(2)
    x, embeds = torch.randn(1, 16, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    out = pipe(prompt_embeds=embeds, latents=x.clone(), output_type="latent", height=32, width=32)

    # FlowMatchEulerDiscreteScheduler as the authors configure it: N steps, shift exp(log 3) = 3, no CFG.
    sigmas = [3 * s / (1 + 2 * s) for s in torch.linspace(1, 1 / steps, steps).tolist()]
    model = merged(ref.transformer, deltas)

    def velocity(m, x, s):
        t = (1000 * s).reshape(1) / 1000
        return m(
            hidden_states=x, timestep=t, encoder_hidden_states=embeds, img_shapes=[[(1, 4, 4)]], return_dict=False
        )[0]

    expected = euler(lambda t: model, sigmas, x, velocity)
    torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=1e-5)


def test_full_transformer_expert(qwen_base, tmp_path):
    ref = tiny.build_pipeline("qwen-image", seed=7)
    ref.transformer.save_pretrained(tmp_path / "full")
    from diffusers_pdmd import PhasedDMDScheduler

    scheduler = PhasedDMDScheduler(phase_boundaries=[], steps_per_phase=[3], shift=1.0)
    pipe = PhasedMoEPipeline.from_pretrained(qwen_base, experts=tmp_path / "full", scheduler=scheduler)
    assert [e["type"] for e in pipe.config.experts] == ["full"]
    for a, b in zip(pipe.transformer.parameters(), ref.transformer.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_one_of_two_wan_files(wan_base, tmp_path):
    ref = tiny.build_pipeline("wan2.2-t2v-a14b")
    save_file(
        fabricate_lora(ref.transformer, WAN_NATIVE, "blocks", "diffusion_model.", 0)[0],
        tmp_path / "high_noise_model.safetensors",
    )
    with pytest.raises(ValueError, match="low_noise_model.safetensors"):
        PhasedMoEPipeline.from_pretrained(wan_base, experts=tmp_path)


def test_shapes_that_do_not_fit(wan_base, tmp_path):
    other = tiny.build_pipeline("wan2.2-t2v-a14b", transformer_kwargs={"attention_head_dim": 8})
    for name, seed in (("high_noise_model", 0), ("low_noise_model", 1)):
        save_file(
            fabricate_lora(other.transformer, WAN_NATIVE, "blocks", "diffusion_model.", seed)[0],
            tmp_path / f"{name}.safetensors",
        )
    with pytest.raises(ValueError, match=r"high_noise_model\.safetensors.*do not fit"):
        PhasedMoEPipeline.from_pretrained(wan_base, experts=tmp_path)


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_qwen_file_on_wan_base(wan_base, tmp_path, prefix):
    ref = tiny.build_pipeline("qwen-image")
    tensors = fabricate_lora(ref.transformer, {m: m for m in QWEN_MODULES}, "transformer_blocks", prefix, 0)[0]
    for name in ("high_noise_model", "low_noise_model"):
        save_file(tensors, tmp_path / f"{name}.safetensors")
    with pytest.raises(ValueError, match=r"high_noise_model\.safetensors.*another model family"):
        PhasedMoEPipeline.from_pretrained(wan_base, experts=tmp_path)


def test_nonzero_weight_diffs_are_refused(wan_base, tmp_path):
    ref = tiny.build_pipeline("wan2.2-t2v-a14b")
    for name, seed in (("high_noise_model", 0), ("low_noise_model", 1)):
        tensors = fabricate_lora(ref.transformer, WAN_NATIVE, "blocks", "diffusion_model.", seed)[0]
        tensors["diffusion_model.blocks.0.self_attn.q.diff"] = torch.ones(24, 24)
        save_file(tensors, tmp_path / f"{name}.safetensors")
    with pytest.raises(ValueError, match=r"\.diff"):
        PhasedMoEPipeline.from_pretrained(wan_base, experts=tmp_path)


def test_detect_layout(tmp_path):
    with pytest.raises(ValueError, match="holds no experts"):
        detect_layout(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert detect_layout(tmp_path)[0] == "lora"
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="several LoRA files"):
        detect_layout(tmp_path)
    with pytest.raises(ValueError, match="experts_format"):
        detect_layout(tmp_path, "nope")


def test_preset_sigmas_are_what_its_scheduler_makes():
    for preset in PRESETS.values():
        scheduler = preset.scheduler()
        torch.testing.assert_close(scheduler.sigmas[:-1], torch.tensor(preset.sigmas, dtype=torch.float32))


def test_load_experts_on_a_built_pipeline_equals_from_pretrained(qwen_base, tmp_path):
    ref = tiny.build_pipeline("qwen-image")
    tensors = fabricate_lora(ref.transformer, {m: m for m in QWEN_MODULES}, "transformer_blocks", "", 0)[0]
    file = tmp_path / "Qwen-Image-Lightning-4steps-V1.0.safetensors"
    save_file(tensors, file)
    from diffusers_pdmd import PhasedDMDScheduler

    components = tiny.build_components("qwen-image")
    components["scheduler"] = PhasedDMDScheduler.from_config(components["scheduler"].config)
    built = PhasedMoEPipeline(**components)
    built.load_experts(file)
    loaded = PhasedMoEPipeline.from_pretrained(qwen_base, experts=file)
    assert built.config.method == loaded.config.method == "qwen-image-lightning-4steps"
    g = torch.Generator().manual_seed(2)
    x, embeds = torch.randn(1, 16, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    outs = [
        p(prompt_embeds=embeds, latents=x, output_type="latent", height=32, width=32).images for p in (built, loaded)
    ]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)
