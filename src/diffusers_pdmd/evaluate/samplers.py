# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""What is compared: samplers named on the command line, their samples on disk, and what each sample cost.

A sampler is ``NAME=SOURCE[:key=value,key=value...]``:

- SOURCE a base pipeline folder or Hub id (``model_index.json``): the teacher, sampled with its own pipeline;
  options ``steps`` (default 50 for Qwen-Image, 40 for Wan2.2), ``cfg`` (true CFG scale for Qwen-Image, guidance
  scale for Wan2.2; default 4) and ``negative`` (the negative prompt; default ``" "`` for Qwen-Image's true CFG);
- SOURCE an experts folder or Hub id written here (``phased_dmd_config.json``): `PhasedMoEPipeline` with its own
  scheduler and its own base (``base=`` overrides the base);
- SOURCE released experts (a LoRA file, folder or Hub repo: Wan2.2-Lightning, Qwen-Image-Lightning) with
  ``base=BASE``: `PhasedMoEPipeline.from_pretrained(BASE, experts=SOURCE)` with the release's preset sampler
  (`diffusers_pdmd.released.PRESETS`; ``preset=NAME`` picks one by name).

Samples are written once, as ``samples/NAME/pPPP_sSEED.png`` (a video as its frames stacked vertically, lossless)
with ``.json`` beside each (seconds, transformer forwards, frames): a rerun, or a run after a crash, samples only
what is missing. ``samples/NAME/sampler.json`` records the settings; other settings in the same folder are an error.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch


OPTION_KEYS = ("base", "preset", "steps", "cfg", "negative")
KINDS = ("teacher", "experts", "released")
_PIPELINE_FAMILIES = {"QwenImagePipeline": "qwen-image", "WanImageToVideoPipeline": "wan2.2-i2v-a14b"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class SamplerSpec:
    """One sampler of the comparison (see the module docstring for the grammar and the defaults)."""

    name: str
    source: str
    base: str | None = None
    preset: str | None = None
    steps: int | None = None
    cfg: float | None = None
    negative: str | None = None
    kind: str | None = None  # one of KINDS; None: a Hub id, resolved when loaded
    family: str | None = None  # known before loading for local folders


def _options(text: str, spec: str) -> dict:
    options = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in OPTION_KEYS:
            raise ValueError(f"`--sampler {spec}`: option {item!r} is not KEY=VALUE with KEY in {OPTION_KEYS}.")
        options[key] = value
    try:
        if "steps" in options:
            options["steps"] = int(options["steps"])
        if "cfg" in options:
            options["cfg"] = float(options["cfg"])
    except ValueError as err:
        raise ValueError(f"`--sampler {spec}`: `steps` must be an int and `cfg` a float ({err}).") from None
    return options


def _local_kind(path: pathlib.Path, base: str | None) -> tuple[str | None, str | None]:
    """`(kind, family)` of a local path, `(None, None)` when it is not local."""
    from ..hub import CONFIG_NAME

    if (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
        name = index.get("_class_name", "")
        family = _PIPELINE_FAMILIES.get(name)
        if name == "WanPipeline":
            family = "wan2.2-ti2v-5b" if index.get("expand_timesteps") else "wan2.2-t2v-a14b"
        return "teacher", family
    if (path / CONFIG_NAME).is_file():
        return "experts", json.loads((path / CONFIG_NAME).read_text()).get("family")
    if path.exists():
        if base is None:
            raise ValueError(
                f"`--sampler`: {path} is neither a base pipeline (model_index.json) nor experts written here "
                f"({CONFIG_NAME}); for released experts add `:base=BASE_PIPELINE`."
            )
        return "released", None
    return None, None


def parse_sampler(text: str) -> SamplerSpec:
    """Parse ``NAME=SOURCE[:key=value,...]`` and check what can be checked without loading a model.

    Raises:
        `ValueError` naming the bad part: no ``=``, a bad name, an unknown option, an unknown preset, a local path
        that does not exist, a path that is no sampler, ``steps`` on experts.
    """
    from ..released import PRESETS

    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise ValueError(f"`--sampler` must be NAME=SOURCE[:key=value,...], got {text!r}.")
    if not _NAME.match(name):
        raise ValueError(f"`--sampler {text}`: NAME must be letters, digits, '.', '_' or '-', got {name!r}.")
    source, options = rest, {}
    head, colon, tail = rest.rpartition(":")
    if colon and "=" in tail.split(",")[0]:
        source, options = head, _options(tail, text)
    spec = SamplerSpec(name=name, source=source, **options)
    if spec.preset is not None and spec.preset not in PRESETS:
        raise ValueError(f"`--sampler {text}`: preset must be one of {sorted(PRESETS)}, got {spec.preset!r}.")
    spec.kind, spec.family = _local_kind(pathlib.Path(source), spec.base)
    if spec.kind is None and spec.base is not None:
        spec.kind = "released"
    if spec.kind is None and not _HUB_ID.match(source):
        raise ValueError(f"`--sampler {text}`: {source!r} is neither an existing path nor a Hub id (owner/name).")
    if spec.preset is not None:
        spec.family = PRESETS[spec.preset].family
    if spec.steps is not None and spec.kind in ("experts", "released"):
        raise ValueError(f"`--sampler {text}`: `steps` is fixed by the experts' scheduler; give it to teachers only.")
    if spec.steps is not None and spec.steps < 1:
        raise ValueError(f"`--sampler {text}`: `steps` must be >= 1, got {spec.steps}.")
    return spec


def check_samplers(specs: list[SamplerSpec], height: int, width: int, num_frames: int | None) -> None:
    """Unique names, one modality (images or videos), and sizes each known family can take (`Family.check_size`),
    before any model loads."""
    from ..families import get_family

    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"`--sampler` names must be unique, got {names}.")
    kinds = {spec.family == "qwen-image" for spec in specs if spec.family is not None}
    if len(kinds) > 1:
        raise ValueError(
            f"`--sampler`: images (qwen-image) and videos (Wan2.2) cannot be compared: {[(s.name, s.family) for s in specs]}."
        )
    for spec in specs:
        if spec.family is None:
            continue
        family = get_family(spec.family)
        frames = num_frames if spec.family != "qwen-image" else None
        if spec.family != "qwen-image" and num_frames is None:
            raise ValueError(f"`--num_frames` is needed for the {spec.family} sampler {spec.name!r}.")
        try:
            family.check_size(height, width, frames)
        except ValueError as err:
            raise ValueError(f"sampler {spec.name!r} ({spec.family}): {err}") from None


def _hub_kind(spec: SamplerSpec) -> str:
    """A Hub repo with ``model_index.json`` is a base pipeline (the teacher); any other is read as experts (from
    the cache too, offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(spec.source, "model_index.json")
    except EntryNotFoundError:
        return "experts"
    return "teacher"


def load_pipeline(spec: SamplerSpec, dtype=torch.float32, device="cpu"):
    """Load the sampler's pipeline (the teacher's own pipeline class, or `PhasedMoEPipeline`)."""
    from ..pipelines import PhasedMoEPipeline

    kind = spec.kind or _hub_kind(spec)
    if kind == "teacher":
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(spec.source, torch_dtype=dtype)
    elif kind == "experts" and spec.base is None:
        pipe = PhasedMoEPipeline.from_pretrained(spec.source, dtype=dtype)
    else:
        pipe = PhasedMoEPipeline.from_pretrained(spec.base, experts=spec.source, dtype=dtype)
    if spec.preset is not None:
        from ..released import PRESETS

        pipe.register_modules(scheduler=PRESETS[spec.preset].scheduler(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _family_name(pipe) -> str:
    from ..families import get_family

    return get_family(pipe).name


def call_kwargs(spec: SamplerSpec, pipe, height: int, width: int, num_frames: int | None) -> dict:
    """The keyword arguments of the pipeline call: size, and the teacher's steps, CFG and negative prompt."""
    from ..pipelines import PhasedMoEPipeline

    family = _family_name(pipe)
    kwargs = {"height": height, "width": width, "output_type": "np"}
    if family != "qwen-image":
        kwargs["num_frames"] = num_frames
    teacher = not isinstance(pipe, PhasedMoEPipeline)
    if teacher:
        kwargs["num_inference_steps"] = spec.steps or (50 if family == "qwen-image" else 40)
    cfg = spec.cfg if spec.cfg is not None else (4.0 if teacher else None)
    if cfg is not None:
        kwargs["true_cfg_scale" if family == "qwen-image" else "guidance_scale"] = cfg
    negative = spec.negative
    if negative is None and family == "qwen-image" and cfg is not None and cfg > 1:
        negative = " "  # Qwen-Image applies true CFG only with a negative prompt
    if negative is not None:
        kwargs["negative_prompt"] = negative
    return kwargs


def _prompt_kwargs(pipe, prompt: str, kwargs: dict) -> dict:
    """``kwargs`` with the prompt. diffusers' ``WanImageToVideoPipeline`` cleans text prompts with ``ftfy``, which it
    does not install: without it, the prompt and negative prompt go in as embeddings of the same T5 encoder, made by
    ``WanPipeline``'s encoder (which cleans without ``ftfy``), at the call's default 512 tokens."""
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from diffusers.utils import is_ftfy_available

    if not isinstance(pipe, WanImageToVideoPipeline) or is_ftfy_available():
        return dict(kwargs, prompt=prompt)
    kwargs = dict(kwargs)
    negative = kwargs.pop("negative_prompt", None) or ""
    with torch.no_grad():
        embeds = [
            WanPipeline._get_t5_prompt_embeds(pipe, text, max_sequence_length=512) for text in (prompt, negative)
        ]
    return dict(kwargs, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1])


