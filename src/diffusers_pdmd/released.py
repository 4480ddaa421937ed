# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""Released few-step experts made elsewhere: how their files are laid out, and how their authors sample them.

`PhasedMoEPipeline.from_pretrained(base, experts=FOLDER_OR_REPO)` reads five layouts (`LAYOUTS`):

- `"phased_dmd"`: an experts folder written here (`phased_dmd_config.json`, see `docs/format.md`).
- `"wan_moe_lora"`: Wan2.2 A14B's two-file layout, `high_noise_model.safetensors` (applied to `transformer`) and
  `low_noise_model.safetensors` (applied to `transformer_2`), as Wan2.2-Lightning publishes it.
- `"phase_loras"`: one LoRA file per phase, `phase_0.safetensors`, `phase_1.safetensors`, ..., as
  `python -m diffusers_pdmd.export` writes experts that are not Wan2.2 A14B's one-per-transformer pair.
- `"lora"`: one LoRA file for every phase, as Qwen-Image-Lightning publishes it.
- `"full"`: a fully fine-tuned transformer folder (FastWan style), which takes the `transformer` slot.

LoRA files are read with the family pipeline's own `lora_state_dict` (`WanPipeline.lora_state_dict`,
`QwenImagePipeline.lora_state_dict`), so every key scheme diffusers converts is accepted: the native
`diffusion_model.*.lora_down/lora_up/alpha` keys, bare module names, kohya `lora_unet_*`, extracted LoRAs with
`.diff_b` biases, and diffusers' own `transformer.*.lora_A/lora_B`.

`PRESETS` holds, per known release, the sampler its authors use (steps, shift, phase boundaries, guidance, Euler or
stochastic), so that loading it gives their sampler without configuring anything.
"""

from __future__ import annotations

import fnmatch
import pathlib
import re
from dataclasses import dataclass

import torch

from .hub import CONFIG_NAME, check_readable, multiple_adapters


LAYOUTS = ("phased_dmd", "wan_moe_lora", "phase_loras", "lora", "full")
WAN_MOE_FILES = {"transformer": "high_noise_model.safetensors", "transformer_2": "low_noise_model.safetensors"}
LORA_PREFIX = "transformer"
_PHASE_FILE = re.compile(r"^phase_(\d+)\.safetensors$")


@dataclass(frozen=True)
class Preset:
    """The authors' sampler of one released set of experts.

    Args:
        name (`str`): Key in `PRESETS`.
        family (`str`): The base model family the experts are for.
        layout (`str`): One of `LAYOUTS`.
        files (`tuple[str, ...]`): Glob patterns of the file names that identify the release.
        steps_per_phase (`tuple[int, ...]`), phase_boundaries (`tuple[float, ...]`), shift (`float`): The
            [`PhasedDMDScheduler`] that makes the authors' sigmas and expert switch.
        sigmas (`tuple[float, ...]`): Those sigmas, as the authors' code makes them (documentation and tests).
        guidance_scale (`float`): The classifier-free guidance scale the authors use (1: none).
        stochastic_sampling (`bool`): False: Euler steps; True: re-noise the `x_0` prediction at each step.
        source (`str`): Where the release lives.
    """

    name: str
    family: str
    layout: str
    files: tuple[str, ...]
    steps_per_phase: tuple[int, ...]
    phase_boundaries: tuple[float, ...]
    shift: float
    sigmas: tuple[float, ...]
    guidance_scale: float = 1.0
    stochastic_sampling: bool = False
    source: str = ""

    def scheduler(self, base_scheduler_config: dict | None = None):
        """The [`PhasedDMDScheduler`] of this preset (other settings from the base scheduler's config)."""
        from .schedulers import PhasedDMDScheduler

        return PhasedDMDScheduler.from_config(
            dict(base_scheduler_config or {}),
            phase_boundaries=list(self.phase_boundaries),
            steps_per_phase=list(self.steps_per_phase),
            shift=float(self.shift),
            use_dynamic_shifting=False,
            stochastic_sampling=self.stochastic_sampling,
        )


# Wan2.2-Lightning A14B samples 4 Euler steps on shift-5 sigmas [1, .9375, .8333, .625] with no CFG and switches to
# the low-noise model where t < boundary_ratio * 1000 (875 for T2V, 900 for I2V). Both thresholds fall between the
# 2nd and 3rd sigma, so a boundary at 5/6 (= the 3rd sigma) with 2 + 2 steps and shift 5 makes the same grid and the
# same switch. Qwen-Image-Lightning samples N Euler steps of FlowMatchEulerDiscreteScheduler with a dynamic shift
# fixed at exp(log 3) = 3 (base_shift = max_shift = log 3) and no CFG (true_cfg_scale 1).
_WAN_LIGHTNING_SIGMAS = (1.0, 0.9375, 5 / 6, 0.625)
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="wan2.2-t2v-a14b-lightning",
            family="wan2.2-t2v-a14b",
            layout="wan_moe_lora",
            files=tuple(WAN_MOE_FILES.values()),
            steps_per_phase=(2, 2),
            phase_boundaries=(5 / 6,),
            shift=5.0,
            sigmas=_WAN_LIGHTNING_SIGMAS,
            source="https://huggingface.co/lightx2v/Wan2.2-Lightning (Wan2.2-T2V-A14B-4steps-lora-*)",
        ),
        Preset(
            name="wan2.2-i2v-a14b-lightning",
            family="wan2.2-i2v-a14b",
            layout="wan_moe_lora",
            files=tuple(WAN_MOE_FILES.values()),
            steps_per_phase=(2, 2),
            phase_boundaries=(5 / 6,),
            shift=5.0,
            sigmas=_WAN_LIGHTNING_SIGMAS,
            source="https://huggingface.co/lightx2v/Wan2.2-Lightning (Wan2.2-I2V-A14B-4steps-lora-*)",
        ),
        Preset(
            name="qwen-image-lightning-8steps",
            family="qwen-image",
            layout="lora",
            files=("*8step*.safetensors",),
            steps_per_phase=(8,),
            phase_boundaries=(),
            shift=3.0,
            sigmas=tuple(3 * s / (1 + 2 * s) for s in (1 - i / 8 for i in range(8))),
            source="https://huggingface.co/lightx2v/Qwen-Image-Lightning (Qwen-Image-Lightning-8steps-*)",
        ),
        Preset(
            name="qwen-image-lightning-4steps",
            family="qwen-image",
            layout="lora",
            files=("*4step*.safetensors",),
            steps_per_phase=(4,),
            phase_boundaries=(),
            shift=3.0,
            sigmas=tuple(3 * s / (1 + 2 * s) for s in (1 - i / 4 for i in range(4))),
            source="https://huggingface.co/lightx2v/Qwen-Image-Lightning (Qwen-Image-Lightning-4steps-*)",
        ),
    )
}


