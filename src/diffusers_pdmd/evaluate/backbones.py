# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""The networks the metrics run on: DINO features, CLIP embeddings, LPIPS activations, RAFT optical flow.

Each loader takes a Hub id or a local folder (weights come from the Hub at run time on the user's machine; the tests
build tiny random-weight folders from configs and download nothing) and returns a small callable on images in
[0, 1] of shape (N, 3, H, W). The formulas live in `diffusers_pdmd.metrics`.

- `load_feature_model`: DINOv3 (`DINOv3ViTModel`) where transformers has it, DINOv2 otherwise, or ``"digits"``
  (the digits classifier of `diffusers_pdmd.metrics`, the backbone of the digits demo); features = the pooled
  (CLS) output.
- `load_clip_model`: `CLIPModel` with its tokenizer: projected image and text embeddings.
- `load_lpips_model`: a torchvision AlexNet / VGG16 trunk with LPIPS' calibrated linear heads, from a folder
  (``config.json`` with ``{"net": "alex"}`` and ``model.safetensors``, see `save_lpips_folder`) or ``"alex"`` /
  ``"vgg"`` (converted on the fly from the `lpips` package, which ships the heads).
- `load_flow_model`: torchvision's RAFT (``"raft_large"`` / ``"raft_small"`` with torchvision's weights, or a folder
  with ``config.json`` ``{"arch": "raft_small"}`` and ``model.safetensors``).
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import torch
from torch import nn

from .. import metrics


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DINOV3_ID = "facebook/dinov3-vitb16-pretrain-lvd1689m"
DINOV2_ID = "facebook/dinov2-base"
CLIP_ID = "openai/clip-vit-large-patch14"
LPIPS_NETS = {  # net -> (torchvision builder, the end index (exclusive) of each LPIPS slice in `.features`)
    "alex": ("alexnet", (2, 5, 8, 10, 12)),
    "vgg": ("vgg16", (4, 9, 16, 23, 30)),
}
MIN_LPIPS_SIZE = 64
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS' input scaling layer, on inputs in [-1, 1]
LPIPS_SCALE = (0.458, 0.448, 0.450)
MIN_RAFT_SIZE = 128  # RAFT's correlation pyramid needs feature maps of 16, i.e. frames of 128 pixels
FLOW_ARCHS = ("raft_large", "raft_small")


def default_feature_model() -> str:
    """DINOv3 ViT-B/16 where the installed transformers has DINOv3, DINOv2 ViT-B/14 otherwise."""
    import transformers

    return DINOV3_ID if hasattr(transformers, "DINOv3ViTModel") else DINOV2_ID


