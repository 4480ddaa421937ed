"""Family adapters: lookup, size rules, timestep conventions of `velocity`, teacher routing, dynamic shift."""

import pytest
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from diffusers_pdmd import tiny
from diffusers_pdmd.families import FAMILIES, QwenImageFamily, WanFamily, get_family


@pytest.fixture(scope="module")
def pipes():
    return {name: tiny.build_pipeline(name) for name in FAMILIES}


SIZES = {
    "qwen-image": (32, 32, None),
    "wan2.2-t2v-a14b": (16, 16, 5),
    "wan2.2-i2v-a14b": (16, 16, 5),
    "wan2.2-ti2v-5b": (32, 32, 5),
}


def test_get_family_by_name_and_unknown():
    assert get_family("qwen-image").name == "qwen-image"
    a14b, ti2v = get_family("wan2.2-t2v-a14b"), get_family("wan2.2-ti2v-5b")
    assert a14b.transformer_names == ("transformer", "transformer_2") and a14b.boundary_ratio == 0.875
    assert ti2v.transformer_names == ("transformer",) and ti2v.expand_timesteps
    with pytest.raises(ValueError, match="qwen-image.*wan2.2-t2v-a14b.*wan2.2-ti2v-5b"):
        get_family("flux")
    with pytest.raises(ValueError, match="family name"):
        get_family(42)


@pytest.mark.parametrize("name", FAMILIES)
def test_get_family_inferred_from_pipeline_and_components(pipes, name):
    assert get_family(pipes[name]).name == name
    assert get_family(tiny.build_components(name)).name == name


def test_single_transformer_wan21_is_rejected(pipes):
    pipe = pipes["wan2.2-t2v-a14b"]
    components = {**pipe.components, "transformer_2": None, "boundary_ratio": None, "expand_timesteps": False}
    with pytest.raises(ValueError, match="Wan2.1"):
        get_family(components)


def test_geometry_is_read_from_the_modules(pipes):
    assert get_family(pipes["qwen-image"]).vae_scale_factor == 4  # tiny VAE: 2 downsamplings
    ti2v = get_family(pipes["wan2.2-ti2v-5b"])
    assert (ti2v.vae_scale_factor_spatial, ti2v.vae_scale_factor_temporal, ti2v.patch_size) == (16, 4, (1, 2, 2))


