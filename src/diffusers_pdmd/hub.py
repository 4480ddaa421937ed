# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""Phased DMD expert repositories: their config, weights, model card, and Hub upload and download.

An experts repository holds only what distillation changed; its base model is named in the config and fetched
separately. Layout (see `docs/format.md`):

    phased_dmd_config.json               ExpertsConfig (format_version 1)
    scheduler/scheduler_config.json      PhasedDMDScheduler
    phase_0/pytorch_lora_weights.safetensors   a LoRA expert (diffusers LoRA format, keys prefixed `transformer.`,
                                               the scale alpha / rank in the weights)
    phase_1/config.json + *.safetensors        or a fully fine-tuned transformer
    README.md                            model card (written before pushing)

A full pipeline folder is the same plus `model_index.json` and the base components' folders.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import warnings
from dataclasses import asdict, dataclass, field

import torch

from .families import FAMILIES, TRANSFORMER_SLOTS, get_family


CONFIG_NAME = "phased_dmd_config.json"
FORMAT_VERSION = 1
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_PREFIX = "transformer"
EXPERT_TYPES = ("lora", "full", "base")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_relative_path(value, field_name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"`{field_name}` must be a non-empty relative path, got {value!r}.")
    path = pathlib.PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or "\\" in value:
        raise ValueError(f"`{field_name}` must be a relative path inside the repository, got {value!r}.")
    return value