def _normalise(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """Resize (N, 3, H, W) images in [0, 1] to size x size (bicubic, antialiased) and normalise per channel."""
    x = nn.functional.interpolate(
        images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - mean) / std


def _pooled(output) -> torch.Tensor:
    """A model output's pooled vector: the tensor itself, or `pooler_output`."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class FeatureModel:
    """DINO features of images (N, 3, H, W) in [0, 1]: the pooled (CLS) output, a (N, D) float64 array."""

    def __init__(self, model_id: str, device="cpu", dtype=torch.float32, image_size: int = 224, model=None):
        from transformers import AutoModel

        self.name = model_id
        model = model if model is not None else AutoModel.from_pretrained(model_id, dtype=dtype)
        self.model = model.to(device, dtype).eval().requires_grad_(False)
        patch = getattr(self.model.config, "patch_size", 16)
        self.image_size = max(patch, image_size // patch * patch)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = _normalise(images.to(self.device), self.image_size, IMAGENET_MEAN, IMAGENET_STD).to(self.dtype)
        return _pooled(self.model(pixel_values=x)).double().cpu().numpy()


class DigitFeatures:
    """The digits classifier's penultimate features (`diffusers_pdmd.metrics.features`) as a feature model."""

    name = "digits"

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return metrics.features(images.cpu())


def load_feature_model(model_id: str | None, device="cpu", dtype=torch.float32):
    """`FeatureModel` of a Hub id or folder (default `default_feature_model`), or `DigitFeatures` for ``"digits"``."""
    if model_id == "digits":
        return DigitFeatures()
    return FeatureModel(model_id or default_feature_model(), device, dtype)


class ClipModel:
    """Projected CLIP embeddings of images (N, 3, H, W) in [0, 1] and of prompts."""

    def __init__(self, model_id: str, device="cpu", dtype=torch.float32, model=None, tokenizer=None):
        from transformers import AutoTokenizer, CLIPModel

        self.name = model_id
        model = model if model is not None else CLIPModel.from_pretrained(model_id, dtype=dtype)
        self.model = model.to(device, dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model_id)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> np.ndarray:
        size = self.model.config.vision_config.image_size
        x = _normalise(images.to(self.device), size, CLIP_MEAN, CLIP_STD).to(self.dtype)
        return _pooled(self.model.get_image_features(pixel_values=x)).double().cpu().numpy()

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> np.ndarray:
        length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=length, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _pooled(self.model.get_text_features(**tokens)).double().cpu().numpy()


def load_clip_model(model_id: str | None, device="cpu", dtype=torch.float32) -> ClipModel:
    """`ClipModel` of a Hub id or folder (default ``openai/clip-vit-large-patch14``)."""
    return ClipModel(model_id or CLIP_ID, device, dtype)


class LPIPSModel(nn.Module):
    """LPIPS: a torchvision trunk cut into five slices and one non-negative linear head per slice.

    Args:
        net: ``"alex"`` or ``"vgg"`` (`LPIPS_NETS`).
    """

    def __init__(self, net: str = "alex"):
        super().__init__()
        import torchvision

        if net not in LPIPS_NETS:
            raise ValueError(f"`net` must be one of {sorted(LPIPS_NETS)}, got {net!r}.")
        builder, self.ends = LPIPS_NETS[net]
        self.net = net
        self.features = getattr(torchvision.models, builder)(weights=None).features
        widths = [self._convs_before(end)[-1].out_channels for end in self.ends]
        self.lin = nn.ParameterList([nn.Parameter(torch.ones(w)) for w in widths])
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def _convs_before(self, end: int) -> list[nn.Module]:
        return [m for m in list(self.features)[:end] if isinstance(m, nn.Conv2d)]

    def activations(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five slices' outputs for images (N, 3, H, W) in [0, 1] (upsampled to a shorter side of
        `MIN_LPIPS_SIZE` when smaller: the trunk's pooling needs it)."""
        x = images.float()
        if min(x.shape[-2:]) < MIN_LPIPS_SIZE:
            factor = MIN_LPIPS_SIZE / min(x.shape[-2:])
            size = (round(x.shape[-2] * factor), round(x.shape[-1] * factor))
            x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = (2.0 * x - 1.0 - self.shift) / self.scale
        out, start = [], 0
        for end in self.ends:
            for layer in list(self.features)[start:end]:
                x = layer(x)
            out.append(x)
            start = end
        return out

    @torch.no_grad()
    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        """(N,) LPIPS distances (`diffusers_pdmd.metrics.lpips_distance`)."""
        return metrics.lpips_distance(self.activations(images_a), self.activations(images_b), list(self.lin))


def save_lpips_folder(model: LPIPSModel, folder) -> pathlib.Path:
    """Write an `LPIPSModel` as ``config.json`` + ``model.safetensors`` (what `load_lpips_model` reads)."""
    from safetensors.torch import save_file

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"net": model.net}) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def lpips_from_state_dict(net: str, source: dict) -> LPIPSModel:
    """An `LPIPSModel` from the state dict of the `lpips` package's ``LPIPS(net=net)``: its trunk keys
    ``net.slice{k}.{i}.*`` keep torchvision's index i in ``.features``; its heads ``lin{l}.model.1.weight``."""
    model = LPIPSModel(net)
    state = {}
    for key, value in source.items():
        if key.startswith("net.slice"):
            state["features." + key.split(".", 2)[2]] = value
        elif re.fullmatch(r"lin\d\.model\.1\.weight", key):
            state[f"lin.{int(key[3])}"] = value.flatten()
    model.load_state_dict(state)
    return model


def lpips_from_package(net: str = "alex") -> LPIPSModel:
    """Convert the `lpips` package's model (its shipped linear heads, torchvision's ImageNet trunk) to `LPIPSModel`."""
    import lpips  # only on the user's machine: it fetches torchvision's trunk weights

    return lpips_from_state_dict(net, lpips.LPIPS(net=net, verbose=False).state_dict())