@contextlib.contextmanager
def count_forwards(pipe):
    """Count the calls of the pipeline's transformers (``transformer``, ``transformer_2``): ``counter[0]``."""
    counter = [0]

    def hook(*_):
        counter[0] += 1

    handles = [
        module.register_forward_pre_hook(hook)
        for module in (getattr(pipe, slot, None) for slot in ("transformer", "transformer_2"))
        if module is not None
    ]
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


def sample_path(out_dir: pathlib.Path, name: str, prompt_index: int, seed: int) -> pathlib.Path:
    return out_dir / "samples" / name / f"p{prompt_index:03d}_s{seed}.png"


def save_sample(path: pathlib.Path, array: np.ndarray, record: dict) -> None:
    """Write an image (H, W, 3) or a video (F, H, W, 3) in [0, 1] as one PNG, and `record` as JSON beside it."""
    from PIL import Image

    array = np.asarray(array)
    frames = array.shape[0] if array.ndim == 4 else None
    pixels = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.reshape(-1, *pixels.shape[-2:]) if frames else pixels).save(path)
    path.with_suffix(".json").write_text(json.dumps(dict(record, frames=frames)) + "\n")


def load_sample(path: pathlib.Path) -> tuple[torch.Tensor, dict]:
    """A sample as float (3, H, W) or (F, 3, H, W) in [0, 1], and its record."""
    from PIL import Image

    record = json.loads(path.with_suffix(".json").read_text())
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)
    if record.get("frames"):
        x = x.reshape(record["frames"], -1, *x.shape[-2:])
        return x.permute(0, 3, 1, 2).contiguous(), record
    return x.permute(2, 0, 1).contiguous(), record


