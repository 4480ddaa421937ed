"""Real data for fake-on-real (`--real_data`, opt-in): captioned samples, encoded to latents once and cached.

Two sources:
- a folder: each image (`.png`, `.jpg`, `.jpeg`, `.webp`) or ready latent (`.pt`, e.g. an encoded video) with its
  caption in a `.txt` file of the same stem;
- a `datasets` dataset (a Hub name or a `save_to_disk` folder) with an image column and a caption column.

[`cache_latents`] encodes every image with the caller's `encode` (the family's VAE encode, returning latents in the
transformer's input space) once and stores latents and captions in one `.pt` file; later runs load it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
LATENT_SUFFIX = ".pt"


def folder_items(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """`(file, caption)` for every image or `.pt` latent in `folder` (sorted by name), caption from `<stem>.txt`."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (*IMAGE_SUFFIXES, LATENT_SUFFIX))
    if not files:
        raise ValueError(f"`real_data` folder {folder} holds no {list(IMAGE_SUFFIXES)} or {LATENT_SUFFIX} file.")
    items = []
    for path in files:
        caption = path.with_suffix(".txt")
        if not caption.is_file():
            raise ValueError(f"`real_data`: {path.name} has no caption file {caption.name} beside it.")
        items.append((path, caption.read_text(encoding="utf-8").strip()))
    return items


def dataset_items(source: str, image_column: str = "image", caption_column: str = "caption", split: str = "train"):
    """`(image, caption)` pairs of a `datasets` dataset: a `save_to_disk` folder or a name for `load_dataset`."""
    import datasets

    if os.path.isdir(source):
        ds = datasets.load_from_disk(source)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(source, split=split)
    missing = [c for c in (image_column, caption_column) if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"`real_data` {source}: no column {missing}; its columns are {ds.column_names} (set "
            "`--real_image_column` / `--real_caption_column`)."
        )
    return [(row[image_column], str(row[caption_column])) for row in ds]


def load_items(source: str, image_column: str = "image", caption_column: str = "caption"):
    """A folder of captioned files ([`folder_items`]) if `source` is a folder without a saved dataset, else a
    `datasets` dataset ([`dataset_items`])."""
    path = Path(source)
    is_saved_dataset = (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
    if path.is_dir() and not is_saved_dataset:
        return folder_items(path)
    return dataset_items(source, image_column, caption_column)


def _as_latent(item, encode) -> torch.Tensor:
    from PIL import Image

    if isinstance(item, Path) and item.suffix == LATENT_SUFFIX:
        return torch.load(item, map_location="cpu", weights_only=True)
    image = Image.open(item) if isinstance(item, (str, Path)) else item
    return encode(image.convert("RGB")).detach().cpu()


def cache_latents(items, encode, cache_path: str | os.PathLike | None = None) -> tuple[torch.Tensor, list[str]]:
    """Latents `(N, ...)` and captions of `items`, encoded once; with `cache_path` stored there and reused.

    Args:
        items: `(image or file, caption)` pairs from [`load_items`].
        encode: `PIL.Image -> latent tensor` (no batch dimension), e.g. the family's VAE encode at the training
            size; not called for `.pt` files or when the cache matches.
        cache_path: A `.pt` file; reused when it holds the same captions in the same order.
    """
    captions = [c for _, c in items]
    if cache_path is not None and Path(cache_path).is_file():
        cached = torch.load(cache_path, map_location="cpu", weights_only=True)
        if cached["captions"] == captions:
            return cached["latents"], captions
    latents = [_as_latent(item, encode) for item, _ in items]
    shapes = {tuple(x.shape) for x in latents}
    if len(shapes) != 1:
        raise ValueError(f"`real_data` latents must share one shape (one training size), got {sorted(shapes)}.")
    latents = torch.stack(latents)
    if cache_path is not None:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"latents": latents, "captions": captions}, cache_path)
    return latents, captions


class RealLatents(torch.utils.data.Dataset):
    """Cached real latents with their captions: `dataset[i] -> (latent, caption)`."""

    def __init__(self, latents: torch.Tensor, captions: list[str]):
        if len(latents) != len(captions):
            raise ValueError(f"{len(latents)} latents but {len(captions)} captions.")
        self.latents, self.captions = latents, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.latents[i], self.captions[i]