def load_lpips_model(source: str, device="cpu") -> LPIPSModel:
    """`LPIPSModel` from a folder or Hub id (``config.json`` + ``model.safetensors``), or ``"alex"`` / ``"vgg"``
    through the `lpips` package."""
    if source in LPIPS_NETS:
        return lpips_from_package(source).to(device).eval()
    folder = _local_or_hub_folder(source, ("config.json", "model.safetensors"))
    from safetensors.torch import load_file

    model = LPIPSModel(json.loads((folder / "config.json").read_text())["net"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.to(device).eval().requires_grad_(False)


def _local_or_hub_folder(source: str, files: tuple[str, ...]) -> pathlib.Path:
    path = pathlib.Path(source)
    if path.is_dir():
        return path
    from huggingface_hub import hf_hub_download

    return pathlib.Path([hf_hub_download(source, name) for name in files][0]).parent


def build_flow_model(arch: str = "raft_small") -> nn.Module:
    """torchvision's RAFT with random weights (`FLOW_ARCHS`)."""
    from torchvision.models import optical_flow

    if arch not in FLOW_ARCHS:
        raise ValueError(f"`arch` must be one of {FLOW_ARCHS}, got {arch!r}.")
    return getattr(optical_flow, arch)(weights=None)


def save_flow_folder(model: nn.Module, arch: str, folder) -> pathlib.Path:
    """Write a RAFT model as ``config.json`` ({"arch": ...}) + ``model.safetensors`` (read by `load_flow_model`)."""
    from safetensors.torch import save_file

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"arch": arch}) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def load_flow_model(source: str, device="cpu") -> nn.Module:
    """RAFT from ``"raft_large"`` / ``"raft_small"`` (torchvision's weights, fetched by torchvision on first use) or a
    folder / Hub id written by `save_flow_folder`."""
    from torchvision.models import optical_flow

    if source in FLOW_ARCHS:
        weights = getattr(optical_flow, f"Raft_{source.split('_')[1].capitalize()}_Weights").DEFAULT
        model = getattr(optical_flow, source)(weights=weights)
    else:
        from safetensors.torch import load_file

        folder = _local_or_hub_folder(source, ("config.json", "model.safetensors"))
        model = build_flow_model(json.loads((folder / "config.json").read_text())["arch"])
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def video_flow(
    flow_model, frames: torch.Tensor, size: int | None = None, num_flow_updates: int = 12, batch_size: int = 8
) -> torch.Tensor:
    """Optical flow between consecutive frames of one video (F, 3, H, W) in [0, 1], through RAFT's interface
    (``model(image1, image2, num_flow_updates=...)`` returns a list of (N, 2, h, w) flows, the last the finest; inputs
    in [-1, 1], sides multiples of 8).

    The frames are resized so that the shorter side is ``size`` (default: the shorter side rounded up to a multiple
    of 8, at least `MIN_RAFT_SIZE`) and both sides are multiples of 8; the flow is scaled back to pixels of the input
    frames. Frame pairs go through RAFT ``batch_size`` at a time (its correlation volume grows with the square of the
    frame area).

    Returns:
        (F - 1, 2, H, W) flows in pixels of the input frames.
    """
    f, _, h, w = frames.shape
    short = max(MIN_RAFT_SIZE, -(-(size or min(h, w)) // 8) * 8)
    new_h, new_w = (-(-round(h * short / min(h, w)) // 8) * 8, -(-round(w * short / min(h, w)) // 8) * 8)
    x = nn.functional.interpolate(frames.float(), size=(new_h, new_w), mode="bilinear", align_corners=False)
    x = 2.0 * x.clamp(0, 1) - 1.0
    device = next(iter(flow_model.parameters()), torch.empty(0)).device
    x = x.to(device)
    first, second = x[:-1], x[1:]
    flow = torch.cat(
        [
            flow_model(first[i : i + batch_size], second[i : i + batch_size], num_flow_updates=num_flow_updates)[-1]
            for i in range(0, f - 1, batch_size)
        ]
    ).float()
    flow = nn.functional.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
    return flow * torch.tensor([w / new_w, h / new_h], device=flow.device).view(1, 2, 1, 1)


__all__ = [
    "ClipModel",
    "DigitFeatures",
    "FeatureModel",
    "LPIPSModel",
    "build_flow_model",
    "default_feature_model",
    "load_clip_model",
    "load_feature_model",
    "load_flow_model",
    "load_lpips_model",
    "lpips_from_package",
    "save_flow_folder",
    "save_lpips_folder",
    "video_flow",
]
