"""`Family.encode_real` (fake-on-real's real latents): the pipeline's own decode path inverts its layout and its
normalisation, on the tiny families (with non-trivial `latents_mean` / `latents_std`)."""

import pytest
import torch
from PIL import Image

from diffusers_pdmd import tiny
from diffusers_pdmd.families import get_family


def _pipe(family):
    pipe = tiny.build_pipeline(family)
    z_dim = pipe.vae.config.z_dim
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(z_dim, generator=g) * 0.3, torch.rand(z_dim, generator=g) + 0.5
    pipe.vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    return pipe


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def test_qwen_image_encode_real_is_what_decode_inverts():
    pipe, h, w = _pipe("qwen-image"), 32, 32
    family = get_family(pipe)
    x = family.encode_real(pipe, _image(h, w), h, w)
    assert x.shape == family.latent_shape(pipe, 1, h, w)[1:]  # packed (tokens, 4 C), as the noise is drawn
    # plain: the VAE's mode of the same pixels, decoded by the VAE directly (no normalisation, no packing)
    pixels = pipe.image_processor.preprocess(_image(h, w), height=h, width=w)[:, :, None]
    z = pipe.vae.encode(pixels).latent_dist.mode()
    direct = pipe.image_processor.postprocess(pipe.vae.decode(z, return_dict=False)[0][:, :, 0], output_type="pt")
    decoded = family.decode(pipe, x[None], h, w, None, "pt")
    assert decoded.shape == direct.shape and torch.allclose(decoded, direct, atol=1e-5)
    # the latents are normalised: mean / std applied, so raw `z` differs
    raw = pipe._pack_latents(z[:, :, 0], 1, z.shape[1], z.shape[3], z.shape[4])[0]
    assert not torch.allclose(x, raw, atol=1e-3)


@pytest.mark.parametrize("family_name", ["wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"])
def test_wan_encode_real_of_a_video_and_of_an_image_is_what_decode_inverts(family_name):
    pipe = _pipe(family_name)
    family = get_family(pipe)
    h = w = 16 * family.vae_scale_factor_spatial // 8
    video = torch.rand(5, 3, h, w, generator=torch.Generator().manual_seed(1))  # (F, 3, H, W) in [0, 1]
    for sample, frames in ((video, 5), (_image(h, w), 1)):
        x = family.encode_real(pipe, sample, h, w, frames)
        assert x.shape == family.latent_shape(pipe, 1, h, w, frames)[1:]
        if frames == 1:
            pixels = pipe.video_processor.preprocess(sample, height=h, width=w)[:, :, None]
        else:
            pixels = pipe.video_processor.preprocess_video(sample, height=h, width=w)
        z = pipe.vae.encode(pixels).latent_dist.mode()
        direct = pipe.video_processor.postprocess_video(pipe.vae.decode(z, return_dict=False)[0], output_type="pt")
        decoded = family.decode(pipe, x[None], h, w, frames, "pt")
        assert decoded.shape == direct.shape and torch.allclose(decoded, direct, atol=1e-5)
        assert not torch.allclose(x, z[0], atol=1e-3)
