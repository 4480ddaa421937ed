# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""Model-family adapters: what differs between Qwen-Image and Wan2.2, in one place.

A [`Family`] turns prompts into conditioning tensors, draws the initial noise, calls a transformer for the flow
velocity `v = eps - x_0` at a noise level `sigma` in [0, 1], and decodes latents, each exactly as the family's own
diffusers pipeline does (it builds a `QwenImagePipeline` / `WanPipeline` / `WanImageToVideoPipeline` that shares the
given modules and calls its methods). [`PhasedMoEPipeline`] and the training code use the same adapter, so a
distilled expert sees the same inputs in training and at sampling time.

Example:
    ```py
    >>> import torch
    >>> from diffusers_pdmd import tiny
    >>> from diffusers_pdmd.families import get_family

    >>> pipe = tiny.build_pipeline("wan2.2-t2v-a14b")
    >>> family = get_family(pipe)
    >>> cond = family.encode_prompt(pipe, ["a cat"], device="cpu")
    >>> x_t = family.prepare_latents(pipe, 1, 16, 16, 5, torch.Generator().manual_seed(0), "cpu", torch.float32)
    >>> sigma = torch.tensor([0.9])
    >>> v = family.velocity(getattr(pipe, family.teacher_transformer_for_sigma(0.9)), x_t, sigma, cond)
    >>> v.shape == x_t.shape
    True
    ```
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


