# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""Export Phased DMD experts to the file layouts other loaders expect.

    python -m diffusers_pdmd.export EXPERTS_DIR OUT_DIR --format {diffusers,comfyui}

`EXPERTS_DIR` is an experts-only folder (`phased_dmd_config.json`, as the training scripts write it). Every LoRA
expert becomes one `.safetensors` file in `OUT_DIR`:

- Wan2.2 A14B experts with one expert per transformer: `high_noise_model.safetensors` (the expert on `transformer`)
  and `low_noise_model.safetensors` (on `transformer_2`), the layout of Wan2.2-Lightning; otherwise one
  `phase_<k>.safetensors` per phase (`released`'s `"phase_loras"` layout).
- `--format diffusers`: the files as they are: keys `transformer.<module>.lora_A/lora_B.weight` (the scale alpha /
  rank in `lora_B`) and a `LoraConfig` with scaling 1 in the safetensors metadata, as diffusers' `save_lora_weights`
  writes them (`pipe.load_lora_weights(OUT_DIR,
  weight_name=..., load_into_transformer_2=...)`).
- `--format comfyui`: keys `diffusion_model.<native module name>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  the community layout that ComfyUI, Wan2.2-Lightning and Qwen-Image-Lightning use; `.alpha` keys hold the
  file's alpha per module from its metadata (the rank for files whose weights carry the scale, the trained alpha for
  files of earlier versions), so loaders that ignore metadata apply the right scale. Qwen-Image's native module names are diffusers'
  own; Wan's are the original Wan2.2 names (`blocks.N.self_attn.q`, ...). diffusers converts that layout one way
  only, so the Wan names are written from `WAN_NATIVE_NAMES` and every exported file is checked by converting it
  back with diffusers' own `lora_state_dict`, which must give exactly the keys it came from.

`OUT_DIR/scheduler/scheduler_config.json` (a copy) keeps the experts' sampler, which
`PhasedMoEPipeline.from_pretrained(base, experts=OUT_DIR)` uses: it loads the export back with the same samples.
Full and base experts are not exported. `OUT_DIR` is written in a temporary folder beside it and renamed at the
end, so a failure (a truncated expert file, say) leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import re
import shutil
import tempfile

import torch

from .families import get_family
from .hub import LORA_PREFIX, LORA_WEIGHT_NAME, ExpertsConfig, check_readable, read_lora_file
from .released import WAN_MOE_FILES, _pipeline_class


FORMATS = ("diffusers", "comfyui")
COMFYUI_DIR = "comfyui"  # the folder beside `phase_k/` that `write_comfyui` fills
# diffusers' WanTransformer3DModel module name (inside `blocks.N.`) -> the original Wan2.2 name, the inverse of
# diffusers' `_convert_non_diffusers_wan_lora_to_diffusers` for the layers a LoRA expert trains.
WAN_NATIVE_NAMES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
_WAN_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def native_name(family: str, module: str) -> str:
    """The community (ComfyUI) name of a diffusers transformer module of `family`."""
    if family == "qwen-image":
        return module
    match = _WAN_BLOCK.match(module)
    if match is None or match.group(2) not in WAN_NATIVE_NAMES:
        raise ValueError(
            f"No native Wan2.2 name for the module {module!r}: the comfyui export handles LoRAs on the blocks' "
            f"{sorted(WAN_NATIVE_NAMES)} layers."
        )
    return f"blocks.{match.group(1)}.{WAN_NATIVE_NAMES[match.group(2)]}"


def to_comfyui(family: str, state_dict: dict[str, torch.Tensor], lora_config: dict) -> dict[str, torch.Tensor]:
    """A diffusers LoRA state dict (`transformer.<module>.lora_A/lora_B.weight`) in the `diffusion_model.*`
    `lora_down` / `lora_up` / `alpha` layout, alpha per module from the adapter's `LoraConfig`."""
    from peft.utils.other import get_pattern_key

    alpha_default = float(lora_config.get("lora_alpha", lora_config.get("r", 0)) or 0)
    alpha_pattern = lora_config.get("alpha_pattern") or {}
    rslora = bool(lora_config.get("use_rslora", False))
    out = {}
    for key, tensor in state_dict.items():
        module, _, part = key.removeprefix(f"{LORA_PREFIX}.").partition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ValueError(f"{key}: only lora_A / lora_B weights can be exported (no LoRA biases, DoRA, ...).")
        name = f"diffusion_model.{native_name(family, module)}"
        out[f"{name}.lora_{'down' if part == 'A.weight' else 'up'}.weight"] = tensor.contiguous()
        if part == "A.weight":
            rank = tensor.shape[0]
            alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha_default) or rank)
            # Loaders scale by alpha / rank; rsLoRA scales by alpha / sqrt(rank).
            out[f"{name}.alpha"] = torch.tensor(alpha * rank**0.5 if rslora else alpha, dtype=torch.float32)
    return out


def _check_round_trip(family: str, original: dict, exported: dict, file: pathlib.Path) -> None:
    # Clones: diffusers' Wan converter scales the cross-attention tensors of the dict it is given in place.
    converted = _pipeline_class(family).lora_state_dict({k: v.clone() for k, v in exported.items()})
    if set(converted) != set(original):
        extra, missing = sorted(set(converted) - set(original)), sorted(set(original) - set(converted))
        raise ValueError(
            f"{file}: diffusers reads the exported keys back as other modules (extra {extra[:3]}, missing "
            f"{missing[:3]}); not written."
        )


def _files(experts_dir: pathlib.Path, config: ExpertsConfig) -> dict[str, dict]:
    """Output file name -> expert entry: Wan2.2 A14B's two files, else one `phase_<k>.safetensors` per phase."""
    family = get_family(config.family)
    kinds = {e["type"] for e in config.experts}
    if kinds != {"lora"}:
        raise ValueError(
            f"{experts_dir}: the export writes LoRA experts only; phases "
            f"{[e['phase'] for e in config.experts if e['type'] != 'lora']} are {sorted(kinds - {'lora'})} experts."
        )
    by_path = {}
    for e in config.experts:
        by_path.setdefault(e["path"], e)
    if len(family.transformer_names) == 2 and sorted(e["base_transformer"] for e in by_path.values()) == [
        "transformer",
        "transformer_2",
    ]:
        return {WAN_MOE_FILES[e["base_transformer"]]: e for e in by_path.values()}
    # `phase_loras`: the loader puts phase k's file on the teacher transformer owning the phase's midpoint sigma.
    edges = [1.0, *config.phase_boundaries, 0.0]
    for k, e in enumerate(config.experts):
        slot = family.teacher_transformer_for_sigma((edges[k] + edges[k + 1]) / 2)
        if e["base_transformer"] != slot:
            raise ValueError(
                f"{experts_dir}: the expert of phase {k} is on `{e['base_transformer']}`, not on the teacher "
                f"transformer of its noise levels (`{slot}`), which one-file-per-phase exports cannot record."
            )
    return {f"phase_{e['phase']}.safetensors": e for e in config.experts}


def _write(config: ExpertsConfig, experts_dir: pathlib.Path, files: dict, format: str, folder: pathlib.Path):
    from safetensors.torch import save_file

    for name, e in files.items():
        source = experts_dir / e["path"]
        source = source / LORA_WEIGHT_NAME if source.is_dir() else source
        if not source.is_file():
            raise ValueError(f"{experts_dir}: no LoRA weights at {source} (the expert of phase {e['phase']}).")
        check_readable(source)
        state_dict, lora_config = read_lora_file(source)
        if format == "diffusers":
            shutil.copyfile(source, folder / name)
        else:
            tensors = to_comfyui(config.family, state_dict, lora_config)
            _check_round_trip(config.family, state_dict, tensors, source)
            save_file(tensors, str(folder / name), metadata={"format": "pt"})
    if (experts_dir / "scheduler" / "scheduler_config.json").is_file():
        (folder / "scheduler").mkdir()
        shutil.copyfile(
            experts_dir / "scheduler" / "scheduler_config.json", folder / "scheduler/scheduler_config.json"
        )


def export(experts_dir, out_dir, format: str = "comfyui", overwrite: bool = False) -> list[pathlib.Path]:
    """Export the LoRA experts of `experts_dir` to `out_dir` in `format` (one of `FORMATS`); returns the files.

    Everything is written into a temporary folder beside `out_dir`, which is renamed to `out_dir` at the end: a
    failure leaves no half-written export. An `out_dir` that exists and is not empty is refused unless `overwrite`
    (then it is replaced as a whole).
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}, got {format!r}.")
    experts_dir, out_dir = pathlib.Path(experts_dir), pathlib.Path(out_dir)
    config = ExpertsConfig.load(experts_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ValueError(f"`out_dir` {out_dir} exists and is not empty; choose a new folder (or remove it).")
    files = _files(experts_dir, config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write(config, experts_dir, files, format, staging)
        if out_dir.exists():
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return [out_dir / name for name in files]


def write_comfyui(experts_dir) -> list[pathlib.Path]:
    """Write `experts_dir/comfyui/`, the `comfyui` export of the folder's experts, beside its `phase_k/` folders.

    The training scripts and `PhasedMoEPipeline.save_pretrained` call this, so that the files a ComfyUI user takes
    load there: `phase_k/pytorch_lora_weights.safetensors` is diffusers' layout, whose weights carry the scale
    alpha / rank (ComfyUI reads no metadata) but whose Wan keys ComfyUI does not map.
    Folders with full or base experts get no `comfyui/`; LoRA experts the export cannot write (LoRA biases, modules
    without a ComfyUI name) get none either, with a warning. Returns the written files (`[]` for none).
    """
    experts_dir = pathlib.Path(experts_dir)
    config = ExpertsConfig.load(experts_dir)
    target = experts_dir / COMFYUI_DIR
    if {e["type"] for e in config.experts} == {"lora"}:
        try:
            return export(experts_dir, target, "comfyui", overwrite=True)
        except ValueError as err:  # LoRA biases (released extracted LoRAs), modules ComfyUI cannot name, ...
            logging.getLogger(__name__).warning("No %s/ beside the experts in %s: %s", COMFYUI_DIR, experts_dir, err)
    if target.is_dir():  # a stale export of other experts must not stay beside these
        shutil.rmtree(target)
    return []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_pdmd.export", description="Export Phased DMD LoRA experts to other loaders' layouts."
    )
    parser.add_argument("experts_dir", help="experts-only folder (phased_dmd_config.json)")
    parser.add_argument("out_dir", help="destination folder")
    parser.add_argument("--format", choices=FORMATS, default="comfyui", help="key layout (default: comfyui)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty out_dir")
    args = parser.parse_args(argv)
    for path in export(args.experts_dir, args.out_dir, args.format, overwrite=args.overwrite):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