@pytest.mark.parametrize(
    ("family", "args", "arg"),
    [
        (QwenImageFamily(8), (1000, 1024, None), "height"),
        (QwenImageFamily(8), (1024, 0, None), "width"),
        (QwenImageFamily(8), (1024, 1024, 5), "num_frames"),
        (WanFamily("wan2.2-t2v-a14b", 0.875, False), (480, 830, 81), "width"),
        (WanFamily("wan2.2-t2v-a14b", 0.875, False), (480, 832, 80), "num_frames"),
        (WanFamily("wan2.2-t2v-a14b", 0.875, False), (480, 832, None), "num_frames"),
        (WanFamily("wan2.2-ti2v-5b", None, True, vae_scale_factor_spatial=16), (720, 1280, 121), "height"),
    ],
)
def test_check_size_names_the_argument_and_rule(family, args, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        family.check_size(*args)


def test_check_size_accepts_the_released_sizes():
    get_family("qwen-image").check_size(1328, 1328)
    get_family("wan2.2-t2v-a14b").check_size(480, 832, 81)
    get_family("wan2.2-ti2v-5b").check_size(704, 1280, 121)


def test_teacher_transformer_for_sigma():
    a14b = get_family("wan2.2-t2v-a14b")
    assert a14b.teacher_transformer_for_sigma(0.875) == "transformer"  # as WanPipeline: t >= boundary
    assert a14b.teacher_transformer_for_sigma(0.874) == "transformer_2"
    assert get_family("wan2.2-ti2v-5b").teacher_transformer_for_sigma(0.1) == "transformer"
    assert get_family("qwen-image").teacher_transformer_for_sigma(0.1) == "transformer"


def test_mu(pipes):
    pipe = pipes["qwen-image"]
    cfg = pipe.scheduler.config
    expected = calculate_shift(64, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    assert get_family(pipe).mu(pipe, 64) == pytest.approx(expected)
    assert get_family(pipe).mu(pipe, torch.zeros(1, 64, 16)) == pytest.approx(expected)
    assert get_family(pipes["wan2.2-t2v-a14b"]).mu(pipes["wan2.2-t2v-a14b"], 64) is None


class _Recorder(torch.nn.Module):
    """Wraps a transformer and records the timestep it is called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.timesteps = []

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def config(self):
        return self.inner.config

    def forward(self, **kwargs):
        self.timesteps.append(kwargs["timestep"])
        return self.inner(**kwargs)


@pytest.mark.parametrize("name", FAMILIES)
def test_velocity_shape_convention_and_per_sample_sigma(pipes, name):
    pipe = pipes[name]
    family = get_family(pipe)
    h, w, f = SIZES[name]
    generator = torch.Generator().manual_seed(0)
    x = family.prepare_latents(pipe, 2, h, w, f, generator, "cpu", torch.float32)
    assert tuple(x.shape) == family.latent_shape(pipe, 2, h, w, f)
    cond = family.encode_prompt(pipe, ["a cat", "a dog"], "cpu", max_sequence_length=32)
    cond.update(family.size_cond(h, w, f, batch_size=2))
    if family.image_concat:
        cond.update(family.encode_image(pipe, torch.rand(1, 3, h, w) * 2 - 1, 2, h, w, f, "cpu"))
    sigma = torch.tensor([0.9, 0.3])
    model = _Recorder(pipe.transformer)
    v = family.velocity(model, x, sigma, cond)
    assert v.shape == x.shape
    t = model.timesteps[0]
    if name == "qwen-image":
        torch.testing.assert_close(t, sigma)  # Qwen-Image takes sigma
    elif name in ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"):
        torch.testing.assert_close(t, sigma * 1000)  # Wan takes 1000 * sigma
    else:
        assert t.shape == (2, x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2))  # one timestep per token
        torch.testing.assert_close(t, (sigma * 1000)[:, None].expand_as(t))
    # A batch with two noise levels equals the two samples run alone.
    for i in range(2):
        one = {k: (v_[i : i + 1] if isinstance(v_, torch.Tensor) else v_) for k, v_ in cond.items()}
        if "img_shapes" in one:
            one["img_shapes"] = one["img_shapes"][:1]
        torch.testing.assert_close(
            family.velocity(pipe.transformer, x[i : i + 1], sigma[i : i + 1], one), v[i : i + 1], atol=1e-5, rtol=1e-5
        )


def test_ti2v_image_condition_zeroes_first_frame_timesteps(pipes):
    pipe = pipes["wan2.2-ti2v-5b"]
    family = get_family(pipe)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    x = family.prepare_latents(pipe, 1, 32, 32, 5, torch.Generator().manual_seed(0), "cpu", torch.float32)
    cond = family.encode_prompt(pipe, ["a cat"], "cpu", max_sequence_length=32)
    cond.update(family.encode_image(pipe, image, 1, 32, 32, 5, "cpu"))
    model = _Recorder(pipe.transformer)
    family.velocity(model, x, torch.tensor([0.5]), cond)
    tokens_per_frame = (x.shape[3] // 2) * (x.shape[4] // 2)
    t = model.timesteps[0]
    assert torch.all(t[:, :tokens_per_frame] == 0) and torch.all(t[:, tokens_per_frame:] == 500)
    conditioned = family.apply_condition(x, cond)
    torch.testing.assert_close(conditioned[:, :, :1], cond["condition"])
    torch.testing.assert_close(conditioned[:, :, 1:], x[:, :, 1:])
    with pytest.raises(ValueError, match="image-to-video family"):
        get_family(pipes["wan2.2-t2v-a14b"]).encode_image(pipes["wan2.2-t2v-a14b"], image, 1, 16, 16, 5, "cpu")


def test_qwen_velocity_needs_img_shapes_for_non_square(pipes):
    pipe = pipes["qwen-image"]
    family = get_family(pipe)
    x = family.prepare_latents(pipe, 1, 32, 64, None, torch.Generator().manual_seed(0), "cpu", torch.float32)
    cond = family.encode_prompt(pipe, ["a cat"], "cpu", max_sequence_length=32)
    with pytest.raises(ValueError, match="img_shapes"):
        family.velocity(pipe.transformer, x, torch.tensor([0.5]), cond)
    v = family.velocity(pipe.transformer, x, torch.tensor([0.5]), {**cond, **family.size_cond(32, 64)})
    assert v.shape == x.shape


def test_i2v_a14b_matches_wan_image_to_video_pipeline():
    """The family's conditioning (mask + image latents concatenated to the input) and routing are the diffusers
    pipeline's: a PhasedMoEPipeline with the teacher's own transformers gives WanImageToVideoPipeline's latents."""
    from PIL import Image

    from diffusers_pdmd import PhasedDMDScheduler, PhasedMoEPipeline

    base = tiny.build_pipeline("wan2.2-i2v-a14b")
    assert get_family(base).name == "wan2.2-i2v-a14b" and get_family(base).teacher_transformer_for_sigma(0.89) == (
        "transformer_2"
    )
    # At exactly a boundary WanImageToVideoPipeline uses the high-noise transformer and a phase starts: keep off it.
    scheduler = PhasedDMDScheduler.from_config(base.scheduler.config, phase_boundaries=[0.89], steps_per_phase=[2, 2])
    parts = {k: getattr(base, k) for k in ("vae", "text_encoder", "tokenizer", "transformer", "transformer_2")}
    pipe = PhasedMoEPipeline(scheduler=scheduler, **parts, boundary_ratio=0.9)
    image = Image.fromarray((torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    embeds = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(1))
    kwargs = {"prompt_embeds": embeds, "image": image, "height": 16, "width": 16, "num_frames": 5}
    ours = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").frames
    base.scheduler = PhasedDMDScheduler.from_config(scheduler.config)
    theirs = base(
        **kwargs,
        guidance_scale=1.0,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).frames
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="`image`"):
        pipe(prompt_embeds=embeds, height=16, width=16, num_frames=5)