@dataclass
class ExpertsConfig:
    """Contents of `phased_dmd_config.json`.

    Args:
        family (`str`): One of `FAMILIES`.
        base_model (`str`): Hub repo id or local path of the base (teacher) pipeline the experts apply to. May be
            `None` only in a full pipeline folder, which holds its base components itself.
        base_revision (`str`, *optional*): Revision (commit, branch or tag) of `base_model`; `None` for the default.
        phase_boundaries (`list[float]`): The K-1 decreasing sigmas where phases change (the scheduler's).
        steps_per_phase (`list[int]`): K step counts.
        method (`str`): How the experts were made, e.g. `"phased_dmd"`, `"sgts"` (DMD2), `"dmd"`.
        experts (`list[dict]`): K entries `{"phase": k, "base_transformer": "transformer" | "transformer_2",
            "type": "lora" | "full" | "base", "path": "phase_k"}` in phase order. `"lora"`: a LoRA file in `path`
            applied to `base_transformer` of the base model; `"full"`: a fine-tuned transformer folder in `path`
            that takes the `base_transformer` slot; `"base"`: the base model's transformer itself (no files, `path`
            is `null`).
        format_version (`int`): 1.
    """

    family: str
    base_model: str | None
    phase_boundaries: list[float]
    steps_per_phase: list[int]
    experts: list[dict]
    base_revision: str | None = None
    method: str = "phased_dmd"
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError`, naming the field, if the config is inconsistent."""
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"`format_version` must be {FORMAT_VERSION}, got {self.format_version!r}.")
        if self.family not in FAMILIES:
            raise ValueError(f"`family` must be one of {FAMILIES}, got {self.family!r}.")
        if self.base_model is not None and (not isinstance(self.base_model, str) or not self.base_model):
            raise ValueError(f"`base_model` must be a Hub repo id, a path or null, got {self.base_model!r}.")
        if self.base_revision is not None and (not isinstance(self.base_revision, str) or not self.base_revision):
            raise ValueError(f"`base_revision` must be a non-empty string or null, got {self.base_revision!r}.")
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"`method` must be a non-empty string, got {self.method!r}.")
        bounds = self.phase_boundaries
        if (
            not isinstance(bounds, list | tuple)
            or not all(_is_number(b) and 0 < b < 1 for b in bounds)
            or any(a <= b for a, b in zip(bounds, bounds[1:]))
        ):
            raise ValueError(f"`phase_boundaries` must be strictly decreasing numbers in (0, 1), got {bounds!r}.")
        self.phase_boundaries = [float(b) for b in bounds]
        num_phases = len(bounds) + 1
        steps = self.steps_per_phase
        if (
            not isinstance(steps, list | tuple)
            or len(steps) != num_phases
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in steps)
        ):
            raise ValueError(f"`steps_per_phase` must be {num_phases} positive ints (one per phase), got {steps!r}.")
        self.steps_per_phase = list(steps)
        if not isinstance(self.experts, list | tuple) or len(self.experts) != num_phases:
            raise ValueError(
                f"`experts` must list {num_phases} experts (one per phase: {len(bounds)} boundaries), got "
                f"{len(self.experts) if isinstance(self.experts, list | tuple) else self.experts!r}."
            )
        teacher_slots = get_family(self.family).transformer_names
        experts = []
        for k, expert in enumerate(self.experts):
            if not isinstance(expert, dict):
                raise ValueError(f"`experts[{k}]` must be an object, got {expert!r}.")
            unknown = set(expert) - {"phase", "base_transformer", "type", "path"}
            if unknown:
                raise ValueError(f"`experts[{k}]` has unknown keys {sorted(unknown)}.")
            if expert.get("phase") != k:
                raise ValueError(f"`experts[{k}].phase` must be {k} (experts are listed in phase order).")
            slot = expert.get("base_transformer")
            if slot not in TRANSFORMER_SLOTS:
                raise ValueError(f"`experts[{k}].base_transformer` must be one of {TRANSFORMER_SLOTS}, got {slot!r}.")
            kind = expert.get("type")
            if kind not in EXPERT_TYPES:
                raise ValueError(f"`experts[{k}].type` must be one of {EXPERT_TYPES}, got {kind!r}.")
            if kind != "full" and slot not in teacher_slots:
                raise ValueError(
                    f"`experts[{k}].base_transformer` must be one of {teacher_slots} for a {kind!r} expert of "
                    f"{self.family}, got {slot!r}."
                )
            path = expert.get("path")
            if kind == "base":
                if path is not None:
                    raise ValueError(f"`experts[{k}].path` must be null for a 'base' expert, got {path!r}.")
            else:
                _check_relative_path(path, f"experts[{k}].path")
            experts.append({"phase": k, "base_transformer": slot, "type": kind, "path": path})
        for slot in TRANSFORMER_SLOTS:
            on_slot = [e for e in experts if e["base_transformer"] == slot]
            full_paths = {e["path"] for e in on_slot if e["type"] == "full"}
            if full_paths and (len(full_paths) > 1 or any(e["type"] != "full" for e in on_slot)):
                raise ValueError(
                    f"`experts`: base_transformer {slot!r} holds a 'full' expert, so every expert on it must be that "
                    f"same full transformer (same `path`); got {on_slot}."
                )
        self.experts = experts

    @property
    def num_phases(self) -> int:
        return len(self.phase_boundaries) + 1

    def to_dict(self) -> dict:
        """JSON-serialisable dict in the documented field order."""
        data = asdict(self)
        order = ("format_version", "family", "base_model", "base_revision", "phase_boundaries", "steps_per_phase")
        ordered = {k: data[k] for k in (*order, "method", "experts")}
        ordered.update(self.extra)
        return ordered

    @classmethod
    def from_dict(cls, data: dict) -> ExpertsConfig:
        """Build and validate from a dict (as read from `phased_dmd_config.json`)."""
        if not isinstance(data, dict):
            raise ValueError(f"The experts config must be a JSON object, got {type(data).__name__}.")
        data = dict(data)
        required = ("family", "base_model", "phase_boundaries", "steps_per_phase", "experts")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"The experts config is missing the field(s) {missing}.")
        known = {"format_version", "base_revision", "method", *required}
        extra = {k: data.pop(k) for k in list(data) if k not in known}
        unknown = [k for k in extra if not k.startswith("_")]
        if unknown:
            raise ValueError(f"The experts config has unknown field(s) {unknown} (private fields start with '_').")
        return cls(**data, extra=extra)

    def save(self, out_dir: str | os.PathLike) -> pathlib.Path:
        """Write `phased_dmd_config.json` into `out_dir` (created if needed); returns its path."""
        out_dir = pathlib.Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path_or_dir: str | os.PathLike) -> ExpertsConfig:
        """Read and validate `phased_dmd_config.json` from a folder (or the file itself)."""
        path = pathlib.Path(path_or_dir)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise ValueError(f"No {CONFIG_NAME} at {path}: not a Phased DMD experts folder.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data)


@contextlib.contextmanager
def multiple_adapters():
    """Silence peft's "Already found a `peft_config` attribute in the model" warning inside the block.

    peft warns each time a second adapter is added to a model; Phased DMD keeps one adapter per phase (and fake
    scores in training) on one base by design, so the warning says nothing a user could act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        yield


def _tuner_layers(transformer: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


def base_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformer's own weights without peft LoRA layers: `lora_*` entries dropped, `.base_layer` removed.

    Raises:
        `ValueError`: If a LoRA is fused (merged) into the weights.
    """
    if any(layer.merged for layer in _tuner_layers(transformer)):
        raise ValueError("The transformer has fused (merged) LoRA weights; call `unfuse_lora()` before saving it.")
    state_dict = {}
    for key, tensor in transformer.state_dict().items():
        parts = key.split(".")
        if any(part.startswith("lora_") for part in parts):
            continue
        state_dict[".".join(part for part in parts if part != "base_layer")] = tensor
    return state_dict


def check_readable(file: pathlib.Path) -> list[str]:
    """The tensor names of safetensors `file`; `ValueError` naming the file if it is truncated or corrupt."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except Exception as err:  # safetensors' SafetensorError for a bad header or a truncated file
        raise ValueError(
            f"{file} is not a readable safetensors file ({type(err).__name__}: {err}); it may be truncated or "
            "corrupt (an interrupted download or copy): fetch or write it again."
        ) from err


def lora_weight_name(variant: str | None = None) -> str:
    """File name of a LoRA expert: `pytorch_lora_weights.safetensors`, or with a variant inserted before the
    extension as diffusers names variants (`"fp16"` -> `pytorch_lora_weights.fp16.safetensors`)."""
    from diffusers.utils.hub_utils import _add_variant

    if variant is not None and (not isinstance(variant, str) or not variant or "/" in variant or "." in variant):
        raise ValueError(f"`variant` must be a short name such as 'fp16' (no '.' or '/'), got {variant!r}.")
    return _add_variant(LORA_WEIGHT_NAME, variant)


_WRAPPER_PARTS = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


def adapter_scalings(transformer: torch.nn.Module, adapter_name: str) -> dict[str, float]:
    """Module name -> the peft scaling of adapter `adapter_name` on that module: `lora_alpha / r`, or
    `lora_alpha / sqrt(r)` with rsLoRA, from the layer's own rank and alpha (so `rank_pattern` / `alpha_pattern` are
    honoured, and a temporary `set_scale` / `scale_layer` in force is not)."""
    scalings = {}
    for name, module in transformer.named_modules():
        r = getattr(module, "r", None)
        if not isinstance(r, dict) or adapter_name not in r or adapter_name not in getattr(module, "lora_alpha", {}):
            continue
        rank, alpha = r[adapter_name], module.lora_alpha[adapter_name]
        rslora = getattr(module, "use_rslora", {}).get(adapter_name, False)
        # The module's name in the state dict: without the parts FSDP, activation checkpointing or compile insert.
        name = ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)
        scalings[name] = alpha / math.sqrt(rank) if rslora else alpha / rank
    return scalings


def lora_file_scalings(state_dict: dict[str, torch.Tensor], lora_config: dict | None) -> dict[str, float]:
    """Module name -> the scaling diffusers' `load_lora_adapter` gives the LoRA of that module in a file with
    tensors `state_dict` (keys `<module>.lora_A.weight`, ..., without the `transformer.` prefix) and `LoraConfig`
    metadata `lora_config` (keys without the prefix): peft's rule on the module's rank (the rows of its `lora_A`).

    Files without metadata get scaling 1 (diffusers then takes `lora_alpha = r`; LoRAs with `.alpha` keys are not
    handled here). The files `save_lora_expert` writes hold scaling 1 for every module; earlier versions' files hold
    the trained `lora_alpha / r`.
    """
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    ranks = {k.split(".lora_A")[0]: v.shape[0] for k, v in state_dict.items() if ".lora_A." in k}
    if not lora_config:
        return dict.fromkeys(ranks, 1.0)
    config = LoraConfig(**lora_config)
    scalings = {}
    for module, rank in ranks.items():
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scalings[module] = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
    return scalings


def scale_lora_up(state_dict: dict[str, torch.Tensor], factors: dict[str, float]) -> dict[str, torch.Tensor]:
    """`state_dict` with each module's `lora_B` (weight and bias: the LoRA's output) times `factors[module]`
    (modules not in `factors`, and factors of exactly 1, are left as they are). Computed in float64 and rounded
    once to each tensor's dtype, so scaling by a power of two and back is exact."""
    out = {}
    for key, tensor in state_dict.items():
        module, _, part = key.partition(".lora_")
        factor = factors.get(module, 1.0)
        if part.startswith(("B.", "embedding_B")) and factor != 1.0:
            tensor = (tensor.double() * factor).to(tensor.dtype)
        out[key] = tensor
    return out


def read_lora_file(file: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a diffusers LoRA file and its `LoraConfig` metadata (`{}` for none), keys as written
    (tensor keys prefixed `transformer.`, metadata keys without the prefix)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
    config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    config = {k.removeprefix(f"{LORA_PREFIX}."): v for k, v in config.items()}
    return load_file(str(file)), config


def save_lora_expert(
    transformer: torch.nn.Module, adapter_name: str, out_dir: str | os.PathLike, variant: str | None = None
) -> pathlib.Path:
    """Write one peft adapter of `transformer` as a diffusers LoRA file that every loader reads at its strength.

    The file is `out_dir/pytorch_lora_weights.safetensors` (`pytorch_lora_weights.<variant>.safetensors` with a
    `variant`): keys prefixed `transformer.` and a `LoraConfig` in the safetensors metadata, as diffusers'
    `save_lora_weights` writes it, so `transformer.load_lora_adapter(out_dir, weight_name=..., prefix="transformer")`
    and the family pipelines' `load_lora_weights` read it.

    The LoRA scale is in the weights: each module's `lora_B` is multiplied by the adapter's scaling on that module
    (`lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA, per `rank_pattern` / `alpha_pattern`), and the
    metadata says scaling 1 everywhere (`lora_alpha = r`, `alpha_pattern` = `rank_pattern`, no rsLoRA). So diffusers
    (which reads the metadata) and loaders that ignore metadata (ComfyUI: `W + B @ A` without `.alpha` keys) apply
    the same weights, those of the trained adapter.

    Args:
        transformer (`torch.nn.Module`): A diffusers transformer holding the adapter.
        adapter_name (`str`): The peft adapter to save.
        out_dir (`str` or `os.PathLike`): Destination folder (created if needed).
        variant (`str`, *optional*): Variant name put in the file name, e.g. `"fp16"`.

    Returns:
        `pathlib.Path`: The written file.
    """
    from diffusers.loaders.lora_base import LoraBaseMixin
    from peft.utils import get_peft_model_state_dict

    peft_config = getattr(transformer, "peft_config", {})
    if adapter_name not in peft_config:
        raise ValueError(
            f"`adapter_name` {adapter_name!r} is not an adapter of the transformer: {sorted(peft_config)}."
        )
    weight_name = lora_weight_name(variant)
    with warnings.catch_warnings():
        if getattr(peft_config[adapter_name], "lora_bias", False):
            # peft takes the 1-D `lora_B.bias` of a LoRA with a bias (`.diff_b` keys) for an ungathered shard
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape: .*lora_B\.bias")
        layers = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    scalings = adapter_scalings(transformer, adapter_name)
    unscaled = sorted({k.partition(".lora_")[0] for k in layers if ".lora_" in k} - set(scalings))
    if unscaled:  # a module name the layers do not give (a wrapper): its scale would be lost
        raise ValueError(f"No LoRA scaling found for the modules {unscaled[:3]} of adapter {adapter_name!r}.")
    layers = scale_lora_up({k: v.detach() for k, v in layers.items()}, scalings)
    state_dict = {f"{LORA_PREFIX}.{k}": v.contiguous() for k, v in layers.items()}
    config = peft_config[adapter_name].to_dict()
    rank_pattern = dict(config.get("rank_pattern") or {})
    # Scaling 1 for every module: alpha = rank wherever peft looks the rank up (same pattern keys, same matches).
    config.update(lora_alpha=config["r"], alpha_pattern=rank_pattern, use_rslora=False)
    metadata = {f"{LORA_PREFIX}.{k}": v for k, v in config.items()}
    out_dir = pathlib.Path(out_dir)
    LoraBaseMixin.write_lora_layers(
        state_dict=state_dict,
        save_directory=str(out_dir),
        is_main_process=True,
        weight_name=weight_name,
        save_function=None,
        safe_serialization=True,
        lora_adapter_metadata=metadata,
    )
    return out_dir / weight_name


def load_lora_expert(
    transformer: torch.nn.Module, path_or_dir: str | os.PathLike, adapter_name: str, variant: str | None = None
) -> None:
    """Add the LoRA in `path_or_dir` (a file or a folder holding `pytorch_lora_weights.safetensors`, or
    `pytorch_lora_weights.<variant>.safetensors` with a `variant`) to `transformer` as peft adapter `adapter_name`,
    unfused. Only safetensors files are read."""
    path = pathlib.Path(path_or_dir)
    folder, weight_name = (path, lora_weight_name(variant)) if path.is_dir() else (path.parent, path.name)
    if not (folder / weight_name).is_file():
        raise ValueError(f"No LoRA weights at {folder / weight_name}.")
    if adapter_name in getattr(transformer, "peft_config", {}):
        raise ValueError(f"`adapter_name` {adapter_name!r} is already an adapter of the transformer.")
    check_readable(folder / weight_name)
    with multiple_adapters():
        transformer.load_lora_adapter(
            str(folder), weight_name=weight_name, prefix=LORA_PREFIX, adapter_name=adapter_name, use_safetensors=True
        )


def save_full_expert(
    transformer: torch.nn.Module,
    out_dir: str | os.PathLike,
    max_shard_size: int | str = "10GB",
    variant: str | None = None,
) -> pathlib.Path:
    """Write a fully fine-tuned transformer as a diffusers model folder (`config.json` + safetensors, named with
    `variant` as diffusers' `save_pretrained(variant=...)` names them).

    peft LoRA layers, if any, are left out: only the transformer's own weights are written.
    """
    out_dir = pathlib.Path(out_dir)
    if not _tuner_layers(transformer):
        transformer.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size, variant=variant)
        return out_dir
    from diffusers.utils.hub_utils import _add_variant
    from huggingface_hub import save_torch_state_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    transformer.save_config(out_dir)
    # The file names diffusers' `ModelMixin.save_pretrained(variant=...)` writes and `from_pretrained` reads.
    pattern = _add_variant("diffusion_pytorch_model.safetensors", variant).replace(
        ".safetensors", "{suffix}.safetensors"
    )
    save_torch_state_dict(
        base_state_dict(transformer), out_dir, filename_pattern=pattern, max_shard_size=max_shard_size
    )
    index = out_dir / (pattern.format(suffix="") + ".index.json")
    if variant is not None and index.is_file():
        index.rename(out_dir / _add_variant("diffusion_pytorch_model.safetensors.index.json", variant))
    return out_dir


def load_full_expert(
    transformer_cls, out_dir: str | os.PathLike, dtype: torch.dtype | None = None, variant: str | None = None
):
    """Load a transformer folder written by [`save_full_expert`] (safetensors only)."""
    return transformer_cls.from_pretrained(str(out_dir), dtype=dtype, variant=variant, use_safetensors=True)


def resolve_repo(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    allow_patterns: list[str] | None = None,
) -> pathlib.Path:
    """Local folder of a repository: a local directory as it is, otherwise a Hub snapshot.

    Hub repositories go through `huggingface_hub.snapshot_download`, which uses the cache (`cache_dir`, or
    `HF_HUB_CACHE`) and, offline (`local_files_only=True` or `HF_HUB_OFFLINE=1`), only the cache. `allow_patterns`
    limits the download (e.g. to one subfolder of a repository holding several releases).

    Raises:
        `ValueError`: Neither an existing directory nor a valid repo id.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = pathlib.Path(path_or_repo_id)
    if path.is_dir():
        return path
    repo_id = str(path_or_repo_id)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{repo_id!r} is neither a local directory nor a valid Hub repo id ({err}).") from err
    if local_files_only is None:
        local_files_only = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {
            "1",
            "ON",
            "YES",
            "TRUE",
        }
    if cache_dir is None and os.environ.get("HF_HUB_CACHE"):
        cache_dir = os.environ["HF_HUB_CACHE"]
    folder = snapshot_download(
        repo_id,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=bool(local_files_only),
        allow_patterns=allow_patterns,
    )
    return pathlib.Path(folder)


def base_model_reference(
    path_or_repo_id: str | os.PathLike, revision: str | None = None, base_model_id: str | None = None
) -> tuple[str, str | None]:
    """What `phased_dmd_config.json` records as `base_model` / `base_revision` for a base loaded from here.

    A Hub repo id is kept. A local Hub cache snapshot (`.../models--org--name/snapshots/<commit>`) gives
    `("org/name", "<commit>")`, so the experts resolve on any machine. `base_model_id` (a repo id) names the base of
    another local folder (its `revision` is kept). Otherwise the absolute local path is recorded, with a warning:
    such experts load only where that folder exists (elsewhere, pass the base with `experts=`).

    Raises:
        `ValueError`: `base_model_id` is not a valid Hub repo id.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if base_model_id is not None:
        try:
            validate_repo_id(base_model_id)
        except HFValidationError as err:
            raise ValueError(f"`--base_model_id` must be a Hub repo id (org/name), got {base_model_id!r}.") from err
    path = pathlib.Path(path_or_repo_id)
    if not path.is_dir():
        return base_model_id or str(path_or_repo_id), revision
    path = path.resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots" and i + 2 == len(parts) - 1:
            repo_id = parts[i].removeprefix("models--").replace("--", "/")
            if base_model_id is None or base_model_id == repo_id:
                return repo_id, revision or parts[i + 2]
    if base_model_id is not None:
        return base_model_id, revision
    import logging

    logging.getLogger(__name__).warning(
        "The experts name their base by the local path %s, which other machines do not have; pass "
        "`--base_model_id org/name` (the Hub repo of this base) to make them portable.",
        path,
    )
    return str(path), revision


_USAGE = """```python
{install}import torch
{imports}from diffusers_pdmd import PhasedMoEPipeline

device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
pipe = PhasedMoEPipeline.from_pretrained({repo_id}, dtype=dtype).to(device)
{image}out = pipe({prompt}{size}{image_arg}, generator=torch.Generator(device).manual_seed(0))
{save}
```"""


def _usage(family, repo_id: str, prompt: str, size: tuple | None) -> str:
    """The model card's usage snippet: the run's own prompt and size, on the GPU if there is one."""
    image_to_video = bool(getattr(family, "image_concat", False))  # Wan2.2 I2V-A14B needs the first frame
    size_kwargs = ""
    if size is not None:
        names = ("height", "width", "num_frames") if family.is_video else ("height", "width")
        size_kwargs = "".join(f", {n}={v}" for n, v in zip(names, size) if v is not None)
    video = family.is_video
    return _USAGE.format(
        install='# pip install "diffusers-pdmd[video]"  (imageio and imageio-ffmpeg, for export_to_video)\n'
        if video
        else "",
        imports=(
            "from diffusers.utils import export_to_video, load_image\n"
            if image_to_video
            else "from diffusers.utils import export_to_video\n"
            if video
            else ""
        ),
        repo_id=repo_id,
        image='image = load_image("first_frame.png")  # the first frame of the video\n' if image_to_video else "",
        prompt=json.dumps(prompt),
        size=size_kwargs,
        image_arg=", image=image" if image_to_video else "",
        save='export_to_video(out.frames[0], "sample.mp4", fps=16)' if video else 'out.images[0].save("sample.png")',
    )


def sampler_settings(scheduler) -> tuple[list[float], float, str]:
    """`(sigmas without the final 0, shift, where)` of a [`PhasedDMDScheduler`]; a dynamic (Qwen-Image) shift is taken
    at 1024x1024 (4096 image tokens), `where` says so."""
    mu, where = None, ""
    config = scheduler.config
    if config.use_dynamic_shifting:
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        mu = config.base_shift + slope * (4096 - config.base_image_seq_len)
        where = " at 1024x1024 (the shift grows with the image size)"
    scheduler.set_timesteps(mu=mu)
    return [float(s) for s in scheduler.sigmas[:-1]], scheduler._effective_shift(mu), where


def comfyui_section(config: ExpertsConfig, scheduler, files: list[str]) -> str:
    """Markdown: the ComfyUI nodes and settings that sample these experts (files: the `comfyui/` file names)."""
    family = get_family(config.family)
    sigmas, shift, where = sampler_settings(scheduler)
    total = len(sigmas)
    simple = [shift * (1 - i / total) / (1 + (shift - 1) * (1 - i / total)) for i in range(total)]
    gap = max(abs(a - b) for a, b in zip(sigmas, simple))
    node = "ModelSamplingAuraFlow" if config.family == "qwen-image" else "ModelSamplingSD3"
    sampler = "lcm" if scheduler.config.stochastic_sampling else "euler"
    two = len(family.transformer_names) == 2
    rows, start = [], 0
    for k, n in enumerate(config.steps_per_phase):
        model = ("high" if config.experts[k]["base_transformer"] == "transformer" else "low") + "-noise model"
        on = f"the {model}" if two else "the model"
        rows.append(f"| {k} | `comfyui/{files[k]}` on {on} | {start} | {start + n} |")
        start += n
    schedule = (
        "ComfyUI's `simple` scheduler at this shift gives these sigmas"
        if gap < 1e-3
        else f"ComfyUI's `simple` scheduler differs from them by up to {gap:.3f}; to sample the experts' sigmas feed "
        "this list to `SamplerCustomAdvanced` through a custom-sigmas node"
    )
    return (
        "## ComfyUI\n\n`comfyui/` holds the experts in ComfyUI's LoRA layout; load those files. "
        "`phase_k/pytorch_lora_weights.safetensors` is diffusers' layout (its weights carry the LoRA scale, so "
        "Qwen-Image's loads at the trained strength in ComfyUI too, but ComfyUI maps none of Wan's diffusers keys). "
        "One `LoraLoaderModelOnly` (strength 1.0) per phase, on "
        + ("the high- or low-noise model" if two else "the base model")
        + f", then one `KSamplerAdvanced` per phase: `steps` {total}, `cfg` 1.0 (no guidance: distilled), "
        f"`sampler_name` {sampler}, `scheduler` simple, after a `{node}` node with `shift` {shift:.4g}{where}. The "
        "first sampler alone has `add_noise` enable, every sampler but the last has `return_with_leftover_noise` "
        "enable, and each passes its latent to the next.\n\n"
        "| phase | LoRA | `start_at_step` | `end_at_step` |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"The experts' sigmas: {', '.join(f'{s:.4f}' for s in sigmas)}, 0 ({schedule})."
    )


def _comfyui_card_section(out_dir: pathlib.Path, config: ExpertsConfig) -> str | None:
    """The card's ComfyUI section, for a folder with `comfyui/` and a scheduler."""
    comfyui = out_dir / "comfyui"
    if not comfyui.is_dir() or not (out_dir / "scheduler" / "scheduler_config.json").is_file():
        return None
    from .schedulers import PhasedDMDScheduler

    if (comfyui / "phase_0.safetensors").is_file():
        files = [f"phase_{k}.safetensors" for k in range(config.num_phases)]
    else:  # Wan2.2 A14B's pair
        files = [
            f"{'high' if e['base_transformer'] == 'transformer' else 'low'}_noise_model.safetensors"
            for e in config.experts
        ]
    return comfyui_section(config, PhasedDMDScheduler.from_pretrained(out_dir / "scheduler"), files)


def _is_hub_id(value: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(value):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _where_the_base_is(config: ExpertsConfig) -> str:
    if config.base_model is None or _is_hub_id(config.base_model):
        return "The base model is downloaded from its own repository; this one holds only the experts."
    return (
        f"The base model is the local folder `{config.base_model}` named in `phased_dmd_config.json` (read from disk, "
        "not from the Hub); where that folder does not exist, pass the base as the first argument and these experts "
        "as `experts=`."
    )


def write_model_card(
    out_dir: str | os.PathLike,
    config: ExpertsConfig,
    *,
    repo_id: str | None = None,
    prompt: str | None = None,
    training_figures: dict | None = None,
    validation_images: list[str] | None = None,
    extra_text: str = "",
    sample_size: tuple | None = None,
):
    """Write `README.md` (a Hub model card) for an experts folder.

    Args:
        out_dir (`str` or `os.PathLike`): The experts folder.
        config ([`ExpertsConfig`]): Its config.
        repo_id (`str`, *optional*): The Hub repo the card will live in, used in the usage snippet and the title.
            Without it the snippet loads the folder by its absolute path (it is not on the Hub yet;
            [`push_experts_to_hub`] puts the repo id in).
        prompt (`str`, *optional*): The prompt of the usage snippet, e.g. the run's first validation or training
            prompt (a generic one otherwise).
        training_figures (`dict`, *optional*): Name -> value pairs shown as a table (e.g. steps, batch size, lr).
        validation_images (`list[str]`, *optional*): Paths, relative to `out_dir`, of sample images to show.
        extra_text (`str`): Markdown appended at the end.
        sample_size (`tuple`, *optional*): `(height, width)` or `(height, width, num_frames)` of the usage snippet,
            e.g. the run's training size (the pipeline's default size otherwise).

    Returns:
        `huggingface_hub.ModelCard`: The card that was written.
    """
    from huggingface_hub import ModelCard, ModelCardData

    out_dir = pathlib.Path(out_dir)
    family = get_family(config.family)
    image_to_video = bool(getattr(family, "image_concat", False))
    task = "image-to-video" if image_to_video else "text-to-video" if family.is_video else "text-to-image"
    kinds = {e["type"] for e in config.experts}
    tags = ["diffusers", "phased-dmd", "few-step", "distillation", task]
    if "lora" in kinds:
        tags.append("lora")
    card_data = ModelCardData(
        base_model=config.base_model if config.base_model and _is_hub_id(config.base_model) else None,
        library_name="diffusers",
        pipeline_tag=task,
        tags=tags,
    )
    total_steps = sum(config.steps_per_phase)
    edges = [1.0, *config.phase_boundaries, 0.0]
    rows = "\n".join(
        f"| {e['phase']} | ({edges[k + 1]:g}, {edges[k]:g}] | {config.steps_per_phase[k]} | {e['type']} | "
        f"`{e['base_transformer']}` |"
        for k, e in enumerate(config.experts)
    )
    revision = f" (revision `{config.base_revision}`)" if config.base_revision else ""
    usage = _usage(family, json.dumps(repo_id or str(out_dir.resolve())), prompt or "a red fox in snow", sample_size)
    sections = [
        f"# {(repo_id or out_dir.resolve().name).split('/')[-1]}",
        f"{config.num_phases} few-step experts for `{config.base_model}`{revision}, distilled with "
        f"{config.method} ({total_steps} sampling steps in all). Phased DMD splits the noise range into phases "
        "(SNR subintervals) and trains one expert per phase; at sampling time the expert of the phase the "
        "current noise level lies in makes the step.",
        "| phase | sigma interval | steps | expert | on |\n|---|---|---|---|---|\n" + rows,
        f"## Usage\n\n{_where_the_base_is(config)}\n\n" + usage,
    ]
    comfyui = _comfyui_card_section(out_dir, config)
    if comfyui:
        sections.append(comfyui)
    if training_figures:
        table = "\n".join(f"| {k} | {v} |" for k, v in training_figures.items())
        sections.append("## Training\n\n| | |\n|---|---|\n" + table)
    if validation_images:
        sections.append("## Samples\n\n" + "\n".join(f"![sample]({p})" for p in validation_images))
    if extra_text:
        sections.append(extra_text)
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    card = ModelCard(content)
    card.save(out_dir / "README.md")
    return card


def push_experts_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload Phased DMD experts",
    ignore_patterns: list[str] | None = None,
) -> str:
    """Upload an experts folder to the Hub (creating the repo if needed); returns the repo URL.

    The folder must hold a valid `phased_dmd_config.json`; a model card is written first if there is no
    `README.md`. The token is passed to `huggingface_hub` only, never printed or logged.

    Args:
        folder (`str` or `os.PathLike`): The experts folder.
        repo_id (`str`): Target model repo, `"org/name"`.
        token (`str`, *optional*): Hub token (default: the logged-in one).
        private (`bool`, *optional*): Visibility of a newly created repo.
        commit_message (`str`): Message of the upload commit.
        ignore_patterns (`list[str]`, *optional*): Extra glob patterns of files not to upload (e.g. training
            checkpoints); `.cache/*` and `*.lock` are always left out.
    """
    from huggingface_hub import HfApi

    folder = pathlib.Path(folder)
    config = ExpertsConfig.load(folder)
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    card = folder / "README.md"
    if not card.is_file():
        write_model_card(folder, config, repo_id=repo_url.repo_id)
    else:  # a card written before the repo existed loads the folder by its path: load the repo instead
        text = card.read_text()
        local = f"from_pretrained({json.dumps(str(folder.resolve()))}"
        if local in text:
            card.write_text(text.replace(local, f"from_pretrained({json.dumps(repo_url.repo_id)}"))
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_url.repo_id,
        repo_type="model",
        commit_message=commit_message,
        ignore_patterns=[".cache/*", "*.lock", *(ignore_patterns or [])],
    )
    return str(repo_url)
