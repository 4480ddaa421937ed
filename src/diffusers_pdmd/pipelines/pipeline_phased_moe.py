# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""Few-step sampling with a phased mixture of experts (Phased DMD) for Qwen-Image and Wan2.2."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import QwenImageLoraLoaderMixin, WanLoraLoaderMixin, lora_pipeline
from diffusers.loaders.lora_base import LoraBaseMixin
from diffusers.models import (
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    QwenImageTransformer2DModel,
    WanTransformer3DModel,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.deprecation_utils import _resolve_dtype
from peft.tuners.tuners_utils import BaseTunerLayer

from ..families import FAMILIES, TRANSFORMER_SLOTS, Family, get_family
from ..hub import (
    CONFIG_NAME,
    ExpertsConfig,
    load_full_expert,
    lora_weight_name,
    multiple_adapters,
    resolve_repo,
    save_full_expert,
    save_lora_expert,
)
from ..released import LAYOUTS, PRESETS, WAN_MOE_FILES, detect_layout, find_preset, phase_file_sibling
from ..released import load_lora as load_released_lora
from ..schedulers import PhasedDMDScheduler
from .expert_swap import ExpertSwitcher, release_module
from .lora_delta import fuse_adapter_, lora_linear_layers, unfuse_adapter_


logger = logging.get_logger(__name__)

_BASE_PIPELINES = ("QwenImagePipeline", "WanPipeline", "WanImageToVideoPipeline")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_pdmd import PhasedMoEPipeline

        >>> # An experts-only repository: its base model is fetched from the repo its config names.
        >>> pipe = PhasedMoEPipeline.from_pretrained("your-org/qwen-image-phased-dmd", dtype=torch.bfloat16)
        >>> pipe.to("cuda")
        >>> image = pipe("a red fox in snow", generator=torch.Generator("cuda").manual_seed(0)).images[0]
        ```
"""


def _normalise_expert(expert, k: int) -> dict:
    if isinstance(expert, dict):
        slot, adapter = expert.get("base_transformer"), expert.get("adapter_name")
        kind = expert.get("type") or ("lora" if adapter is not None else "base")
    elif isinstance(expert, tuple | list) and len(expert) == 2:
        slot, adapter = expert
        kind = "lora" if adapter is not None else "base"
    else:
        raise ValueError(
            f"`experts[{k}]` must be a (base_transformer, adapter_name or None) pair or a dict, got {expert!r}."
        )
    if slot not in TRANSFORMER_SLOTS:
        raise ValueError(f"`experts[{k}]`: base transformer must be one of {TRANSFORMER_SLOTS}, got {slot!r}.")
    if kind not in ("lora", "full", "base") or (kind == "lora") != (adapter is not None):
        raise ValueError(
            f"`experts[{k}]`: type {kind!r} with adapter {adapter!r}; a 'lora' expert names its adapter, 'full' and "
            "'base' experts have none."
        )
    if adapter is not None and not isinstance(adapter, str):
        raise ValueError(f"`experts[{k}]`: adapter name must be a string or None, got {adapter!r}.")
    return {"base_transformer": slot, "adapter_name": adapter, "type": kind}


def _default_experts(family: Family, scheduler) -> list[dict]:
    """The teacher's own transformer(s), no adapter: the transformer owning each phase's midpoint."""
    edges = [1.0, *[float(b) for b in scheduler.config.phase_boundaries], 0.0]
    return [
        {
            "base_transformer": family.teacher_transformer_for_sigma((edges[k] + edges[k + 1]) / 2),
            "adapter_name": None,
            "type": "base",
        }
        for k in range(len(edges) - 1)
    ]


def _resolve_experts(experts, revision, subfolder, hub: dict, weight_name: str | None = None) -> pathlib.Path:
    """Local path of `experts=`: a local file or folder as it is, otherwise a Hub snapshot of only `subfolder` (and
    only `weight_name` in it when given)."""
    inner = "/".join(part.strip("/") for part in (subfolder, weight_name) if part)
    path = pathlib.Path(experts)
    if path.is_file() or path.is_dir():
        return path / inner if inner else path
    patterns = None
    if weight_name:
        patterns = [inner]
    elif subfolder:
        patterns = [f"{inner}/*"]
    root = resolve_repo(experts, revision, allow_patterns=patterns, **hub)
    return root / inner if inner else root


def _resolve_base(root: pathlib.Path, config: ExpertsConfig, hub: dict) -> pathlib.Path:
    """The base pipeline an experts-only folder names, or a `ValueError` that says how to pass it explicitly."""
    how = (
        f"pass the base explicitly: `PhasedMoEPipeline.from_pretrained(BASE_PIPELINE, experts={str(root)!r})`, or "
        f"set `base_model` in {root / CONFIG_NAME} to a Hub repo id."
    )
    if config.base_model is None:
        raise ValueError(f"{root / CONFIG_NAME} has no `base_model` to load the experts onto; {how}")
    looks_local = os.path.isabs(config.base_model) or config.base_model.startswith((".", "~"))
    if looks_local and not os.path.isdir(config.base_model):
        raise ValueError(
            f"`base_model` {config.base_model!r} in {root / CONFIG_NAME} is a local folder that does not exist on "
            f"this machine (the experts were trained elsewhere); {how}"
        )
    try:
        return resolve_repo(config.base_model, config.base_revision, **hub)
    except Exception as err:  # offline and not cached, unknown repo, no access: all need the same fix
        raise ValueError(
            f"`base_model` {config.base_model!r} (revision {config.base_revision!r}) in {root / CONFIG_NAME} cannot "
            f"be resolved ({type(err).__name__}: {err}); {how}"
        ) from err


def _released_scheduler(family: str, base_config, folder, layout, files, scheduler=None):
    """The sampler of released experts: `scheduler`, else the folder's own (an exported folder), else the release's
    preset; returns `(scheduler, preset or None)`."""
    if scheduler is not None:
        if not isinstance(scheduler, PhasedDMDScheduler):
            raise ValueError(f"`scheduler` must be a PhasedDMDScheduler, got {type(scheduler).__name__}.")
        return scheduler, None
    own = folder / "scheduler" / "scheduler_config.json"
    if own.is_file():
        scheduler = PhasedDMDScheduler.from_pretrained(own.parent)
        if layout == "lora" and scheduler.num_phases > 1:
            hint = (
                f"it is one phase's file of an export: pass the folder {folder} as `experts=` to load every phase's"
                if phase_file_sibling(files[0])
                else "pass a folder with one LoRA file per phase (phase_0.safetensors, phase_1.safetensors, ...)"
            )
            raise ValueError(
                f"{files[0]} is one LoRA file, but {own} samples {scheduler.num_phases} phases: the file would make "
                f"every phase's steps; {hint} (or `scheduler=` to use this one file for every step on purpose)."
            )
        return scheduler, None
    preset = find_preset(family, layout, files)
    if preset is None:
        raise ValueError(
            f"{folder}: no preset of `diffusers_pdmd.released.PRESETS` matches these {layout!r} experts on a {family} "
            f"base (presets: {sorted(PRESETS)}); pass `scheduler=` (a PhasedDMDScheduler with the sampler the experts "
            "were made for)."
        )
    return preset.scheduler(base_config), preset


def _locate_experts_and_base(name, root, experts, revision, subfolder, weight_name, experts_format, hub: dict):
    """Where `from_pretrained` finds the experts and the base pipeline: `(layout, experts_root, released_files,
    base_root)`, from `root` (the resolved `name`) and `experts=` (with its revision, subfolder and weight name)."""
    has_index, has_experts = (root / "model_index.json").is_file(), (root / CONFIG_NAME).is_file()
    if experts is not None:
        if has_experts:
            raise ValueError(
                f"{name} already holds Phased DMD experts; `experts=` takes a base "
                "pipeline's experts, pass the base pipeline (or load this one without `experts`)."
            )
        if not has_index:
            raise ValueError(f"{name} is not a diffusers pipeline (no model_index.json).")
        experts_path = _resolve_experts(experts, revision, subfolder, hub, weight_name)
        layout, experts_root, released_files = detect_layout(experts_path, experts_format)
        return layout, experts_root, released_files, root
    if has_experts:
        base_root = root if has_index else _resolve_base(root, ExpertsConfig.load(root), hub)
        return "phased_dmd", root, None, base_root
    raise ValueError(
        f"{name} has no {CONFIG_NAME}: pass `experts=` (an experts folder, repo id or "
        "LoRA file) to load a base pipeline with Phased DMD or released experts."
    )


def _experts_scheduler(family: str, base_config, config, folder, layout, files, released_scheduler):
    """The sampler of experts on a base pipeline: that of their `config` (Phased DMD experts, on the base
    scheduler's config), else that of released experts (see `_released_scheduler`); returns `(scheduler, preset)`."""
    if config is None:
        return _released_scheduler(family, base_config, folder, layout, files, released_scheduler)
    if family != config.family:
        raise ValueError(f"The experts are for `family` {config.family!r}; the base is {family!r}.")
    scheduler = PhasedDMDScheduler.from_config(
        base_config, phase_boundaries=config.phase_boundaries, steps_per_phase=config.steps_per_phase
    )
    return scheduler, None


def _family_of_text_encoder(text_encoder, expand_timesteps: bool) -> str:
    """The family of a pipeline built without transformers (to encode prompts), from its text encoder; a Wan text
    encoder (UMT5) is the same for every Wan2.2 family, so T2V-A14B stands for them unless `expand_timesteps`."""
    name = type(text_encoder).__name__
    if name.startswith("Qwen2_5_VL"):
        return "qwen-image"
    if name.startswith("UMT5"):
        return "wan2.2-ti2v-5b" if expand_timesteps else "wan2.2-t2v-a14b"
    raise ValueError(
        f"Without a `transformer`, the family cannot be inferred from a {name} text encoder; pass `family` (one of "
        f"{FAMILIES})."
    )


def _active_adapters(module) -> list[str]:
    """The active adapters of `module`'s peft layers (read from the first one; peft sets them on all)."""
    layer = next((m for m in module.modules() if isinstance(m, BaseTunerLayer)), None)
    return [] if layer is None else list(layer.active_adapters)


def _has_adapters(module) -> bool:
    return bool(getattr(module, "peft_config", None))


class _PhaseSchedule(NamedTuple):
    """The steps of one call: the scheduler's `timesteps` (on the device), their `sigmas` on the host (one more than
    the steps) and the phase of each step."""

    timesteps: torch.Tensor
    sigmas: list[float]
    phases: list[int]


def _pop_lora_scale(attention_kwargs: dict | None) -> tuple[dict | None, float | None]:
    """`attention_kwargs` without its `"scale"`, and that scale (`None` when not given): the family pipelines' LoRA
    scale, which scales your LoRAs, not the experts."""
    lora_scale = None
    if attention_kwargs is not None and "scale" in attention_kwargs:
        attention_kwargs = dict(attention_kwargs)
        lora_scale = attention_kwargs.pop("scale")
        if not isinstance(lora_scale, int | float) or isinstance(lora_scale, bool):
            raise ValueError(f"`attention_kwargs['scale']` (your LoRAs' scale) must be a number, got {lora_scale!r}.")
    return attention_kwargs, lora_scale


def _num_per_prompt(family: Family, num_images_per_prompt, num_videos_per_prompt):
    """Samples per prompt: the family's argument (Qwen-Image's images, Wan's videos), 1 when not given."""
    num_per_prompt = num_images_per_prompt if family.name == "qwen-image" else num_videos_per_prompt
    return 1 if num_per_prompt is None else num_per_prompt


class PhasedMoEPipeline(DiffusionPipeline, LoraBaseMixin):
    r"""
    Few-step text-to-image (Qwen-Image) and text/image-to-video (Wan2.2) sampling with Phased DMD experts.

    The noise range is split into K phases by the scheduler's `phase_boundaries`; each phase has one expert, and
    each step is made by the expert of the phase its noise level lies in
    (`scheduler.phase_index(t)`). An expert is a transformer slot of the pipeline (`"transformer"` or
    `"transformer_2"`) plus the name of an unfused LoRA adapter on it, or no adapter (the slot's module as it is,
    e.g. a fully fine-tuned transformer). Qwen-Image keeps K adapters on one transformer; Wan2.2 A14B puts the
    high-noise experts on `transformer` and the low-noise ones on `transformer_2`. Experts are swapped with
    [`ExpertSwitcher`] (a few attribute writes per LoRA layer).

    Everything else (prompt encoding, noise, conditioning, guidance, decoding) is the family pipeline's own code
    (`QwenImagePipeline`, `WanPipeline`, `WanImageToVideoPipeline`), called through [`~families.Family`], so with
    identical experts the output equals the family pipeline's at the same sigmas and seed.

    Your own LoRAs (a style, a character) go on top of the experts with diffusers' LoRA API
    (`load_lora_weights`, `set_adapters`, `fuse_lora`, `unload_lora_weights`, ...): they run with the expert of every
    phase, in every `expert_swap_mode`.

    Args:
        scheduler ([`PhasedDMDScheduler`]): Gives the steps and the phase of each step.
        vae: The family's VAE (`AutoencoderKLQwenImage` or `AutoencoderKLWan`).
        text_encoder: Qwen2.5-VL (Qwen-Image) or UMT5 (Wan).
        tokenizer: The text encoder's tokenizer.
        transformer: `QwenImageTransformer2DModel` or `WanTransformer3DModel` (Wan2.2 A14B: the high-noise one).
        transformer_2 (*optional*): Wan2.2 A14B's low-noise transformer, or a second fully fine-tuned expert.
        family (`str`, *optional*): One of `FAMILIES`; inferred from the components when omitted.
        experts (`list`, *optional*): Per phase, `(base_transformer, adapter_name or None)` or a dict with keys
            `base_transformer`, `adapter_name`, `type` (`"lora"`, `"full"` or `"base"`). Default: the teacher's own
            transformer(s), no adapters.
        phase_boundaries (`list[float]`, *optional*): The boundaries the experts were trained for (default: the
            scheduler's at construction); a scheduler with other boundaries is refused at call time.
        base_model (`str`, *optional*), base_revision (`str`, *optional*), method (`str`, *optional*): Provenance,
            written to `phased_dmd_config.json` by `save_pretrained`.
        boundary_ratio (`float`, *optional*): Wan2.2 A14B's teacher switch (0.875), kept from the base pipeline.
        expand_timesteps (`bool`): Wan2.2 TI2V-5B's per-token timesteps, kept from the base pipeline.
    """

    model_cpu_offload_seq = "text_encoder->transformer->transformer_2->vae"
    _lora_loadable_modules = ["transformer", "transformer_2"]
    transformer_name = "transformer"
    _optional_components = ["transformer_2"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        scheduler: PhasedDMDScheduler,
        vae: AutoencoderKLQwenImage | AutoencoderKLWan,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        transformer: QwenImageTransformer2DModel | WanTransformer3DModel,
        transformer_2: WanTransformer3DModel | None = None,
        family: str | None = None,
        experts: list | None = None,
        phase_boundaries: list[float] | None = None,
        base_model: str | None = None,
        base_revision: str | None = None,
        method: str | None = None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
    ):
        super().__init__()
        self.register_modules(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            transformer_2=transformer_2,
        )
        self.register_to_config(boundary_ratio=boundary_ratio, expand_timesteps=expand_timesteps)
        has_transformer = transformer is not None or transformer_2 is not None
        if family is None:
            family = (
                get_family(self).name if has_transformer else _family_of_text_encoder(text_encoder, expand_timesteps)
            )
        elif family not in FAMILIES:
            raise ValueError(f"`family` must be one of {FAMILIES}, got {family!r}.")
        self.register_to_config(family=family)
        if experts is None:
            # Without a transformer (diffusers' text-components-only pipeline, for `encode_prompt`) there is none.
            experts = _default_experts(get_family(self), scheduler) if has_transformer and scheduler else []
        experts = [_normalise_expert(e, k) for k, e in enumerate(experts)]
        if phase_boundaries is None and isinstance(scheduler, PhasedDMDScheduler):
            phase_boundaries = scheduler.config.phase_boundaries  # the experts belong to these boundaries
        if phase_boundaries is not None:
            phase_boundaries = [float(b) for b in phase_boundaries]
        self.register_to_config(
            experts=experts,
            phase_boundaries=phase_boundaries,
            base_model=base_model,
            base_revision=base_revision,
            method=method,
        )
        self.expert_swap_mode = "auto"
        self._switcher = None
        self._switcher_key = None
        self._swap_memory = None  # (free, total) device bytes for "auto"; measured when None (tests inject it)
        self._fused: dict[tuple[str, str], tuple[list, list[float]]] = {}  # (slot, LoRA) -> (layers, factors)
        self._merged_adapters = set()  # diffusers' `fused_loras`

    # ------------------------------------------------------------------ experts

    @property
    def family(self) -> Family:
        """The [`~families.Family`] adapter of this pipeline, configured from its components."""
        return get_family(self)

    @property
    def expert_switcher(self) -> ExpertSwitcher:
        """The [`ExpertSwitcher`] over the current experts, in `self.expert_swap_mode`.

        `expert_swap_mode` is one of `"auto"` (the default), `"resident"`, `"delta"`, `"adapter"`, `"peft"` (see
        [`ExpertSwitcher`]); `"auto"` resolves once, when the switcher is built (at the first call), by the rule of
        [`~expert_swap.choose_swap_mode`], and logs the choice. The switcher is rebuilt, releasing the previous one
        (base weights and peft layers restored), when the mode, the experts, the modules or their adapters change;
        [`~PhasedMoEPipeline.release_experts`] releases it explicitly.
        """
        experts = [(getattr(self, e["base_transformer"]), e["adapter_name"]) for e in self.config.experts]
        slots = dict.fromkeys(e["base_transformer"] for e in self.config.experts)
        user = [(getattr(self, slot), list(self._user_adapters(slot))) for slot in slots]
        user = [(module, names) for module, names in user if names]
        key = (
            self.expert_swap_mode,
            tuple((id(module), adapter) for module, adapter in experts),
            tuple(tuple(getattr(module, "peft_config", {})) for module, _ in experts),
            tuple((id(module), tuple(names)) for module, names in user),
        )
        if self._switcher is None or key != self._switcher_key or self._switcher.released:
            self.release_experts()
            self._switcher = ExpertSwitcher(
                experts, mode=self.expert_swap_mode, memory=self._swap_memory, user_adapters=user
            )
            self._switcher_key = key
            if self.expert_swap_mode == "auto":
                logger.info(f"expert_swap_mode='auto' chose {self._switcher.mode!r}: {self._switcher.mode_reason}.")
        return self._switcher

    def release_experts(self) -> None:
        """Undo the merging of a `"resident"` / `"delta"` switcher: base weights and peft layers back as they were
        before the first call (see [`ExpertSwitcher.release`]); the next call merges again. Also releases the
        transformers from another pipeline's switcher that holds them merged (pipelines sharing modules)."""
        if self._switcher is not None:
            self._switcher.release()
        self._switcher = None
        self._switcher_key = None
        for slot in TRANSFORMER_SLOTS:
            module = getattr(self, slot, None)
            if module is not None:
                release_module(module)

    def to(self, *args, **kwargs):
        """`DiffusionPipeline.to`, after [`~PhasedMoEPipeline.release_experts`]: merged experts are released (base
        weights back) before the modules move, and merged again on the new device at the next call."""
        self.release_experts()
        return super().to(*args, **kwargs)

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = None):
        """diffusers' model offloading, after [`~PhasedMoEPipeline.release_experts`]; `"auto"` then swaps with
        unfused adapters (the weights move at each forward)."""
        self.release_experts()
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = None):
        """diffusers' sequential offloading, after [`~PhasedMoEPipeline.release_experts`]; `"auto"` then swaps with
        unfused adapters."""
        self.release_experts()
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)

    def enable_group_offload(self, *args, **kwargs):
        """diffusers' group offloading, after [`~PhasedMoEPipeline.release_experts`]; `"auto"` then swaps with
        unfused adapters."""
        self.release_experts()
        super().enable_group_offload(*args, **kwargs)

    def set_experts(self, experts: list, phase_boundaries: list[float] | None = None) -> None:
        """Replace the phase -> expert map (see the `experts` argument of the class) and, if given, the phase
        boundaries the experts belong to (to use the experts with a scheduler of other boundaries)."""
        experts = [_normalise_expert(e, k) for k, e in enumerate(experts)]
        self.register_to_config(experts=experts)
        if phase_boundaries is not None:
            self.register_to_config(phase_boundaries=[float(b) for b in phase_boundaries])

    # ------------------------------------------------------------------ the user's own LoRAs

    def _expert_adapters(self, slot: str) -> set[str]:
        return {e["adapter_name"] for e in self.config.experts if e["base_transformer"] == slot and e["adapter_name"]}

    def _user_adapters(self, slot: str) -> tuple[str, ...]:
        """The user's LoRAs active on `slot`: the module's active peft adapters that are no expert (none while its
        LoRAs are disabled). The pipeline runs them together with the expert of every phase on that module."""
        module = getattr(self, slot, None)
        experts = self._expert_adapters(slot) | {name for s, name in self._fused if s == slot}  # fused: in the weights
        others = [a for a in getattr(module, "peft_config", {}) if a not in experts]
        if not others:
            return ()
        layer = next((m for m in module.modules() if isinstance(m, BaseTunerLayer)), None)
        if layer is None or layer.disable_adapters:
            return ()
        return tuple(a for a in layer.active_adapters if a in others)

    @contextlib.contextmanager
    def _user_lora_scale(self, scale: float | None):
        """Your active LoRAs' peft scaling times `scale` inside the block (the experts keep theirs): the LoRA scale
        that the family pipelines take as `attention_kwargs={"scale": ...}`, in every `expert_swap_mode`."""
        saved = []
        if scale is not None and scale != 1.0:
            for slot in TRANSFORMER_SLOTS:
                names = self._user_adapters(slot)
                layers = [m for m in getattr(self, slot).modules() if isinstance(m, BaseTunerLayer)] if names else []
                for layer, name in ((layer, n) for layer in layers for n in names if n in layer.scaling):
                    saved.append((layer, name, layer.scaling[name]))
                    layer.scaling[name] = layer.scaling[name] * scale
        try:
            yield
        finally:
            for layer, name, value in saved:
                layer.scaling[name] = value

    def _lora_components(self, components) -> list[str]:
        present = [slot for slot in TRANSFORMER_SLOTS if getattr(self, slot, None) is not None]
        if components is None:
            return present
        components = [components] if isinstance(components, str) else list(components)
        wrong = [c for c in components if c not in present]
        if wrong:
            raise ValueError(f"`components` must be among this pipeline's transformers {present}, got {wrong}.")
        return components

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ):
        """Load a LoRA of your own (style, character, ...) to run on top of the experts, with diffusers' loaders.

        As `QwenImagePipeline.load_lora_weights` (Qwen-Image) and `WanPipeline.load_lora_weights` (Wan2.2; the
        LoRA goes into `transformer`, or into `transformer_2` with `load_into_transformer_2=True`): the file is read
        with the family's `lora_state_dict` (every key scheme diffusers converts) and added as an unfused peft
        adapter, which becomes the active one. In every `expert_swap_mode` each step then runs the expert of its
        phase together with the active LoRAs, at the weights of [`~PhasedMoEPipeline.set_adapters`];
        [`~PhasedMoEPipeline.unload_lora_weights`] leaves the experts alone.

        Args:
            pretrained_model_name_or_path_or_dict (`str`, `os.PathLike` or `dict`): A Hub repo id, a folder (with
                `weight_name=`) or a state dict, as for diffusers' `load_lora_weights`.
            adapter_name (`str`, *optional*): Name of the adapter (default: diffusers' `default_<n>`); not the name of
                an expert.
            hotswap (`bool`): diffusers' hotswapping of an adapter already loaded under `adapter_name`.
            **kwargs: diffusers' `lora_state_dict` arguments (`weight_name`, `subfolder`, `revision`, ...), and
                `load_into_transformer_2` (Wan2.2 A14B) and `low_cpu_mem_usage`.
        """
        into_2 = kwargs.pop("load_into_transformer_2", False)
        slot = "transformer_2" if into_2 else "transformer"
        module = getattr(self, slot, None)
        if module is None:
            raise ValueError(
                f"`load_into_transformer_2={bool(into_2)}`: this {self.config.family} pipeline has no `{slot}`."
            )
        for k, expert in enumerate(self.config.experts):
            if adapter_name is not None and adapter_name == expert["adapter_name"]:
                raise ValueError(
                    f"`adapter_name` {adapter_name!r} is the name of the expert of phase {k}; give your LoRA another."
                )
        self.release_experts()  # the new adapter goes onto the unmerged base
        mixin = QwenImageLoraLoaderMixin if self.config.family == "qwen-image" else WanLoraLoaderMixin
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        default = getattr(lora_pipeline, "_LOW_CPU_MEM_USAGE_DEFAULT_LORA", False)  # diffusers' own default
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", default)
        state_dict, metadata = mixin.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        if mixin is WanLoraLoaderMixin:
            state_dict = mixin._maybe_expand_t2v_lora_for_i2v(transformer=module, state_dict=state_dict)
        if not all("lora" in key for key in state_dict):
            raise ValueError("Invalid LoRA checkpoint: every parameter name must contain 'lora'.")
        with multiple_adapters():  # the experts are adapters of the same module by design
            mixin.load_lora_into_transformer(
                state_dict,
                transformer=module,
                adapter_name=adapter_name,
                metadata=metadata,
                _pipeline=self,
                low_cpu_mem_usage=low_cpu_mem_usage,
                hotswap=hotswap,
            )

    def set_adapters(self, adapter_names: list[str] | str, adapter_weights=None):
        """diffusers' `set_adapters`: the named LoRAs of yours run, at these weights, together with the expert of
        every phase (the others are off). Naming an expert here sets that expert's weight instead; the pipeline
        still runs each expert only in its own phases."""
        fused = sorted(
            {name for _, name in self._fused}
            & set([adapter_names] if isinstance(adapter_names, str) else adapter_names)
        )
        if fused:
            raise ValueError(f"`adapter_names`: {fused} are fused into the weights; call `unfuse_lora()` first.")
        self.release_experts()
        super().set_adapters(adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        """Your active LoRAs (the experts are not listed: the pipeline activates each in its phases)."""
        return list(dict.fromkeys(name for slot in TRANSFORMER_SLOTS for name in self._user_adapters(slot)))

    def set_lora_device(self, adapter_names: list[str], device: torch.device | str | int) -> None:
        """diffusers' `set_lora_device`, on the unmerged transformers."""
        self.release_experts()
        super().set_lora_device(adapter_names, device)

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ):
        """Fuse your LoRAs into the base weights (`W += lora_scale * weight * alpha / r * B A`), as diffusers'
        `fuse_lora`; the experts stay unfused adapters and keep working in every `expert_swap_mode`.

        Args:
            components (`list[str]`, *optional*): Transformer slots to fuse into (default: all of them).
            lora_scale (`float`): Scale of the fused LoRAs (on top of their `set_adapters` weight).
            safe_fusing (`bool`): Check the fused weights for non-finite values first (raises `ValueError`).
            adapter_names (`list[str]`, *optional*): Your LoRAs to fuse (default: the active ones).
        """
        self.release_experts()
        for slot in self._lora_components(components):
            module = getattr(self, slot)
            held = getattr(module, "peft_config", {})
            names = self._user_adapters(slot) if adapter_names is None else [n for n in adapter_names if n in held]
            experts = sorted(set(names) & self._expert_adapters(slot))
            if experts:
                raise ValueError(f"`adapter_names` {experts} are experts; only your own LoRAs are fused.")
            names = [n for n in names if (slot, n) not in self._fused]
            for name in names:
                layers = lora_linear_layers(module, [name])
                self._fused[(slot, name)] = (layers, fuse_adapter_(layers, name, lora_scale, safe_fusing))
            if names:  # a fused LoRA runs no more as an adapter
                module.set_adapter([a for a in _active_adapters(module) if a not in names])
        self._merged_adapters = {name for _, name in self._fused}

    def unfuse_lora(self, components: list[str] | None = None, **kwargs):
        """Undo [`~PhasedMoEPipeline.fuse_lora`] (subtracting the same fp32 products); the LoRAs run unfused again."""
        self.release_experts()
        slots = self._lora_components(components)
        for (slot, name), (layers, factors) in list(self._fused.items()):
            if slot in slots:
                unfuse_adapter_(layers, name, factors)
                del self._fused[(slot, name)]
                module = getattr(self, slot)
                module.set_adapter(list(dict.fromkeys([*_active_adapters(module), name])))
        self._merged_adapters = {name for _, name in self._fused}

    def delete_adapters(self, adapter_names: list[str] | str):
        """Delete LoRAs of yours (a fused one stays in the weights, as in diffusers); experts cannot be deleted."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for k, expert in enumerate(self.config.experts):
            if expert["adapter_name"] in names:
                raise ValueError(
                    f"`adapter_names`: {expert['adapter_name']!r} is the expert of phase {k}; replace experts with "
                    "`set_experts` or `load_experts`."
                )
        self.release_experts()
        for slot in TRANSFORMER_SLOTS:
            module = getattr(self, slot, None)
            present = [n for n in names if n in getattr(module, "peft_config", {})]
            if present:
                module.set_adapter([a for a in _active_adapters(module) if a not in present])  # none left dangling
                module.delete_adapters(present)
        self._fused = {key: value for key, value in self._fused.items() if key[1] not in names}
        self._merged_adapters = {name for _, name in self._fused}

    def unload_lora_weights(self):
        """Remove every LoRA of yours (all adapters that are no expert); the experts stay, and the pipeline samples
        as before they were loaded (a fused LoRA stays in the weights, as in diffusers)."""
        users = {n for slot in TRANSFORMER_SLOTS for n in getattr(getattr(self, slot, None), "peft_config", {})} - {
            e["adapter_name"] for e in self.config.experts
        }
        if users:
            self.delete_adapters(sorted(users))

    def _check_experts(self) -> None:
        experts = self.config.experts
        if not isinstance(self.scheduler, PhasedDMDScheduler):
            raise ValueError(f"`scheduler` must be a PhasedDMDScheduler, got {type(self.scheduler).__name__}.")
        if len(experts) != self.scheduler.num_phases:
            raise ValueError(
                f"`experts` has {len(experts)} experts but the scheduler has {self.scheduler.num_phases} phases "
                f"(phase_boundaries={list(self.scheduler.config.phase_boundaries)}); give one expert per phase."
            )
        boundaries = self.config.phase_boundaries
        sched = [float(b) for b in self.scheduler.config.phase_boundaries]
        if boundaries is not None and (
            len(boundaries) != len(sched) or any(abs(a - b) > 1e-6 for a, b in zip(boundaries, sched))
        ):
            raise ValueError(
                f"`phase_boundaries` of the experts {list(boundaries)} disagree with the scheduler's {sched}; the "
                "experts were trained for their own boundaries."
            )
        for k, expert in enumerate(experts):
            module = getattr(self, expert["base_transformer"], None)
            if module is None:
                raise ValueError(
                    f"`experts[{k}]` uses `{expert['base_transformer']}`, which the pipeline does not have."
                )
            adapter = expert["adapter_name"]
            if adapter is not None and adapter not in getattr(module, "peft_config", {}):
                raise ValueError(
                    f"`experts[{k}]` uses adapter {adapter!r}, which `{expert['base_transformer']}` does not have; "
                    f"available: {sorted(getattr(module, 'peft_config', {}))}."
                )

    def load_experts(
        self,
        path_or_repo_id: str | os.PathLike,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        torch_dtype: torch.dtype | None = None,
        subfolder: str | None = None,
        experts_format: str | None = None,
        scheduler: PhasedDMDScheduler | None = None,
    ) -> None:
        """Load experts into this pipeline (LoRA adapters `phase_k`, full transformers into their slots) and take
        their scheduler. The base components must be the experts' base.

        `path_or_repo_id` is a folder, a Hub repo id or a LoRA file in any layout of `released.LAYOUTS` (see
        [`~PhasedMoEPipeline.from_pretrained`]); released experts get `scheduler`, else their folder's own, else
        their release's preset. `variant` (e.g. `"fp16"`) reads the experts' variant files
        (`pytorch_lora_weights.fp16.safetensors`); `torch_dtype` is the deprecated name of `dtype`.
        """
        dtype = _resolve_dtype(dtype, torch_dtype)
        hub = {"cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
        path = _resolve_experts(path_or_repo_id, revision, subfolder, hub)
        layout, root, files = detect_layout(path, experts_format)
        self.release_experts()  # new adapters go on the unmerged base
        # A loaded adapter becomes the active one: your LoRAs are made active again afterwards.
        user = {slot: self._user_adapters(slot) for slot in TRANSFORMER_SLOTS}
        if layout == "phased_dmd":
            self._load_experts(root, ExpertsConfig.load(root), dtype, full_folder=False, variant=variant)
        else:
            scheduler, preset = _released_scheduler(
                self.config.family, self.scheduler.config, root, layout, files, scheduler
            )
            self.register_modules(scheduler=scheduler)
            self._load_released(layout, root, files, dtype)
            self.register_to_config(method=preset.name if preset is not None else "released")
        for slot, names in user.items():
            module = getattr(self, slot, None)
            if names and module is not None and set(names) <= set(getattr(module, "peft_config", {})):
                module.set_adapter(list(names))

    def _load_experts(
        self, root: pathlib.Path, config: ExpertsConfig, torch_dtype, full_folder: bool, variant: str | None = None
    ) -> None:
        if config.family != self.config.family:
            raise ValueError(
                f"The experts are for `family` {config.family!r}, the pipeline is {self.config.family!r}."
            )
        scheduler_dir = root / "scheduler"
        if (scheduler_dir / "scheduler_config.json").is_file():
            scheduler = PhasedDMDScheduler.from_pretrained(scheduler_dir)
        else:
            scheduler = PhasedDMDScheduler.from_config(
                self.scheduler.config,
                phase_boundaries=config.phase_boundaries,
                steps_per_phase=config.steps_per_phase,
            )
        sched = [float(b) for b in scheduler.config.phase_boundaries]
        if len(sched) != len(config.phase_boundaries) or any(
            abs(a - b) > 1e-6 for a, b in zip(sched, config.phase_boundaries)
        ):
            raise ValueError(
                f"`phase_boundaries` {config.phase_boundaries} of {root / CONFIG_NAME} disagree with its scheduler's "
                f"{sched}."
            )
        experts = []
        loaded_full: dict[str, str] = {}
        for k, entry in enumerate(config.experts):
            slot, kind, path = entry["base_transformer"], entry["type"], entry["path"]
            module = getattr(self, slot, None)
            if kind == "lora":
                if module is None:
                    raise ValueError(f"`experts[{k}]` is a LoRA on `{slot}`, which the base pipeline does not have.")
                adapter = f"phase_{k}"
                file = root / path / lora_weight_name(variant) if (root / path).is_dir() else root / path
                if not file.is_file():
                    raise ValueError(f"`experts[{k}]`: no LoRA weights at {file}.")
                load_released_lora(self.config.family, module, file, adapter)
                experts.append({"base_transformer": slot, "adapter_name": adapter, "type": "lora"})
                continue
            # A full expert takes its slot; in a full pipeline folder it is the component folder itself.
            already_there = full_folder and path == slot
            if kind == "full" and loaded_full.get(slot) != path and not already_there:
                folder = root / path
                class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
                model_cls = getattr(diffusers, class_name or "", None)
                if not isinstance(model_cls, type) or not issubclass(model_cls, diffusers.ModelMixin):
                    raise ValueError(f"`experts[{k}]`: {folder} is not a diffusers model ({class_name!r}).")
                reference = module if module is not None else self.transformer
                dtype = torch_dtype or reference.dtype
                self.register_modules(**{slot: load_full_expert(model_cls, folder, dtype=dtype, variant=variant)})
                loaded_full[slot] = path
            experts.append({"base_transformer": slot, "adapter_name": None, "type": kind})
        self.register_modules(scheduler=scheduler)
        self.register_to_config(
            experts=experts,
            phase_boundaries=list(config.phase_boundaries),
            base_model=config.base_model,
            base_revision=config.base_revision,
            method=config.method,
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        experts: str | os.PathLike | None = None,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        experts_revision: str | None = None,
        experts_subfolder: str | None = None,
        experts_format: str | None = None,
        experts_weight_name: str | None = None,
        variant: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> PhasedMoEPipeline:
        """Load a Phased DMD pipeline.

        `pretrained_model_name_or_path` (a local folder or a Hub repo id) is one of:

        - an experts-only repository (`phased_dmd_config.json` without `model_index.json`): its base model is
          resolved from the config's `base_model` / `base_revision` and loaded with diffusers;
        - a full Phased DMD pipeline folder (both files), self-contained;
        - a base `QwenImagePipeline` / `WanPipeline` / `WanImageToVideoPipeline` repository, with `experts=` naming
          experts in any layout of `diffusers_pdmd.released.LAYOUTS`: an experts-only repository written here,
          Wan2.2 A14B's `high_noise_model.safetensors` + `low_noise_model.safetensors` (Wan2.2-Lightning), one
          LoRA file for every phase (Qwen-Image-Lightning), or a fully fine-tuned transformer folder. LoRA files
          are read with the family pipeline's own `lora_state_dict` converters. A known release gets its authors'
          sampler from `diffusers_pdmd.released.PRESETS`; for others pass `scheduler=` (a `PhasedDMDScheduler`).

        Hub repositories are resolved with `huggingface_hub.snapshot_download` (honouring `cache_dir`, `revision`,
        `local_files_only` and `HF_HUB_OFFLINE`). Weights are read from safetensors only and no remote code is run.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): See above.
            experts (`str` or `os.PathLike`, *optional*): Experts to put on a base pipeline: a folder, a Hub repo id
                or one `.safetensors` LoRA file.
            revision (`str`, *optional*): Revision of `pretrained_model_name_or_path`.
            dtype (`torch.dtype`, *optional*): Dtype of the loaded models.
            cache_dir (`str` or `os.PathLike`, *optional*): Hub cache folder.
            local_files_only (`bool`, *optional*): Only use the local cache.
            token (`str` or `bool`, *optional*): Hub token for private repositories.
            experts_revision (`str`, *optional*): Revision of `experts`.
            experts_subfolder (`str`, *optional*): Folder inside `experts` that holds them (only it is downloaded),
                e.g. `"Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1"` of `lightx2v/Wan2.2-Lightning`.
            experts_format (`str`, *optional*): One of `diffusers_pdmd.released.LAYOUTS`; detected when omitted.
            experts_weight_name (`str`, *optional*): One LoRA file of `experts` (inside `experts_subfolder`) to use,
                e.g. `"Qwen-Image-Lightning-8steps-V1.0.safetensors"` of `lightx2v/Qwen-Image-Lightning`; only it is
                downloaded.
            variant (`str`, *optional*): Read variant weight files, e.g. `"fp16"`: the experts'
                (`phase_k/pytorch_lora_weights.fp16.safetensors`) and a full pipeline folder's components
                (`*.fp16.safetensors`). The base pipeline of an experts-only repository, a repository of its own, is
                loaded without a variant.
            torch_dtype (`torch.dtype`, *optional*): Deprecated name of `dtype` (as in diffusers).
            **kwargs: Forwarded to diffusers' `from_pretrained` of the base pipeline (e.g. `device_map`), except
                `scheduler`: a `PhasedDMDScheduler` for released experts (default: the release's preset).

        Returns:
            [`PhasedMoEPipeline`]
        """
        torch_dtype = _resolve_dtype(dtype, torch_dtype)  # diffusers' FutureWarning for `torch_dtype`
        if kwargs.pop("trust_remote_code", False) or kwargs.pop("custom_pipeline", None) is not None:
            raise ValueError("`trust_remote_code` / `custom_pipeline` are not supported: no remote code is run.")
        if kwargs.pop("use_safetensors", True) is not True:
            raise ValueError("`use_safetensors` must be True: Phased DMD pipelines load safetensors only.")
        if experts_format is not None and experts_format not in LAYOUTS:
            raise ValueError(f"`experts_format` must be one of {LAYOUTS} or None, got {experts_format!r}.")
        # A `PhasedDMDScheduler` is the sampler of released experts; any other scheduler is a base component given
        # by keyword (as diffusers' `from_pretrained` takes components), whose config the phased scheduler follows.
        released_scheduler = None
        if experts is not None and isinstance(kwargs.get("scheduler"), PhasedDMDScheduler):
            released_scheduler = kwargs.pop("scheduler")
        hub = {"cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
        root = resolve_repo(pretrained_model_name_or_path, revision, **hub)
        layout, experts_root, released_files, base_root = _locate_experts_and_base(
            pretrained_model_name_or_path,
            root,
            experts,
            experts_revision,
            experts_subfolder,
            experts_weight_name,
            experts_format,
            hub,
        )
        config = ExpertsConfig.load(experts_root) if layout == "phased_dmd" else None
        index = json.loads((base_root / "model_index.json").read_text())
        class_name = index.get("_class_name")
        load_kwargs = {"dtype": torch_dtype, "use_safetensors": True, "local_files_only": True, **kwargs}
        if class_name == cls.__name__:
            pipe = super().from_pretrained(base_root, variant=variant, **load_kwargs)
            pipe._load_experts(experts_root, config, torch_dtype, full_folder=True, variant=variant)
            return pipe
        if class_name not in _BASE_PIPELINES:
            raise ValueError(f"The base pipeline must be one of {_BASE_PIPELINES}, {base_root} is a {class_name!r}.")
        base = getattr(diffusers, class_name).from_pretrained(base_root, **load_kwargs)
        base_family = get_family(base)
        scheduler, preset = _experts_scheduler(
            base_family.name, base.scheduler.config, config, experts_root, layout, released_files, released_scheduler
        )
        pipe = cls(
            scheduler=scheduler,
            vae=base.vae,
            text_encoder=base.text_encoder,
            tokenizer=base.tokenizer,
            transformer=base.transformer,
            transformer_2=getattr(base, "transformer_2", None),
            family=base_family.name,
            experts=None,
            boundary_ratio=base.config.get("boundary_ratio"),
            expand_timesteps=bool(base.config.get("expand_timesteps", False)),
        )
        if config is None:
            pipe._load_released(layout, experts_root, released_files, torch_dtype)
            pipe.register_to_config(
                base_model=str(pretrained_model_name_or_path),
                base_revision=revision,
                method=preset.name if preset is not None else "released",
            )
            return pipe
        pipe._load_experts(experts_root, config, torch_dtype, full_folder=False, variant=variant)
        return pipe

    def _load_released(self, layout: str, folder: pathlib.Path, files: list[pathlib.Path], torch_dtype) -> None:
        """Put released experts (a layout of `released.LAYOUTS` other than `"phased_dmd"`) on this pipeline.

        `"wan_moe_lora"`: the high-noise file becomes adapter `phase_0` on `transformer`, the low-noise one `phase_1`
        on `transformer_2`, and each phase uses the one of its teacher transformer (the slot owning the phase's
        midpoint sigma). `"lora"`: one adapter `phase_0` on `transformer` for every phase. `"full"`: the folder's
        transformer takes the `transformer` slot for every phase. `"phase_loras"`: file `phase_k.safetensors` becomes
        adapter `phase_k` on the teacher transformer of phase k (Qwen-Image and TI2V-5B: `transformer`).
        """
        family = self.family
        num_phases = self.scheduler.num_phases
        edges = [1.0, *[float(b) for b in self.scheduler.config.phase_boundaries], 0.0]
        if layout == "wan_moe_lora":
            if "transformer_2" not in family.transformer_names:
                raise ValueError(
                    f"{folder}: the Wan2.2 A14B layout ({', '.join(WAN_MOE_FILES.values())}) needs a base with a "
                    f"high- and a low-noise transformer (wan2.2-t2v-a14b, wan2.2-i2v-a14b); the base is {family.name}."
                )
            slots = [family.teacher_transformer_for_sigma((edges[k] + edges[k + 1]) / 2) for k in range(num_phases)]
            adapters = {}
            for index, (slot, file) in enumerate(zip(WAN_MOE_FILES, files)):
                adapters[slot] = f"phase_{index}"
                load_released_lora(family.name, getattr(self, slot), file, adapters[slot])
            experts = [{"base_transformer": s, "adapter_name": adapters[s], "type": "lora"} for s in slots]
        elif layout == "phase_loras":
            if len(files) != num_phases:
                raise ValueError(
                    f"{folder} holds {len(files)} per-phase LoRA files ({', '.join(f.name for f in files)}), but the "
                    f"sampler has {num_phases} phases (`steps_per_phase` {list(self.scheduler.config.steps_per_phase)})"
                    "; pass the `scheduler=` the experts were made for."
                )
            experts = []
            for k, file in enumerate(files):
                slot = family.teacher_transformer_for_sigma((edges[k] + edges[k + 1]) / 2)
                load_released_lora(family.name, getattr(self, slot), file, f"phase_{k}")
                experts.append({"base_transformer": slot, "adapter_name": f"phase_{k}", "type": "lora"})
        elif layout == "lora":
            if len(family.transformer_names) > 1:
                raise ValueError(
                    f"{files[0]}: one LoRA file cannot say which of {family.name}'s two transformers it is for; put "
                    f"the experts in the two-file layout ({', '.join(WAN_MOE_FILES.values())})."
                )
            load_released_lora(family.name, self.transformer, files[0], "phase_0")
            experts = [{"base_transformer": "transformer", "adapter_name": "phase_0", "type": "lora"}] * num_phases
        elif layout == "full":
            if len(family.transformer_names) > 1:
                raise ValueError(
                    f"{folder}: one fine-tuned transformer cannot replace both of {family.name}'s transformers; "
                    "save the experts with `save_pretrained(experts_only=True)` instead."
                )
            class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
            if class_name != type(self.transformer).__name__:
                raise ValueError(
                    f"{folder / 'config.json'}: a {class_name!r} cannot replace the base's "
                    f"{type(self.transformer).__name__}."
                )
            model_cls = type(self.transformer)
            dtype = torch_dtype or self.transformer.dtype
            self.register_modules(transformer=load_full_expert(model_cls, folder, dtype=dtype))
            experts = [{"base_transformer": "transformer", "adapter_name": None, "type": "full"}] * num_phases
        else:
            raise ValueError(f"`experts_format` {layout!r} is not a released layout; one of {LAYOUTS[1:]}.")
        self.register_to_config(experts=experts, phase_boundaries=edges[1:-1])

    def experts_config(self, base_model: str | None = None, base_revision: str | None = None, method=None):
        """The [`~hub.ExpertsConfig`] `save_pretrained` writes (paths `phase_k`; full experts once per slot)."""
        entries, full_paths = [], {}
        for k, expert in enumerate(self.config.experts):
            slot, kind = expert["base_transformer"], expert["type"]
            path = None
            if kind == "lora":
                path = f"phase_{k}"
            elif kind == "full":
                path = full_paths.setdefault(slot, f"phase_{k}")
            entries.append({"phase": k, "base_transformer": slot, "type": kind, "path": path})
        return ExpertsConfig(
            family=self.config.family,
            base_model=base_model or self.config.base_model,
            base_revision=base_revision or self.config.base_revision,
            phase_boundaries=[float(b) for b in self.scheduler.config.phase_boundaries],
            steps_per_phase=list(self.scheduler.config.steps_per_phase),
            method=method or self.config.method or "phased_dmd",
            experts=entries,
        )

    @contextlib.contextmanager
    def _save_transformers_without_adapters(self, variant: str | None = None):
        # DiffusionPipeline.save_pretrained saves each module with its own `save_pretrained`, which would write a
        # transformer carrying peft layers with `base_layer` / `lora_*` keys. For the duration of the save such a
        # transformer's method is shadowed by one that writes the base weights only (the LoRAs go to `phase_k/`).
        shadowed = []
        for slot in TRANSFORMER_SLOTS:
            module = getattr(self, slot, None)
            if module is None or not _has_adapters(module):
                continue

            def save(save_directory, safe_serialization=True, max_shard_size=None, _module=module, **kwargs):
                save_full_expert(_module, save_directory, max_shard_size=max_shard_size or "10GB", variant=variant)

            module.save_pretrained = save
            shadowed.append(module)
        try:
            yield
        finally:
            for module in shadowed:
                del module.save_pretrained

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        experts_only: bool = False,
        base_model: str | None = None,
        base_revision: str | None = None,
        method: str | None = None,
        safe_serialization: bool = True,
        variant: str | None = None,
        **kwargs,
    ):
        """Save the pipeline as an experts-only folder or as a full, self-contained pipeline folder.

        Args:
            save_directory (`str` or `os.PathLike`): Destination folder.
            experts_only (`bool`, defaults to `False`): Write only `phased_dmd_config.json`, `scheduler/` and the
                experts (`phase_k/`); loading resolves the base from `base_model`. Otherwise also write
                `model_index.json` and every component (transformers without their LoRA layers). Either form gets
                `comfyui/`, the LoRA experts in ComfyUI's layout (not with a `variant`).
            base_model (`str`, *optional*), base_revision (`str`, *optional*), method (`str`, *optional*): Override
                the provenance kept in the config; an experts-only folder needs a `base_model`.
            safe_serialization (`bool`): Must be True (safetensors only).
            variant (`str`, *optional*): Write variant weight files, e.g. `"fp16"`: `*.fp16.safetensors` for the
                components and `phase_k/pytorch_lora_weights.fp16.safetensors` for LoRA experts, as diffusers names
                them; load them with `from_pretrained(..., variant="fp16")`.
            **kwargs: Forwarded to `DiffusionPipeline.save_pretrained` for the full form.
        """
        if not safe_serialization:
            raise ValueError("`safe_serialization` must be True: Phased DMD pipelines are saved as safetensors only.")
        if kwargs.get("push_to_hub"):
            raise ValueError("`push_to_hub` is not supported here; use `diffusers_pdmd.hub.push_experts_to_hub`.")
        self._check_experts()
        self.release_experts()  # save the base and the adapters, not merged weights
        if self._fused and not experts_only:
            raise ValueError(
                f"`save_pretrained`: your LoRAs {sorted(self._merged_adapters)} are fused into the base weights; call "
                "`unfuse_lora()` first (or `unload_lora_weights()` to save them baked into the base)."
            )
        config = self.experts_config(base_model, base_revision, method)
        if experts_only and config.base_model is None:
            raise ValueError("`base_model` (repo id or path of the base pipeline) is needed to save experts only.")
        out = pathlib.Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        saved_full = set()
        for expert, entry in zip(self.config.experts, config.experts):
            module = getattr(self, entry["base_transformer"])
            if entry["type"] == "lora":
                save_lora_expert(module, expert["adapter_name"], out / entry["path"], variant=variant)
            elif entry["type"] == "full" and entry["path"] not in saved_full:
                saved_full.add(entry["path"])
                if experts_only:
                    save_full_expert(module, out / entry["path"], variant=variant)
        if experts_only:
            self.scheduler.save_pretrained(out / "scheduler")
        else:
            # A full folder keeps full experts in their component folders instead of `phase_k/`.
            config.experts = [
                {**e, "path": e["base_transformer"]} if e["type"] == "full" else e for e in config.experts
            ]
            config.validate()
            with self._save_transformers_without_adapters(variant):
                super().save_pretrained(out, safe_serialization=True, variant=variant, **kwargs)
            # The model index describes the experts as loading will name them (LoRA adapters become `phase_k`).
            index = json.loads((out / "model_index.json").read_text())
            index["experts"] = [
                {"base_transformer": e["base_transformer"], "adapter_name": f"phase_{e['phase']}", "type": "lora"}
                if e["type"] == "lora"
                else {"base_transformer": e["base_transformer"], "adapter_name": None, "type": e["type"]}
                for e in config.experts
            ]
            index.update(
                phase_boundaries=config.phase_boundaries,
                base_model=config.base_model,
                base_revision=config.base_revision,
                method=config.method,
            )
            (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config.save(out)
        if variant is None:  # LoRA experts also in ComfyUI's layout, `comfyui/` (see `export.write_comfyui`)
            from ..export import write_comfyui

            write_comfyui(out)

    # ------------------------------------------------------------------ sampling

    @property
    def guidance_scale(self):
        """The call's `guidance_scale`: Wan's scale for experts on `transformer` (1.0 when not given); Qwen-Image's
        input of a guidance-distilled transformer, as passed (`None` when not given), as in the family pipelines."""
        return self._guidance_scale

    @property
    def guidance_scale_2(self):
        """Wan's scale for experts on `transformer_2` in the current call (`None` for Qwen-Image)."""
        return self._guidance_scale_2

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self):
        return self._interrupt

    @property
    def attention_kwargs(self):
        return self._attention_kwargs

    def _guidance_embeds(self) -> bool:
        """Whether an expert's transformer is guidance-distilled (takes `guidance_scale` as an input)."""
        slots = {e["base_transformer"] for e in self.config.experts}
        modules = [getattr(self, slot, None) for slot in slots]
        return any(getattr(getattr(m, "config", None), "guidance_embeds", False) for m in modules if m is not None)

    def encode_prompt(self, *args, **kwargs):
        r"""
        Encode prompts with the family pipeline's own `encode_prompt`: same arguments, same return value.

        - Qwen-Image (`QwenImagePipeline.encode_prompt`): `prompt, device=None, num_images_per_prompt=1,
          prompt_embeds=None, prompt_embeds_mask=None, max_sequence_length=1024` -> `(prompt_embeds,
          prompt_embeds_mask)`; the mask is `None` when no token is padding.
        - Wan2.2 (`WanPipeline.encode_prompt`): `prompt, negative_prompt=None, do_classifier_free_guidance=True,
          num_videos_per_prompt=1, prompt_embeds=None, negative_prompt_embeds=None, max_sequence_length=226,
          device=None, dtype=None` -> `(prompt_embeds, negative_prompt_embeds)`.

        Pass the results to `__call__` as `prompt_embeds` (and `prompt_embeds_mask`) and `negative_prompt_embeds`
        (and `negative_prompt_embeds_mask`) to encode a prompt once and sample many times.

        Example:
            ```py
            >>> prompt_embeds, prompt_embeds_mask = pipe.encode_prompt("a red fox in snow")  # Qwen-Image
            >>> image = pipe(prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask).images[0]
            ```
        """
        return self.family.view(self).encode_prompt(*args, **kwargs)

    def check_inputs(
        self,
        family: Family,
        prompt,
        negative_prompt,
        height,
        width,
        num_frames,
        true_cfg_scale,
        guidance_scale,
        guidance_scale_2,
        num_images_per_prompt,
        num_videos_per_prompt,
        generator,
        latents,
        prompt_embeds,
        prompt_embeds_mask,
        negative_prompt_embeds,
        negative_prompt_embeds_mask,
        image,
        output_type,
        callback_on_step_end_tensor_inputs,
        max_sequence_length,
    ):
        """Validate every argument before any model runs; raises `ValueError` naming the argument."""
        if self.config.family not in FAMILIES:
            raise ValueError(f"`family` must be one of {FAMILIES}, got {self.config.family!r}.")
        self._check_experts()
        family.check_size(height, width, num_frames)
        if output_type not in family.output_types:
            raise ValueError(f"`output_type` must be one of {family.output_types}, got {output_type!r}.")
        batch_size = self._check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        self._check_embeds_masks(
            family, prompt_embeds, prompt_embeds_mask, negative_prompt_embeds, negative_prompt_embeds_mask
        )
        self._check_family_arguments(
            family, true_cfg_scale, guidance_scale_2, num_images_per_prompt, num_videos_per_prompt, image
        )
        name = "num_images_per_prompt" if family.name == "qwen-image" else "num_videos_per_prompt"
        num_per_prompt = _num_per_prompt(family, num_images_per_prompt, num_videos_per_prompt)
        if not isinstance(num_per_prompt, int) or isinstance(num_per_prompt, bool) or num_per_prompt < 1:
            raise ValueError(f"`{name}` must be a positive int, got {num_per_prompt!r}.")
        self._check_guidance_scales(family, true_cfg_scale, guidance_scale, guidance_scale_2)
        if not isinstance(max_sequence_length, int) or not 0 < max_sequence_length <= 1024:
            raise ValueError(f"`max_sequence_length` must be an int in [1, 1024], got {max_sequence_length!r}.")
        total = batch_size * num_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"`generator` is a list of {len(generator)} generators for a batch of {total}.")
        if latents is not None:
            expected = family.latent_shape(self, total, height, width, num_frames)
            if tuple(latents.shape) != tuple(expected):
                raise ValueError(f"`latents` must have shape {tuple(expected)}, got {tuple(latents.shape)}.")
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}, got "
                f"{callback_on_step_end_tensor_inputs}."
            )

    def _check_prompts(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds) -> int:
        """Check the prompts and their embeddings (one of `prompt` and `prompt_embeds`); returns the batch size."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass one of `prompt` or `prompt_embeds`.")
        for arg, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if value is not None and not (
                isinstance(value, str)
                or (isinstance(value, list) and value and all(isinstance(p, str) for p in value))
            ):
                raise ValueError(
                    f"`{arg}` must be a string or a non-empty list of strings, got {type(value).__name__}."
                )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        batch_size = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else None
        if prompt_embeds is not None:
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
                raise ValueError("`prompt_embeds` must be a tensor of shape (batch, tokens, dim).")
            batch_size = prompt_embeds.shape[0]
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch_size:
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has batch size {batch_size}."
            )
        if negative_prompt_embeds is not None and (
            not isinstance(negative_prompt_embeds, torch.Tensor)
            or negative_prompt_embeds.ndim != 3
            or negative_prompt_embeds.shape[0] != batch_size
        ):
            raise ValueError(
                f"`negative_prompt_embeds` must be a tensor of shape (batch, tokens, dim) with the batch size "
                f"{batch_size} of the prompts."
            )
        return batch_size

    def _check_embeds_masks(
        self, family: Family, prompt_embeds, prompt_embeds_mask, negative_prompt_embeds, negative_prompt_embeds_mask
    ) -> None:
        """Qwen-Image's padding masks: each of the shape (batch, tokens) of its embeddings."""
        for arg, mask, embeds in (
            ("prompt_embeds_mask", prompt_embeds_mask, prompt_embeds),
            ("negative_prompt_embeds_mask", negative_prompt_embeds_mask, negative_prompt_embeds),
        ):
            if mask is None:
                continue
            if family.name != "qwen-image":
                raise ValueError(f"`{arg}` is for qwen-image; {family.name} pads its embeddings with zeros.")
            if embeds is None or tuple(mask.shape) != tuple(embeds.shape[:2]):
                raise ValueError(f"`{arg}` must have the shape (batch, tokens) of its embeddings.")

    def _check_family_arguments(
        self, family: Family, true_cfg_scale, guidance_scale_2, num_images_per_prompt, num_videos_per_prompt, image
    ) -> None:
        """Arguments of the other family are refused; `image` is required by Wan2.2 I2V-A14B."""
        if family.name == "qwen-image":
            wrong = {"guidance_scale_2": guidance_scale_2, "image": image}
            wrong["num_videos_per_prompt"] = num_videos_per_prompt
        else:
            wrong = {"true_cfg_scale": true_cfg_scale, "num_images_per_prompt": num_images_per_prompt}
            if not (family.expand_timesteps or family.image_concat):
                wrong["image"] = image
            elif family.image_concat and image is None:
                raise ValueError(f"`image` (the first frame) is required by {family.name}.")
        for arg, value in wrong.items():
            if value is not None:
                raise ValueError(f"`{arg}` is not an argument of {family.name}.")
        if image is not None and not isinstance(image, PIL.Image.Image | np.ndarray | torch.Tensor):
            raise ValueError(f"`image` must be a PIL image, a numpy array or a tensor, got {type(image).__name__}.")

    def _check_guidance_scales(self, family: Family, true_cfg_scale, guidance_scale, guidance_scale_2) -> None:
        """Guidance scales are numbers >= 0, given where an expert's transformer uses them."""
        for arg, value in (
            ("true_cfg_scale", true_cfg_scale),
            ("guidance_scale", guidance_scale),
            ("guidance_scale_2", guidance_scale_2),
        ):
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool) or value < 0):
                raise ValueError(f"`{arg}` must be a number >= 0, got {value!r}.")
        slots = {e["base_transformer"] for e in self.config.experts}
        if family.name == "qwen-image" and guidance_scale is None and self._guidance_embeds():
            raise ValueError(
                "`guidance_scale` is required: the transformer is guidance-distilled (`guidance_embeds=True`) and "
                "takes it as an input."
            )
        if guidance_scale_2 is not None and "transformer_2" not in slots:
            raise ValueError("`guidance_scale_2` is for experts on `transformer_2`; no expert uses it.")

    def _default_size(self, family: Family, height, width, num_frames) -> tuple:
        """`(height, width, num_frames)` with the family pipeline's defaults for those not given."""
        default_h, default_w, default_f = family.default_size(self)
        height = default_h if height is None else height
        width = default_w if width is None else width
        if family.is_video and num_frames is None:
            num_frames = default_f
        return height, width, num_frames

    def _phase_schedule(
        self, family: Family, num_inference_steps, sigmas, total, height, width, num_frames, device
    ) -> _PhaseSchedule:
        """Set the scheduler's timesteps on `device`; the phases and the host-side sigmas come from a CPU schedule,
        so the loop never waits on the device."""
        seq_len = family.latent_shape(self, total, height, width, num_frames)[1]
        schedule = {"sigmas": sigmas, "mu": family.mu(self, seq_len)}
        self.scheduler.set_timesteps(num_inference_steps, device="cpu", **schedule)
        sigmas_cpu = self.scheduler.sigmas.tolist()
        phases = [self.scheduler.phase_index_for_sigma(s) for s in sigmas_cpu[:-1]]
        self.scheduler.set_timesteps(num_inference_steps, device=device, **schedule)
        return _PhaseSchedule(self.scheduler.timesteps, sigmas_cpu, phases)

    def _phase_guidance(
        self, family: Family, negative_prompt, negative_prompt_embeds, true_cfg_scale, guidance_scale, guidance_scale_2
    ) -> tuple[list[float], float | None]:
        """The classifier-free guidance scale of each phase, and the `guidance_scale` input of a guidance-distilled
        Qwen-Image transformer (`None` when there is none to give); sets `self._guidance_scale(_2)`."""
        expert_slots = [e["base_transformer"] for e in self.config.experts]
        # Plain numbers, as the family pipelines keep them (a step-end callback may change them, as in diffusers).
        self._guidance_scale, self._guidance_scale_2 = guidance_scale, None
        if family.name != "qwen-image":
            scale = 1.0 if guidance_scale is None else float(guidance_scale)
            scale_2 = scale if guidance_scale_2 is None else float(guidance_scale_2)
            self._guidance_scale, self._guidance_scale_2 = scale, scale_2
            return [scale_2 if slot == "transformer_2" else scale for slot in expert_slots], guidance_scale
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        scale = 1.0 if true_cfg_scale is None else float(true_cfg_scale)
        if scale > 1 and not has_negative:
            logger.warning(f"`true_cfg_scale`={scale} is ignored: classifier-free guidance needs a negative prompt.")
        elif scale <= 1 and has_negative:
            logger.warning("The negative prompt is ignored: classifier-free guidance needs `true_cfg_scale` > 1.")
        # `guidance_scale` is an input of guidance-distilled transformers, as in QwenImagePipeline.
        if guidance_scale is not None and not self._guidance_embeds():
            logger.warning(
                f"`guidance_scale`={guidance_scale} is ignored: the transformer is not guidance-distilled "
                "(`guidance_embeds=False`); use `true_cfg_scale` with a negative prompt for guidance."
            )
            guidance_scale = None
        return [scale if has_negative else 1.0 for _ in expert_slots], guidance_scale

    def _encode_prompts(
        self,
        family: Family,
        prompts,
        negative_prompt,
        prompt_embeds,
        prompt_embeds_mask,
        negative_prompt_embeds,
        negative_prompt_embeds_mask,
        do_cfg: bool,
        batch_size: int,
        num_per_prompt: int,
        max_sequence_length: int,
        device,
    ) -> tuple[dict, dict | None]:
        """`(cond, uncond)`: the family's text conditioning of the prompts and, with guidance, of the negative
        prompts (Wan's default: `""`); `uncond` is `None` without guidance."""
        encode = {"max_sequence_length": max_sequence_length, "num_per_prompt": num_per_prompt}
        cond = family.encode_prompt(
            self, prompts, device, **encode, prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask
        )
        if not do_cfg:
            return cond, None
        if negative_prompt_embeds is None and family.name != "qwen-image":
            negative_prompt = negative_prompt or ""
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * batch_size
        uncond = family.encode_prompt(
            self,
            negative_prompt,
            device,
            **encode,
            prompt_embeds=negative_prompt_embeds,
            prompt_embeds_mask=negative_prompt_embeds_mask,
        )
        return cond, uncond

    def _denoise(
        self,
        family: Family,
        latents: torch.Tensor,
        schedule: _PhaseSchedule,
        phase_scales: list[float],
        cond: dict,
        uncond: dict | None,
        generator,
        attention_kwargs,
        lora_scale,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ) -> torch.Tensor:
        """The phase loop: each step is made by the expert of its phase (swapped in by the [`ExpertSwitcher`]), with
        classifier-free guidance where the phase's scale is > 1; your LoRAs run at `lora_scale`."""
        switcher = self.expert_switcher
        timesteps, num_steps = schedule.timesteps, len(schedule.timesteps)
        self._num_timesteps = num_steps
        self.scheduler.set_begin_index(0)
        # `sampling()`: afterwards the unmerged transformers' peft layers hold the adapter state they had before.
        with (
            self.progress_bar(total=num_steps) as progress_bar,
            switcher.sampling(),
            self._user_lora_scale(lora_scale),
        ):
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                phase = schedule.phases[i]
                model = switcher.activate(phase)
                sigma = self.scheduler.sigmas[i].expand(latents.shape[0])
                context = {"step_index": i, "sigma": schedule.sigmas[i], "num_inference_steps": num_steps}
                with model.cache_context("cond", **context):
                    v = family.velocity(model, latents, sigma, cond, attention_kwargs=attention_kwargs)
                if uncond is not None and phase_scales[phase] > 1:
                    with model.cache_context("uncond", **context):
                        v_uncond = family.velocity(model, latents, sigma, uncond, attention_kwargs=attention_kwargs)
                    v = family.combine_cfg(v, v_uncond, phase_scales[phase])
                latents = self.scheduler.step(v, t, latents, generator=generator, return_dict=False)[0]
                if callback_on_step_end is not None:
                    latents = self._step_end(
                        callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, latents, cond, uncond
                    )
                progress_bar.update()
        return latents

    def _step_end(self, callback_on_step_end, tensor_inputs, i, t, latents, cond, uncond) -> torch.Tensor:
        """Call `callback_on_step_end` after step `i` and take the tensors it returns: the latents it gives back
        (returned), the prompt embeddings (put into `cond` / `uncond`)."""
        tensors = {
            "latents": latents,
            "prompt_embeds": cond["prompt_embeds"],
            "negative_prompt_embeds": uncond["prompt_embeds"] if uncond is not None else None,
        }
        callback_kwargs = {k: tensors[k] for k in tensor_inputs}
        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
        latents = callback_outputs.pop("latents", latents)
        cond["prompt_embeds"] = callback_outputs.pop("prompt_embeds", cond["prompt_embeds"])
        if uncond is not None:
            uncond["prompt_embeds"] = callback_outputs.pop("negative_prompt_embeds", uncond["prompt_embeds"])
        return latents

    def _prepare_conditioning(
        self,
        family,
        prompts,
        negative_prompt,
        embeds,
        do_cfg: bool,
        counts: tuple[int, int],
        size: tuple[int, int, int | None],
        guidance_scale,
        image,
        generator,
        latents,
        max_sequence_length: int,
        device,
    ):
        """The text conditioning (and its negative), the initial noise and the size / guidance / image inputs."""
        batch_size, num_per_prompt = counts
        height, width, num_frames = size
        total = batch_size * num_per_prompt
        cond, uncond = self._encode_prompts(
            family, prompts, negative_prompt, *embeds, do_cfg, batch_size, num_per_prompt, max_sequence_length, device
        )
        latents = family.prepare_latents(
            self, total, height, width, num_frames, generator, device, family.latents_dtype(cond), latents
        )
        extra_cond = family.size_cond(height, width, num_frames, batch_size)
        if family.name == "qwen-image" and guidance_scale is not None:
            extra_cond["guidance"] = torch.full([total], float(guidance_scale), device=device, dtype=torch.float32)
        if image is not None:
            extra_cond.update(family.encode_image(self, image, total, height, width, num_frames, device, generator))
        cond.update(extra_cond)
        if uncond is not None:
            uncond.update(extra_cond)
        return cond, uncond, latents

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        true_cfg_scale: float | None = None,
        guidance_scale: float | None = None,
        guidance_scale_2: float | None = None,
        num_images_per_prompt: int | None = None,
        num_videos_per_prompt: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
        image=None,
        output_type: str | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        max_sequence_length: int = 512,
    ):
        r"""
        Generate images (Qwen-Image) or videos (Wan2.2) with the phase experts.

        Arguments follow the family pipeline; those of the other family raise `ValueError`.

        Args:
            prompt (`str` or `list[str]`, *optional*): The prompt(s); or pass `prompt_embeds`.
            negative_prompt (`str` or `list[str]`, *optional*): For classifier-free guidance (only used when the
                guidance scale is > 1; Wan uses `""` when it is not given).
            height (`int`, *optional*), width (`int`, *optional*): Output size in pixels (family defaults: Qwen-Image
                `128 * vae_scale_factor` square, Wan 480 x 832).
            num_frames (`int`, *optional*): Wan only; `num_frames - 1` divisible by the VAE's temporal factor
                (default 81).
            num_inference_steps (`int`, *optional*): Must equal the scheduler's `sum(steps_per_phase)` if given.
            sigmas (`list[float]`, *optional*): Explicit sigmas for the scheduler; each step is made by the expert
                of the phase whose interval holds its sigma (boundaries off the grid act as routing thresholds).
            true_cfg_scale (`float`, *optional*, defaults to 1.0): Qwen-Image guidance; > 1 with a negative prompt
                enables it. Distilled experts need none.
            guidance_scale (`float`, *optional*): Wan: classifier-free guidance for experts on `transformer`
                (default 1.0; > 1 enables it). Qwen-Image: as in `QwenImagePipeline`, the guidance input of a
                guidance-distilled transformer (`guidance_embeds=True`, where it is required); ignored with a
                warning otherwise.
            guidance_scale_2 (`float`, *optional*): Wan guidance for experts on `transformer_2` (defaults to
                `guidance_scale`).
            num_images_per_prompt (`int`, *optional*): Qwen-Image samples per prompt (default 1).
            num_videos_per_prompt (`int`, *optional*): Wan samples per prompt (default 1).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): For reproducible noise.
            latents (`torch.Tensor`, *optional*): Initial noise in the transformer's input space.
            prompt_embeds (`torch.Tensor`, *optional*), prompt_embeds_mask (`torch.Tensor`, *optional*): Precomputed
                text embeddings (and Qwen-Image's padding mask).
            negative_prompt_embeds (`torch.Tensor`, *optional*), negative_prompt_embeds_mask (`torch.Tensor`,
                *optional*): The same for the negative prompt.
            image (`PIL.Image.Image`, `np.ndarray` or `torch.Tensor`, *optional*): First frame for image-to-video,
                as `WanImageToVideoPipeline` uses it: optional for Wan2.2 TI2V-5B, required for Wan2.2 I2V-A14B.
            output_type (`str`, *optional*): `"pil"`, `"np"`, `"pt"` or `"latent"` (Qwen-Image default `"pil"`, Wan
                `"np"`).
            return_dict (`bool`, defaults to `True`): Return the family's output class instead of a tuple.
            attention_kwargs (`dict`, *optional*): Passed to the attention processors.
            callback_on_step_end (`Callable`, *optional*): Called as `callback_on_step_end(self, step, timestep,
                callback_kwargs)` after each step; may return replacements for the tensors.
            callback_on_step_end_tensor_inputs (`list[str]`): Tensors passed to the callback (from
                `_callback_tensor_inputs`).
            max_sequence_length (`int`, defaults to 512): Maximum number of prompt tokens.

        Examples:

        Returns:
            `QwenImagePipelineOutput` (`.images`) for Qwen-Image or `WanPipelineOutput` (`.frames`) for Wan2.2, or a
            tuple `(images_or_frames,)` when `return_dict` is False.
        """
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        # The family pipelines' LoRA scale (`attention_kwargs={"scale": s}`) scales your LoRAs, not the experts.
        attention_kwargs, lora_scale = _pop_lora_scale(attention_kwargs)
        family = self.family
        height, width, num_frames = self._default_size(family, height, width, num_frames)
        output_type = output_type or family.default_output_type
        num_per_prompt = _num_per_prompt(family, num_images_per_prompt, num_videos_per_prompt)

        # 1. Check inputs; none of the models has run yet.
        self.check_inputs(
            family,
            prompt,
            negative_prompt,
            height,
            width,
            num_frames,
            true_cfg_scale,
            guidance_scale,
            guidance_scale_2,
            num_images_per_prompt,
            num_videos_per_prompt,
            generator,
            latents,
            prompt_embeds,
            prompt_embeds_mask,
            negative_prompt_embeds,
            negative_prompt_embeds_mask,
            image,
            output_type,
            callback_on_step_end_tensor_inputs,
            max_sequence_length,
        )
        prompts = [prompt] if isinstance(prompt, str) else prompt
        batch_size = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        total = batch_size * num_per_prompt
        device = self._execution_device

        # 2. Timesteps (a step count the scheduler cannot make is its ValueError, also before any model runs).
        schedule = self._phase_schedule(family, num_inference_steps, sigmas, total, height, width, num_frames, device)

        # 3. Guidance per phase: Qwen-Image's true CFG; Wan's scale of the expert's transformer.
        phase_scales, guidance_scale = self._phase_guidance(
            family, negative_prompt, negative_prompt_embeds, true_cfg_scale, guidance_scale, guidance_scale_2
        )
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False

        # 4. Conditioning and noise, as the family pipeline computes them.
        cond, uncond, latents = self._prepare_conditioning(
            family,
            prompts,
            negative_prompt,
            (prompt_embeds, prompt_embeds_mask, negative_prompt_embeds, negative_prompt_embeds_mask),
            any(phase_scales[p] > 1 for p in set(schedule.phases)),
            (batch_size, num_per_prompt),
            (height, width, num_frames),
            guidance_scale,
            image,
            generator,
            latents,
            max_sequence_length,
            device,
        )

        # 5. Denoising loop: the expert of each step's phase.
        latents = self._denoise(
            family,
            latents,
            schedule,
            phase_scales,
            cond,
            uncond,
            generator,
            attention_kwargs,
            lora_scale,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )

        # 6. Decode.
        self._current_timestep = None
        latents = family.apply_condition(latents, cond)
        output = family.decode(self, latents, height, width, num_frames, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output,)
        return WanPipelineOutput(frames=output) if family.is_video else QwenImagePipelineOutput(images=output)