FAMILIES = ("qwen-image", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b")
TRANSFORMER_SLOTS = ("transformer", "transformer_2")
_COMPONENT_NAMES = ("scheduler", "vae", "text_encoder", "tokenizer") + TRANSFORMER_SLOTS


def _get(components, name: str):
    if isinstance(components, Mapping):
        return components.get(name)
    return getattr(components, name, None)


def _any_transformer(components):
    for name in TRANSFORMER_SLOTS:
        module = _get(components, name)
        if module is not None:
            return module
    raise ValueError("`components` has neither a `transformer` nor a `transformer_2`.")


def _vae_stat(vae, name: str, like: torch.Tensor) -> torch.Tensor:
    """The VAE config's per-channel `latents_mean` / `latents_std`, shaped to broadcast over `like` `(B, C, ...)`."""
    shape = (1, -1) + (1,) * (like.ndim - 2)
    return torch.tensor(getattr(vae.config, name)).view(shape).to(like.device, like.dtype)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class Family:
    """Adapter between the Phased DMD code and one model family.

    Attributes:
        name (`str`): One of `FAMILIES`.
        transformer_names (`tuple[str, ...]`): The pipeline slots holding the teacher's transformers.
        default_output_type (`str`): Output type of the family pipeline's `__call__`.
        output_types (`tuple[str, ...]`): Output types the family can decode to.
    """

    name: str = ""
    transformer_names: tuple[str, ...] = ("transformer",)
    default_output_type: str = "np"
    output_types: tuple[str, ...] = ("np", "pt", "pil", "latent")
    is_video: bool = False
    image_concat: bool = False

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"

    def view(self, components):
        """The family's diffusers pipeline over `components` (a dict or a pipeline); modules are shared, not copied."""
        raise NotImplementedError

    def check_size(self, height, width, num_frames=None) -> None:
        """Raise `ValueError`, naming the argument and the rule, if the family cannot generate this size."""
        raise NotImplementedError

    def default_size(self, components) -> tuple[int, int, int | None]:
        """`(height, width, num_frames)` the family pipeline uses when none is given."""
        raise NotImplementedError

    def encode_prompt(
        self,
        components,
        prompts: list[str] | None,
        device,
        max_sequence_length: int = 512,
        num_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Text conditioning for [`~Family.velocity`].

        Args:
            components: A dict of modules or a pipeline holding `text_encoder` and `tokenizer`.
            prompts (`list[str]`): The prompts; `None` when `prompt_embeds` is given.
            device: Device of the returned tensors.
            max_sequence_length (`int`): Maximum number of text tokens.
            num_per_prompt (`int`): Samples per prompt; the embeddings are repeated this many times.
            prompt_embeds (`torch.Tensor`, *optional*): Precomputed embeddings (skip the text encoder).
            prompt_embeds_mask (`torch.Tensor`, *optional*): Their padding mask (Qwen-Image only).

        Returns:
            `dict`: Qwen-Image: `prompt_embeds`, `prompt_embeds_mask` (`None` when nothing is padded); Wan:
            `prompt_embeds`.
        """
        raise NotImplementedError

    def size_cond(self, height: int, width: int, num_frames: int | None = None, batch_size: int = 1) -> dict:
        """Size-dependent conditioning to merge into `cond` (Qwen-Image: `img_shapes`; Wan: nothing)."""
        return {}

    def latents_dtype(self, cond: dict) -> torch.dtype:
        """Dtype in which the family pipeline keeps its latents."""
        return torch.float32

    def latent_shape(self, components, batch_size: int, height: int, width: int, num_frames=None) -> tuple:
        """Shape of the transformer-input latents that [`~Family.prepare_latents`] draws."""
        raise NotImplementedError

    def prepare_latents(
        self,
        components,
        batch_size: int,
        height: int,
        width: int,
        num_frames: int | None,
        generator,
        device,
        dtype: torch.dtype,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial noise in the transformer's input space, drawn as the family pipeline draws it.

        Returns:
            `torch.Tensor`: Qwen-Image: packed `(B, (h/2)(w/2), 4C)`; Wan: `(B, C, F, h, w)`. `latents`, when given,
            is only moved to `device` and `dtype`.
        """
        raise NotImplementedError

    def velocity(
        self, transformer: torch.nn.Module, x_t: torch.Tensor, sigma: torch.Tensor, cond: dict, **extra
    ) -> torch.Tensor:
        """Flow velocity `v = eps - x_0` predicted by `transformer` at noise level `sigma`.

        Args:
            transformer (`torch.nn.Module`): The transformer (or expert) to call.
            x_t (`torch.Tensor`): Noisy latents as returned by [`~Family.prepare_latents`].
            sigma (`torch.Tensor`): Noise levels in [0, 1], shape `(B,)`.
            cond (`dict`): From [`~Family.encode_prompt`] (plus [`~Family.size_cond`] and, for image-to-video,
                [`~Family.encode_image`]).
            **extra: `attention_kwargs`; `num_train_timesteps` (default 1000); Qwen-Image also `img_shapes`.

        Returns:
            `torch.Tensor`: Same shape as `x_t`, in the transformer's dtype.
        """
        raise NotImplementedError

    def combine_cfg(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance, as the family pipeline combines the two predictions."""
        return v_uncond + scale * (v_cond - v_uncond)

    def apply_condition(self, latents: torch.Tensor, cond: dict) -> torch.Tensor:
        """Put conditioning latents (the image-to-video first frame) into `latents`; identity otherwise."""
        return latents

    def decode(self, components, latents: torch.Tensor, height: int, width: int, num_frames, output_type: str):
        """Latents to images or frames, postprocessed as the family pipeline does; `"latent"` returns `latents`."""
        raise NotImplementedError

    def encode_real(self, components, sample, height: int, width: int, num_frames=None, device="cpu") -> torch.Tensor:
        """A real sample in the transformer's input layout (no batch dimension): the inverse of [`~Family.decode`]'s
        latent path, for fake-on-real (`--real_data`). The VAE's posterior mode, normalised with its
        `latents_mean` / `latents_std`, laid out as [`~Family.prepare_latents`] lays out the noise.

        Args:
            components: A dict of modules or a pipeline holding the `vae`.
            sample: A `PIL.Image` (a video family: one frame), or a video (a list of frames or a `(F, 3, H, W)` tensor
                in [0, 1]) for the video families.
            height (`int`), width (`int`), num_frames (`int`, *optional*): The training size; the sample is resized
                to `height` x `width` (its frames are its own).
            device: Where the VAE runs.
        """
        raise NotImplementedError

    def teacher_transformer_for_sigma(self, sigma: float) -> str:
        """Slot of the teacher transformer that owns noise level `sigma`."""
        return "transformer"

    def mu(self, components, latents_or_seq_len) -> float | None:
        """Dynamic-shift parameter for the scheduler, or `None` when the family uses a fixed shift."""
        return None


class QwenImageFamily(Family):
    """Qwen-Image (`QwenImagePipeline`): packed 2x2 latent patches, timestep = `sigma`, CFG with norm rescale.

    Args:
        vae_scale_factor (`int`, defaults to 8): Spatial VAE factor; height and width must be multiples of twice it.
    """

    name = "qwen-image"
    transformer_names = ("transformer",)
    default_output_type = "pil"

    def __init__(self, vae_scale_factor: int = 8):
        self.vae_scale_factor = vae_scale_factor

    def view(self, components):
        from diffusers import QwenImagePipeline

        if isinstance(components, QwenImagePipeline):
            return components
        return QwenImagePipeline(
            scheduler=_get(components, "scheduler"),
            vae=_get(components, "vae"),
            text_encoder=_get(components, "text_encoder"),
            tokenizer=_get(components, "tokenizer"),
            # None in a pipeline of the text components only (diffusers builds one to call `encode_prompt`)
            transformer=next(
                (_get(components, n) for n in TRANSFORMER_SLOTS if _get(components, n) is not None), None
            ),
        )

    def check_size(self, height, width, num_frames=None) -> None:
        multiple = self.vae_scale_factor * 2
        for arg, value in (("height", height), ("width", width)):
            if not _is_positive_int(value) or value % multiple:
                raise ValueError(f"`{arg}` must be a positive multiple of {multiple} for {self.name}, got {value!r}.")
        if num_frames is not None:
            raise ValueError(f"`num_frames` is for the video families, {self.name} makes images; got {num_frames!r}.")

    def default_size(self, components):
        size = 128 * self.vae_scale_factor  # QwenImagePipeline's default_sample_size * vae_scale_factor
        return size, size, None

    def encode_prompt(
        self,
        components,
        prompts,
        device,
        max_sequence_length=512,
        num_per_prompt=1,
        prompt_embeds=None,
        prompt_embeds_mask=None,
    ):
        prompt_embeds, prompt_embeds_mask = self.view(components).encode_prompt(
            prompt=prompts,
            device=device,
            num_images_per_prompt=num_per_prompt,
            prompt_embeds=prompt_embeds,
            prompt_embeds_mask=prompt_embeds_mask,
            max_sequence_length=max_sequence_length,
        )
        return {"prompt_embeds": prompt_embeds, "prompt_embeds_mask": prompt_embeds_mask}

    def size_cond(self, height, width, num_frames=None, batch_size=1):
        grid = (1, height // self.vae_scale_factor // 2, width // self.vae_scale_factor // 2)
        return {"img_shapes": [[grid]] * batch_size}

    def latents_dtype(self, cond):
        return cond["prompt_embeds"].dtype

    def latent_shape(self, components, batch_size, height, width, num_frames=None):
        channels = _any_transformer(components).config.in_channels
        tokens = (height // (self.vae_scale_factor * 2)) * (width // (self.vae_scale_factor * 2))
        return (batch_size, tokens, channels)

    def prepare_latents(
        self, components, batch_size, height, width, num_frames, generator, device, dtype, latents=None
    ):
        channels = _any_transformer(components).config.in_channels // 4
        return self.view(components).prepare_latents(
            batch_size, channels, height, width, dtype, device, generator, latents
        )

    def velocity(self, transformer, x_t, sigma, cond, **extra):
        attention_kwargs = extra.pop("attention_kwargs", None)
        num_train_timesteps = extra.pop("num_train_timesteps", 1000)
        img_shapes = extra.pop("img_shapes", None) or cond.get("img_shapes")
        if extra:
            raise TypeError(f"Unexpected arguments for {self.name} velocity: {sorted(extra)}.")
        if img_shapes is None:
            side = int(round(x_t.shape[1] ** 0.5))
            if side * side != x_t.shape[1]:
                raise ValueError(
                    f"`img_shapes` is needed for a non-square latent grid of {x_t.shape[1]} tokens: merge "
                    "`family.size_cond(height, width, batch_size=B)` into `cond`."
                )
            img_shapes = [[(1, side, side)]] * x_t.shape[0]
        guidance = None
        if getattr(getattr(transformer, "config", None), "guidance_embeds", False):
            # A guidance-distilled transformer takes the guidance scale as an input (QwenImagePipeline's `guidance`).
            guidance = cond.get("guidance")
            if guidance is None:
                raise ValueError(
                    "`cond['guidance']` (the guidance scale, one value per sample) is required: the transformer is "
                    "guidance-distilled (`guidance_embeds=True`)."
                )
        x_in = x_t.to(transformer.dtype)
        # QwenImagePipeline rounds the 1000-scale timestep in the latents' dtype before dividing; do the same.
        timestep = (sigma * num_train_timesteps).to(device=x_in.device, dtype=x_in.dtype) / num_train_timesteps
        return transformer(
            hidden_states=x_in,
            timestep=timestep,
            guidance=guidance,
            encoder_hidden_states_mask=cond.get("prompt_embeds_mask"),
            encoder_hidden_states=cond["prompt_embeds"].to(transformer.dtype),
            img_shapes=img_shapes,
            attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]

    def combine_cfg(self, v_cond, v_uncond, scale):
        combined = v_uncond + scale * (v_cond - v_uncond)
        # Qwen-Image keeps the per-token norm of the conditional prediction.
        return combined * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))

    def decode(self, components, latents, height, width, num_frames, output_type):
        if output_type == "latent":
            return latents
        view = self.view(components)
        vae = view.vae
        latents = view._unpack_latents(latents, height, width, self.vae_scale_factor).to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        image = vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]
        return view.image_processor.postprocess(image, output_type=output_type)

    @torch.no_grad()
    def encode_real(self, components, sample, height, width, num_frames=None, device="cpu"):
        """`(tokens, 4 C)`: the packed, normalised posterior mode, `pack((z - latents_mean) / latents_std)`."""
        view = self.view(components)
        vae = view.vae
        pixels = view.image_processor.preprocess(sample, height=height, width=width)  # (1, 3, H, W) in [-1, 1]
        z = vae.encode(pixels.to(device, vae.dtype)[:, :, None]).latent_dist.mode()[:, :, 0].float()
        z = (z - _vae_stat(vae, "latents_mean", z)) / _vae_stat(vae, "latents_std", z)
        return view._pack_latents(z, 1, z.shape[1], z.shape[2], z.shape[3])[0]

    def mu(self, components, latents_or_seq_len):
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        seq_len = latents_or_seq_len
        if isinstance(seq_len, torch.Tensor):
            seq_len = seq_len.shape[1]
        config = _get(components, "scheduler").config
        return calculate_shift(
            seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )


class WanFamily(Family):
    """Wan2.2 (`WanPipeline`): video latents `(B, C, F, h, w)`, timestep = `1000 * sigma`, plain CFG.

    Args:
        name (`str`): `"wan2.2-t2v-a14b"`, `"wan2.2-i2v-a14b"` or `"wan2.2-ti2v-5b"`.
        boundary_ratio (`float`, *optional*): Teacher switch from `transformer` (high noise, `sigma >= ratio`) to
            `transformer_2`; `None` for a single transformer.
        expand_timesteps (`bool`): Per-token timesteps (TI2V-5B), 0 on image-conditioned first-frame tokens.
        image_concat (`bool`): I2V-A14B: the transformer's input is the noisy latents concatenated (on channels)
            with a first-frame mask and the image latents, as `WanImageToVideoPipeline` builds it; `image` is
            required.
        vae_scale_factor_spatial (`int`), vae_scale_factor_temporal (`int`), patch_size (`tuple[int, int, int]`):
            Geometry of the VAE and transformer; height and width must be multiples of spatial factor x patch.
    """

    is_video = True
    default_output_type = "np"

    def __init__(
        self,
        name: str,
        boundary_ratio: float | None,
        expand_timesteps: bool,
        vae_scale_factor_spatial: int = 8,
        vae_scale_factor_temporal: int = 4,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        image_concat: bool = False,
    ):
        self.name = name
        self.boundary_ratio = boundary_ratio
        self.expand_timesteps = expand_timesteps
        self.image_concat = image_concat
        self.vae_scale_factor_spatial = vae_scale_factor_spatial
        self.vae_scale_factor_temporal = vae_scale_factor_temporal
        self.patch_size = tuple(patch_size)
        self.transformer_names = ("transformer", "transformer_2") if boundary_ratio is not None else ("transformer",)

    def _pipeline_kwargs(self, components) -> dict:
        return {
            "tokenizer": _get(components, "tokenizer"),
            "text_encoder": _get(components, "text_encoder"),
            "vae": _get(components, "vae"),
            "scheduler": _get(components, "scheduler"),
            "transformer": _get(components, "transformer"),
            "transformer_2": _get(components, "transformer_2"),
            "boundary_ratio": self.boundary_ratio,
            "expand_timesteps": self.expand_timesteps,
        }

    def view(self, components):
        from diffusers import WanPipeline

        if isinstance(components, WanPipeline):
            return components
        return WanPipeline(**self._pipeline_kwargs(components))

    def image_view(self, components):
        """`WanImageToVideoPipeline` over `components` (first-frame conditioning of TI2V)."""
        from diffusers import WanImageToVideoPipeline

        if isinstance(components, WanImageToVideoPipeline):
            return components
        return WanImageToVideoPipeline(**self._pipeline_kwargs(components), image_processor=None, image_encoder=None)

    def check_size(self, height, width, num_frames=None) -> None:
        for arg, value, multiple in (
            ("height", height, self.vae_scale_factor_spatial * self.patch_size[1]),
            ("width", width, self.vae_scale_factor_spatial * self.patch_size[2]),
        ):
            if not _is_positive_int(value) or value % multiple:
                raise ValueError(f"`{arg}` must be a positive multiple of {multiple} for {self.name}, got {value!r}.")
        temporal = self.vae_scale_factor_temporal
        if not _is_positive_int(num_frames) or (num_frames - 1) % temporal:
            raise ValueError(
                f"`num_frames` must be a positive int with `num_frames - 1` divisible by {temporal} for {self.name} "
                f"(e.g. 81), got {num_frames!r}."
            )

    def default_size(self, components):
        return 480, 832, 81  # WanPipeline's defaults

    def encode_prompt(
        self,
        components,
        prompts,
        device,
        max_sequence_length=512,
        num_per_prompt=1,
        prompt_embeds=None,
        prompt_embeds_mask=None,
    ):
        if prompt_embeds_mask is not None:
            raise ValueError(f"`prompt_embeds_mask` is for qwen-image; {self.name} pads its embeddings with zeros.")
        if prompt_embeds is not None:
            # WanPipeline.encode_prompt returns given embeddings as they are; repeat them like encoded prompts.
            batch, seq_len, _ = prompt_embeds.shape
            prompt_embeds = (
                prompt_embeds.to(device).repeat(1, num_per_prompt, 1).view(batch * num_per_prompt, seq_len, -1)
            )
            return {"prompt_embeds": prompt_embeds}
        prompt_embeds, _ = self.view(components).encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            num_videos_per_prompt=num_per_prompt,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        return {"prompt_embeds": prompt_embeds}

    def _latent_grid(self, height, width, num_frames):
        frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        return frames, height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial

    def _latent_channels(self, components) -> int:
        config = _any_transformer(components).config
        # I2V-A14B's transformer also reads the mask and image latents: it denoises `out_channels` of them.
        return config.out_channels if self.image_concat else config.in_channels

    def latent_shape(self, components, batch_size, height, width, num_frames=None):
        return (batch_size, self._latent_channels(components), *self._latent_grid(height, width, num_frames))

    def prepare_latents(
        self, components, batch_size, height, width, num_frames, generator, device, dtype, latents=None
    ):
        channels = self._latent_channels(components)
        return self.view(components).prepare_latents(
            batch_size, channels, height, width, num_frames, dtype, device, generator, latents
        )

    def encode_image(
        self, components, image, batch_size: int, height: int, width: int, num_frames: int, device, generator=None
    ) -> dict:
        """First-frame conditioning of TI2V (`expand_timesteps`) or I2V-A14B (`image_concat`), as
        `WanImageToVideoPipeline` computes it.

        Args:
            components: A dict of modules or a pipeline holding `vae` and a transformer.
            image (`PIL.Image.Image`, `np.ndarray` or `torch.Tensor`): The first frame.
            batch_size (`int`): Number of videos (the image latent is repeated).
            height (`int`), width (`int`), num_frames (`int`): Video size.
            device: Device of the returned tensors.
            generator (`torch.Generator` or `list`, *optional*): Only its length matters (one image latent per
                generator, as the diffusers pipeline does); the VAE mode is used, no noise is drawn.

        Returns:
            `dict` to merge into `cond`. TI2V: `condition` (normalised image latents, `(B, C, 1, h, w)`) and
            `first_frame_mask` (`(1, 1, F, h, w)`, 0 on the first latent frame). I2V-A14B: `concat_condition`
            (`(B, 4 + C, F, h, w)`: the first-frame mask and the latents of the image followed by zeros),
            concatenated to the noisy latents at every transformer call.
        """
        if not (self.expand_timesteps or self.image_concat):
            raise ValueError(
                f"`image` conditioning needs an image-to-video family (wan2.2-i2v-a14b, wan2.2-ti2v-5b); got {self.name}."
            )
        view = self.image_view(components)
        pixels = view.video_processor.preprocess(image, height=height, width=width).to(device, dtype=torch.float32)
        # Noise is drawn by `prepare_latents`; a placeholder keeps WanImageToVideoPipeline from drawing its own.
        placeholder = torch.empty(self.latent_shape(components, batch_size, height, width, num_frames), device=device)
        outputs = view.prepare_latents(
            pixels,
            batch_size,
            view.vae.config.z_dim,
            height,
            width,
            num_frames,
            torch.float32,
            device,
            generator,
            placeholder,
        )
        if self.image_concat:
            return {"concat_condition": outputs[1]}
        _, condition, first_frame_mask = outputs
        return {"condition": condition, "first_frame_mask": first_frame_mask}

    def velocity(self, transformer, x_t, sigma, cond, **extra):
        attention_kwargs = extra.pop("attention_kwargs", None)
        num_train_timesteps = extra.pop("num_train_timesteps", 1000)
        if extra:
            raise TypeError(f"Unexpected arguments for {self.name} velocity: {sorted(extra)}.")
        t = (sigma * num_train_timesteps).to(device=x_t.device, dtype=torch.float32)
        mask = cond.get("first_frame_mask")
        x_in = x_t if mask is None else (1 - mask) * cond["condition"] + mask * x_t
        if self.image_concat:
            if cond.get("concat_condition") is None:
                raise ValueError(f"{self.name} needs an `image`: merge `family.encode_image(...)` into `cond`.")
            x_in = torch.cat([x_in, cond["concat_condition"].to(x_in.dtype)], dim=1)
        x_in = x_in.to(transformer.dtype)
        if self.expand_timesteps:
            _, p_h, p_w = transformer.config.patch_size
            if mask is None:
                tokens = torch.ones_like(x_t[0, 0, :, ::p_h, ::p_w], dtype=torch.float32)
            else:
                tokens = mask[0, 0, :, ::p_h, ::p_w]
            timestep = tokens.flatten()[None, :] * t[:, None]  # (B, seq): 0 on conditioned tokens
        else:
            timestep = t
        return transformer(
            hidden_states=x_in,
            timestep=timestep,
            encoder_hidden_states=cond["prompt_embeds"].to(transformer.dtype),
            attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]

    def apply_condition(self, latents, cond):
        mask = cond.get("first_frame_mask")
        if mask is None:
            return latents
        return (1 - mask) * cond["condition"] + mask * latents

    def decode(self, components, latents, height, width, num_frames, output_type):
        if output_type == "latent":
            return latents
        from diffusers.utils.torch_utils import get_module_execution_device

        view = self.view(components)
        vae = view.vae
        latents = latents.to(get_module_execution_device(vae), dtype=vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
        return view.video_processor.postprocess_video(video, output_type=output_type)

    @torch.no_grad()
    def encode_real(self, components, sample, height, width, num_frames=None, device="cpu"):
        """`(C, F, h, w)`: the normalised posterior mode `(z - latents_mean) / latents_std` of a video, or of an
        image as one frame (`F = 1`)."""
        view = self.view(components)
        vae, processor = view.vae, view.video_processor
        is_video = isinstance(sample, (list, tuple)) or (isinstance(sample, torch.Tensor) and sample.ndim == 4)
        if is_video:
            pixels = processor.preprocess_video(sample, height=height, width=width)  # (1, 3, F, H, W) in [-1, 1]
        else:
            pixels = processor.preprocess(sample, height=height, width=width)[:, :, None]
        z = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mode().float()
        return ((z - _vae_stat(vae, "latents_mean", z)) / _vae_stat(vae, "latents_std", z))[0]

    def teacher_transformer_for_sigma(self, sigma: float) -> str:
        if self.boundary_ratio is not None and float(sigma) < self.boundary_ratio:
            return "transformer_2"
        return "transformer"


def _components_and_config(obj) -> tuple[Any, dict]:
    from diffusers import DiffusionPipeline

    if isinstance(obj, DiffusionPipeline):
        return obj, dict(obj.config)
    if isinstance(obj, Mapping):
        return obj, {k: obj[k] for k in ("boundary_ratio", "expand_timesteps", "family") if k in obj}
    raise ValueError(
        f"`get_family` takes a family name (one of {FAMILIES}), a pipeline or a dict of components; got "
        f"{type(obj).__name__}."
    )


def _infer_name(components, config: dict) -> str:
    transformer = _any_transformer(components)
    cls_name = type(transformer).__name__
    if cls_name == "QwenImageTransformer2DModel":
        return "qwen-image"
    if cls_name == "WanTransformer3DModel":
        if config.get("expand_timesteps"):
            return "wan2.2-ti2v-5b"
        if _get(components, "transformer_2") is not None or config.get("boundary_ratio") is not None:
            if transformer.config.in_channels != transformer.config.out_channels:
                return "wan2.2-i2v-a14b"  # image latents and mask concatenated to the input
            return "wan2.2-t2v-a14b"
        raise ValueError(
            "A single-transformer Wan pipeline without `expand_timesteps` (Wan2.1) is not a supported family; "
            f"`family` must be one of {FAMILIES}."
        )
    raise ValueError(f"Cannot infer the model family of a {cls_name}; `family` must be one of {FAMILIES}.")


def _make(name: str, components=None, config: dict | None = None) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"`family` must be one of {FAMILIES}, got {name!r}.")
    config = config or {}
    vae = _get(components, "vae") if components is not None else None
    if name == "qwen-image":
        return QwenImageFamily(vae_scale_factor=2 ** len(vae.temperal_downsample) if vae is not None else 8)
    ti2v, i2v = name == "wan2.2-ti2v-5b", name == "wan2.2-i2v-a14b"
    default_ratio = None if ti2v else (0.9 if i2v else 0.875)  # the released A14B models' switches
    boundary_ratio = config.get("boundary_ratio", default_ratio)
    if not ti2v and boundary_ratio is None:
        boundary_ratio = default_ratio
    patch_size = (1, 2, 2)
    if components is not None and any(_get(components, slot) is not None for slot in TRANSFORMER_SLOTS):
        patch_size = tuple(_any_transformer(components).config.patch_size)
    return WanFamily(
        name,
        boundary_ratio=None if ti2v else float(boundary_ratio),
        expand_timesteps=ti2v,
        vae_scale_factor_spatial=vae.config.scale_factor_spatial if vae is not None else (16 if ti2v else 8),
        vae_scale_factor_temporal=vae.config.scale_factor_temporal if vae is not None else 4,
        patch_size=patch_size,
        image_concat=i2v,
    )


def get_family(name_or_pipeline) -> Family:
    """The [`Family`] adapter of a family name, a loaded pipeline or a dict of components.

    Args:
        name_or_pipeline: One of `FAMILIES`; a `QwenImagePipeline`, `WanPipeline`, `WanImageToVideoPipeline` or
            `PhasedMoEPipeline`; or a dict of components (as `diffusers_pdmd.tiny.build_components` returns). From
            a pipeline or components, the geometry (VAE factors, patch size) and Wan's `boundary_ratio` are read from
            the modules and config; from a name, the released models' values are used.

    Returns:
        [`Family`]: A fresh adapter (it holds no modules).

    Raises:
        `ValueError`: Unknown family name or a pipeline of another family.
    """
    if isinstance(name_or_pipeline, Family):
        return name_or_pipeline
    if isinstance(name_or_pipeline, str):
        return _make(name_or_pipeline)
    components, config = _components_and_config(name_or_pipeline)
    name = config.get("family") or _infer_name(components, config)
    return _make(name, components, config)