def _safetensors_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors")


def phase_files(folder: pathlib.Path) -> list[pathlib.Path] | None:
    """`[phase_0.safetensors, ..., phase_{K-1}.safetensors]` when those are the folder's only safetensors files (the
    export's one-file-per-phase layout), else `None`."""
    files = _safetensors_files(folder)
    indices = [_PHASE_FILE.match(f.name) for f in files]
    if not files or not all(indices):
        return None
    by_index = {int(m.group(1)): f for m, f in zip(indices, files)}
    if sorted(by_index) != list(range(len(files))):
        return None
    return [by_index[k] for k in range(len(files))]


def phase_file_sibling(file: pathlib.Path) -> bool:
    """`file` is one `phase_k.safetensors` of a folder holding one such file per phase (an export)."""
    files = phase_files(file.parent) if _PHASE_FILE.match(file.name) else None
    return files is not None and len(files) > 1


def detect_layout(path: str | pathlib.Path, layout: str | None = None) -> tuple[str, pathlib.Path, list[pathlib.Path]]:
    """The layout of an experts folder or file.

    Args:
        path (`str` or `pathlib.Path`): A folder, or one `.safetensors` LoRA file.
        layout (`str`, *optional*): One of `LAYOUTS` to read the folder as (detected when omitted).

    Returns:
        `(layout, folder, files)`: one of `LAYOUTS`, the folder, and the weight files (for `"wan_moe_lora"` in
        slot order `transformer`, `transformer_2`; for `"phase_loras"` in phase order; for `"lora"` the one file;
        empty otherwise).

    Raises:
        `ValueError` naming the path: nothing recognisable, only one of Wan's two files, several candidate LoRA
        files, or not the requested layout.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"`experts_format` must be one of {LAYOUTS} or None, got {layout!r}.")
    path = pathlib.Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: experts are read from safetensors files only.")
        if layout not in (None, "lora"):
            raise ValueError(f"{path} is one file, which can only be read as `experts_format='lora'`, not {layout!r}.")
        return "lora", path.parent, [path]
    if not path.is_dir():
        raise ValueError(f"{path} is neither an experts folder nor a .safetensors file.")
    found = {
        "phased_dmd": (path / CONFIG_NAME).is_file(),
        "wan_moe_lora": all((path / name).is_file() for name in WAN_MOE_FILES.values()),
        "full": (path / "config.json").is_file(),
    }
    present = [name for name in WAN_MOE_FILES.values() if (path / name).is_file()]
    if (
        layout in (None, "wan_moe_lora")
        and not found["phased_dmd"]
        and len(present) == 1
        or (layout == "wan_moe_lora" and not present)
    ):
        missing = [name for name in WAN_MOE_FILES.values() if name not in present]
        raise ValueError(
            f"{path} holds {present or 'neither file'} but not {missing}: the Wan2.2 A14B layout needs both "
            f"{list(WAN_MOE_FILES.values())} (high noise on `transformer`, low noise on `transformer_2`)."
        )
    explicit = layout is not None
    if layout is None:
        layout = next((name for name, ok in found.items() if ok), "lora")
    elif layout not in ("lora", "phase_loras") and not found[layout]:
        raise ValueError(
            f"{path} is not in the {layout!r} layout (it needs "
            f"{ {'phased_dmd': CONFIG_NAME, 'full': 'config.json'}[layout] })."
        )
    if layout == "wan_moe_lora":
        return layout, path, [path / name for name in WAN_MOE_FILES.values()]
    if layout == "phase_loras" or (layout == "lora" and not explicit):
        per_phase = phase_files(path)
        if per_phase is not None and (len(per_phase) > 1 or layout == "phase_loras"):
            return "phase_loras", path, per_phase
        if layout == "phase_loras":
            raise ValueError(
                f"{path} is not in the 'phase_loras' layout: it needs phase_0.safetensors, phase_1.safetensors, ... "
                "and no other .safetensors files."
            )
    if layout != "lora":
        return layout, path, []
    files = _safetensors_files(path)
    if len(files) == 1:
        return "lora", path, files
    if files:
        raise ValueError(
            f"{path} holds several LoRA files {[f.name for f in files]}; pass the one to use as `experts=` (the file "
            "path) or `experts_subfolder=`."
        )
    raise ValueError(
        f"{path} holds no experts: expected {CONFIG_NAME}, {' + '.join(WAN_MOE_FILES.values())}, one LoRA "
        ".safetensors file, or a transformer folder (config.json)."
    )


def find_preset(family: str, layout: str, files: list[pathlib.Path]) -> Preset | None:
    """The preset of the release whose file names match, for this base family and layout; `None` if unknown."""
    for preset in PRESETS.values():
        if preset.family != family or preset.layout != layout:
            continue
        if all(any(fnmatch.fnmatch(f.name.lower(), pattern.lower()) for f in files) for pattern in preset.files):
            return preset
    return None


def _pipeline_class(family: str):
    import diffusers

    return diffusers.QwenImagePipeline if family == "qwen-image" else diffusers.WanPipeline


def lora_state_dict(family: str, file: pathlib.Path, transformer: torch.nn.Module) -> tuple[dict, dict | None]:
    """Read a LoRA file in any key scheme the family's diffusers pipeline converts, and check it fits `transformer`.

    Returns:
        `(state_dict, metadata)`: keys `transformer.<module>.lora_A/lora_B...` as diffusers' `load_lora_adapter`
        takes them (alpha folded into the weights when the file has `.alpha` keys), and diffusers' adapter metadata
        (rank, alpha) when the file carries it.

    Raises:
        `ValueError` naming the file: a key scheme diffusers does not convert for this family, full-weight `.diff`
        keys diffusers would drop, LoRA modules the transformer does not have, or shapes that do not fit.
    """
    from safetensors import safe_open

    raw_keys = check_readable(file)
    native = [k.removeprefix("diffusion_model.") for k in raw_keys]
    dropped = [k for k in native if k.endswith(".diff") and "norm" not in k and k != "head.head.diff"]
    if dropped:
        with safe_open(str(file), framework="pt") as handle:
            nonzero = [
                k for k in raw_keys if k.removeprefix("diffusion_model.") in dropped and handle.get_tensor(k).any()
            ]
        if nonzero:
            raise ValueError(
                f"{file}: {len(nonzero)} full-weight `.diff` keys (e.g. {nonzero[0]!r}) are not zero, and diffusers' "
                f"{family} LoRA converter does not apply them; the experts would be loaded incompletely."
            )
    pipeline_cls = _pipeline_class(family)
    try:
        state_dict, metadata = pipeline_cls.lora_state_dict(
            str(file.parent), weight_name=file.name, use_safetensors=True, return_lora_metadata=True
        )
        if family != "qwen-image":
            state_dict = pipeline_cls._maybe_expand_t2v_lora_for_i2v(transformer, state_dict)
    except (ValueError, KeyError, IndexError, AttributeError) as err:
        raise ValueError(
            f"{file}: {pipeline_cls.__name__}.lora_state_dict cannot read it as a {family} LoRA "
            f"({type(err).__name__}: {err}). Is it a LoRA for another model family?"
        ) from err
    if not state_dict or not all(k.startswith(f"{LORA_PREFIX}.") and "lora" in k for k in state_dict):
        example = next((k for k in state_dict if not k.startswith(f"{LORA_PREFIX}.") or "lora" not in k), None)
        raise ValueError(
            f"{file}: not a {family} LoRA ({pipeline_cls.__name__}.lora_state_dict leaves keys such as {example!r}, "
            f"not `{LORA_PREFIX}.<module>.lora_A/lora_B`). Is it a LoRA for another model family?"
        )
    check_fits(state_dict, transformer, file)
    return state_dict, metadata


def check_fits(state_dict: dict, transformer: torch.nn.Module, file) -> None:
    """Raise `ValueError` naming `file` unless every `transformer.<module>.lora_*` entry fits a linear layer."""
    modules = dict(transformer.named_modules())
    missing, mismatched = [], []
    for key, tensor in state_dict.items():
        name, _, part = key.removeprefix(f"{LORA_PREFIX}.").partition(".lora_")
        module = modules.get(name)
        module = getattr(module, "base_layer", module)
        if not isinstance(module, torch.nn.Linear):
            missing.append(name)
            continue
        if part == "A.weight" and tensor.shape[1] != module.in_features:
            mismatched.append(f"{key} {tuple(tensor.shape)} vs in_features {module.in_features}")
        elif part in ("B.weight", "B.bias") and tensor.shape[0] != module.out_features:
            mismatched.append(f"{key} {tuple(tensor.shape)} vs out_features {module.out_features}")
    if missing:
        raise ValueError(
            f"{file}: {len(set(missing))} LoRA modules are not linear layers of the base's "
            f"{type(transformer).__name__} (e.g. {sorted(set(missing))[0]!r}). Is it a LoRA for another model "
            "family?"
        )
    if mismatched:
        raise ValueError(
            f"{file}: {len(mismatched)} LoRA shapes do not fit the base's {type(transformer).__name__} (e.g. "
            f"{mismatched[0]}). Is it for another size of the model?"
        )


def load_lora(family: str, transformer: torch.nn.Module, file: pathlib.Path, adapter_name: str) -> None:
    """Add the LoRA in `file` (any key scheme diffusers converts for `family`) to `transformer` as an unfused
    peft adapter named `adapter_name`."""
    if adapter_name in getattr(transformer, "peft_config", {}):
        raise ValueError(f"`adapter_name` {adapter_name!r} is already an adapter of the transformer.")
    state_dict, metadata = lora_state_dict(family, file, transformer)
    with multiple_adapters():
        transformer.load_lora_adapter(state_dict, prefix=LORA_PREFIX, adapter_name=adapter_name, metadata=metadata)


__all__ = [
    "LAYOUTS",
    "PRESETS",
    "Preset",
    "WAN_MOE_FILES",
    "detect_layout",
    "find_preset",
    "load_lora",
    "phase_files",
]