def _check_settings(folder: pathlib.Path, settings: dict) -> None:
    path = folder / "sampler.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            raise ValueError(
                f"{folder} holds samples made with other settings ({old} vs {settings}); use another "
                "`--output_dir` or another sampler name."
            )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n")


def generate(
    spec,
    prompts,
    seeds,
    out_dir,
    height,
    width,
    num_frames=None,
    dtype=torch.float32,
    device="cpu",
    image=None,
    pipe=None,
):
    """Sample what is missing of ``prompts x seeds`` for one sampler (resumable); returns the number sampled.

    The pipeline is loaded only if a sample is missing (``pipe``: one already in memory, e.g. a benchmark's). Each sample gets its own ``torch.Generator(seed)``; its
    seconds (wall clock of the pipeline call, synchronised on CUDA) and transformer forwards are recorded.
    """
    from tqdm.auto import tqdm

    settings = {k: v for k, v in asdict(spec).items() if k not in ("kind", "family")}
    settings.update(height=height, width=width, num_frames=num_frames)
    _check_settings(pathlib.Path(out_dir) / "samples" / spec.name, settings)
    todo = [(p, s) for p in range(len(prompts)) for s in seeds if not sample_path(out_dir, spec.name, p, s).is_file()]
    if not todo:
        return 0
    pipe = pipe if pipe is not None else load_pipeline(spec, dtype, device)
    kwargs = call_kwargs(spec, pipe, height, width, num_frames)
    if image is not None:
        kwargs["image"] = image
    for i, (p, seed) in enumerate(tqdm(todo, desc=f"sampling {spec.name}")):
        generator = torch.Generator("cpu").manual_seed(seed)
        with count_forwards(pipe) as forwards:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = pipe(generator=generator, **_prompt_kwargs(pipe, prompts[p], kwargs))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        array = out.frames[0] if hasattr(out, "frames") else out.images[0]
        timesteps = getattr(pipe.scheduler, "timesteps", None)
        record = {"prompt": prompts[p], "seed": seed, "seconds": seconds, "forwards": forwards[0], "warmup": i == 0}
        record["steps"] = 0 if timesteps is None else len(timesteps)
        save_sample(sample_path(out_dir, spec.name, p, seed), array, record)
    del pipe
    return len(todo)


__all__ = ["KINDS", "SamplerSpec", "check_samplers", "generate", "load_sample", "parse_sampler", "sample_path"]
