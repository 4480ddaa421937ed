"""What goes into a batch: the prompts, their embeddings (cached once or encoded per batch), the size buckets, the
initial noise, and the `t` and noise of the losses.

Every random draw of a run comes from one generator seeded alike on every process: each process draws the global
batch and keeps its own slice, so a run on P processes with batch b sees the same samples as one process with batch
P * b, and a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from . import real_data
from .losses import sample_t
from .recipe import margin_t_bounds


_PROMPT_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet", ".tsv")


def load_prompts(prompts: str, column: str = "prompt") -> list[str]:
    """Prompts from a text file (one a line; blank lines skipped) or a `datasets` name / path."""
    path = Path(prompts)
    if not path.exists() and (path.suffix in _PROMPT_FILE_SUFFIXES or prompts.startswith((".", "/", "~"))):
        raise ValueError(f"`--prompts` {prompts!r}: no such file.")
    if path.is_file() and path.suffix in ("", ".txt"):
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        out = [line for line in lines if line]
    else:
        from datasets import load_dataset

        try:
            if path.is_file():
                kind = path.suffix.lstrip(".").replace("jsonl", "json").replace("tsv", "csv")
                ds = load_dataset(kind, data_files=str(path), split="train")
            else:
                ds = load_dataset(prompts, split="train")
        except Exception as e:
            raise ValueError(
                f"`--prompts` {prompts!r} is neither a text file nor a dataset `datasets` can load "
                f"({type(e).__name__}: {e})."
            ) from e
        if column not in ds.column_names:
            raise ValueError(f"`--prompt_column` {column!r} is not in the dataset; columns: {ds.column_names}.")
        out = [str(x) for x in ds[column] if str(x).strip()]
    if not out:
        raise ValueError(f"`--prompts` {prompts!r} holds no prompt.")
    return out


def load_real_items(settings) -> list | None:
    """The `--real_data` samples and captions ([`real_data.load_items`]), read before any model loads; `None`
    without the flag. A bad folder, dataset or column raises `ValueError` naming the flag."""
    source = settings.real_data
    if source is None:
        return None
    if source.startswith((".", "/", "~")) and not Path(source).expanduser().exists():
        raise ValueError(f"`--real_data` {source!r}: no such folder.")
    try:
        return real_data.load_items(
            str(Path(source).expanduser()), settings.real_image_column, settings.real_caption_column
        )
    except ValueError as e:
        raise ValueError(f"`--real_data` {source!r}: {e}") from e
    except Exception as e:  # what `datasets` raises for a name it cannot load
        raise ValueError(
            f"`--real_data` {source!r} is neither a folder of captioned images nor a dataset `datasets` can load "
            f"({type(e).__name__}: {e})."
        ) from e


def load_real_latents(d, items: list, cache_dir: Path) -> real_data.RealLatents:
    """The `--real_data` samples encoded once at the run's size with the family's `encode_real` (the VAE on the
    device), cached in `cache_dir` by the main process; checked against the training latents' shape."""
    h, w, f = d.size()
    cache = Path(cache_dir) / f"latents-{d.family.name}-{h}x{w}x{f}.pt"

    def encode(image):
        return d.family.encode_real(d.components, image, h, w, f, d.device)

    if d.accelerator.is_main_process:
        real_data.cache_latents(items, encode, cache)
    d.accelerator.wait_for_everyone()
    latents, captions = real_data.cache_latents(items, encode, cache)
    want = tuple(d.family.latent_shape(d.components, 1, h, w, f)[1:])
    if tuple(latents.shape[1:]) != want:
        frames = " (an image is one frame: train with `--num_frames 1`, or give encoded videos as .pt)" if f else ""
        raise ValueError(
            f"`--real_data` latents have shape {tuple(latents.shape[1:])}, the run's training latents {want}{frames}."
        )
    return real_data.RealLatents(latents, captions)


def select_cond(cond: dict, index: torch.Tensor, n: int) -> dict:
    """Rows `index` of every per-sample entry (tensors or lists with `n` rows) of a conditioning dict."""
    out = {}
    for key, value in cond.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
            out[key] = value[index.to(value.device, non_blocking=True)]  # a pageable copy: no stream sync
        elif isinstance(value, list) and len(value) == n:
            out[key] = [value[i] for i in index.tolist()]
        else:
            out[key] = value
    return out


def cat_cond(a: dict, b: dict, n: int) -> dict:
    """The conditioning of a batch of `a`'s `n` rows followed by `b`'s `n` rows (batched classifier-free guidance).

    Prompt embeddings of different lengths are zero-padded at the end to the longer one and `prompt_embeds_mask`
    marks the real tokens (ones where a mask was `None`), as diffusers pads a batch of prompts; the padded tokens
    are masked out of attention. Other per-sample entries (tensors with `n` rows, lists of `n` items) are
    concatenated; shared entries are kept.
    """
    a, b = dict(a), dict(b)
    ea, eb = a.get("prompt_embeds"), b.get("prompt_embeds")
    masked = "prompt_embeds_mask" in a or "prompt_embeds_mask" in b
    if isinstance(ea, torch.Tensor) and isinstance(eb, torch.Tensor) and masked:
        length = max(ea.shape[1], eb.shape[1])
        if (
            ea.shape[1] != eb.shape[1]
            or a.get("prompt_embeds_mask") is not None
            or b.get("prompt_embeds_mask") is not None
        ):
            for c, e in ((a, ea), (b, eb)):
                mask = c.get("prompt_embeds_mask")
                if mask is None:
                    mask = torch.ones(e.shape[:2], dtype=torch.long, device=e.device)
                pad = length - e.shape[1]
                c["prompt_embeds"] = torch.nn.functional.pad(e, (0, 0, 0, pad))
                c["prompt_embeds_mask"] = torch.nn.functional.pad(mask, (0, pad))
    out = {}
    for key in a.keys() | b.keys():
        va, vb = a.get(key), b.get(key)
        if isinstance(va, torch.Tensor) and va.ndim > 0 and va.shape[0] == n:
            out[key] = torch.cat([va, vb.to(va.device)])
        elif isinstance(va, list) and len(va) == n:
            out[key] = va + vb
        else:
            out[key] = va
    return out


def trim_padding(cond: dict, host_mask: torch.Tensor | None = None) -> dict:
    """Cut a batch's prompt embeddings after the last real token of its longest prompt; drop a mask that is then
    all ones (`None`), as diffusers' pipelines pass it.

    The cached embeddings of all prompts are padded to the longest prompt of the whole set; a batch needs only its
    own longest. Without a mask attention runs its unmasked (flash) kernel. Qwen-Image's text RoPE positions do not
    depend on the length, so the velocities equal the padded, masked ones. Entries without a mask are unchanged.
    """
    mask, embeds = cond.get("prompt_embeds_mask"), cond.get("prompt_embeds")
    if not isinstance(mask, torch.Tensor) or not isinstance(embeds, torch.Tensor):
        return cond
    # `host_mask`: the same mask on the CPU (the cached prompts keep one): no device sync to read the lengths
    host = (host_mask if host_mask is not None else mask.cpu()).bool()
    real = host.any(dim=0)
    length = int(real.nonzero().max()) + 1 if bool(real.any()) else mask.shape[1]
    mask = mask[:, :length]
    out = dict(cond, prompt_embeds=embeds[:, :length], prompt_embeds_mask=mask)
    if bool(host[:, :length].all()):
        out["prompt_embeds_mask"] = None
    return out


def cfg_batchable(cond: dict, negative: dict) -> bool:
    """Whether the teacher's conditional and negative passes can run as one batch without padding either prompt:
    same embedding length (Wan2.2 pads every prompt to `max_sequence_length`; Qwen-Image's lengths differ)."""
    a, b = cond.get("prompt_embeds"), negative.get("prompt_embeds")
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape[1] == b.shape[1]
    return True


def _host_mask(cond: dict | None) -> torch.Tensor | None:
    """The prompt mask of a cached conditioning on the CPU, or `None` (no cache, or a family without a mask)."""
    mask = cond.get("prompt_embeds_mask") if cond is not None else None
    return mask.cpu() if isinstance(mask, torch.Tensor) else None


def to_device(cond: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}


@dataclass
class Batch:
    """One batch: initial noise `z`, its conditioning, and the schedule of its size (sigmas by phase, time shift);
    a batch of real data ([`Batches.draw_real`]) also holds its real latents."""

    z: torch.Tensor
    cond: dict
    sigmas: list[list[float]]
    shift: float
    x_real: torch.Tensor | None = None  # a real batch (fake-on-real): the real latents, `z` the noise they get


class TextConditions:
    """The prompts' embeddings (and the first frame's, for image-to-video).

    With `--cache_text_embeddings` every prompt, the negative prompt, the validation prompts and the captions of the
    real data (`captions`, fake-on-real) are encoded once and the text encoder is freed; else each batch is encoded as
    it is drawn.
    """

    def __init__(self, d, prompts: list[str], settings, captions: list[str] | None = None):
        self.d, self.prompts, self.max_sequence_length = d, prompts, settings.max_sequence_length
        self.captions = captions or []
        self.batch_size = settings.recipe.train_batch_size
        recipe, val_prompts = settings.recipe, settings.validation_prompts
        self.all = self.validation = self.real = None
        if settings.cache_text_embeddings:
            self.all = self.encode(prompts)
            self.real = self.encode(self.captions) if self.captions else None
            self.negative = self.encode([recipe.negative_prompt]) if recipe.needs_negative else None
            self.validation = self.encode(val_prompts) if val_prompts else None
            # the cached prompt masks on the CPU, read once: cutting each batch's padding then needs no device sync
            self._host_masks = {False: _host_mask(self.all), True: _host_mask(self.real)}
            d.components["text_encoder"].to("cpu")  # off the device even if the caller still holds the pipeline
            d.components["text_encoder"] = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            self.negative = self.encode([recipe.negative_prompt]) if recipe.needs_negative else None
        self.image, self._image_conds = None, {}
        if settings.image:
            from diffusers.utils import load_image

            self.image = load_image(settings.image)

    def encode(self, texts: list[str]) -> dict:
        d = self.d
        with torch.no_grad():
            cond = d.family.encode_prompt(d.components, texts, d.device, max_sequence_length=self.max_sequence_length)
        return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}

    def for_batch(self, index: torch.Tensor, size, captions: bool = False) -> dict:
        """The conditioning of prompts `index` (with `captions`: of real-data captions `index`) at `size`
        `(height, width, num_frames)`, on the device."""
        d = self.d
        texts, cached = (self.captions, self.real) if captions else (self.prompts, self.all)
        if cached is not None:
            host_mask = self._host_masks[captions]
            host_mask = None if host_mask is None else host_mask[index]
            cond = trim_padding(select_cond(cached, index, len(texts)), host_mask)
        else:
            cond = self.encode([texts[i] for i in index.tolist()])
        cond = dict(cond, **d.family.size_cond(*size, batch_size=len(index)))
        if self.image is not None:
            if size not in self._image_conds:
                self._image_conds[size] = d.family.encode_image(
                    d.components, self.image, self.batch_size, *size, d.device
                )
            cond.update(self._image_conds[size])
        return to_device(cond, d.device)


class Batches:
    """Draws batches and the losses' `t` and noise from the run's one generator (see the module docstring)."""

    def __init__(self, d, text: TextConditions, settings, generator: torch.Generator, real=None):
        self.d, self.text, self.gen, self.sizes = d, text, generator, settings.sizes
        self.real = real  # `real_data.RealLatents` of `--real_data` (their captions are `text.captions`), or None
        recipe = settings.recipe
        self.b, self.n_proc = recipe.train_batch_size, d.layout.dp_size  # a context-parallel group shares samples
        self.mine = slice(d.layout.dp_rank * self.b, (d.layout.dp_rank + 1) * self.b)
        self.sampling, self.recipe = recipe.timestep_sampling, recipe
        self.logit = {"logit_mean": recipe.logit_mean, "logit_std": recipe.logit_std}

    def draw(self) -> Batch:
        """Noise, prompts and size of one batch; with `--resolutions`, the bucket is drawn from the shared generator
        (every process draws the same one)."""
        d, gen, n, sizes = self.d, self.gen, self.b * self.n_proc, self.sizes
        size = sizes[int(torch.randint(len(sizes), (1,), generator=gen))] if len(sizes) > 1 else sizes[0]
        index = torch.randint(len(self.text.prompts), (n,), generator=gen)[self.mine]
        z = d.family.prepare_latents(d.components, n, *size, gen, "cpu", torch.float32)
        sigmas, shift = d.schedule(*size)
        return Batch(z[self.mine].to(d.device, non_blocking=True), self.text.for_batch(index, size), sigmas, shift)

    def draw_real(self) -> Batch:
        """A batch of the real latents (`x_real`, the run's one size) with their captions' conditioning, and the
        noise `z` they are noised with (fake-on-real)."""
        d, gen, n, size = self.d, self.gen, self.b * self.n_proc, self.sizes[0]
        index = torch.randint(len(self.real), (n,), generator=gen)[self.mine]
        x_real = self.real.latents[index]
        z = torch.randn((n, *x_real.shape[1:]), generator=gen)[self.mine]
        sigmas, shift = d.schedule(*size)
        cond = self.text.for_batch(index, size, captions=True)
        return Batch(z.to(d.device), cond, sigmas, shift, x_real=x_real.to(d.device, torch.float32))

    def t_and_eps(self, batch: Batch, s, like: torch.Tensor):
        """The losses' `t` in `(s, 1]` (on the teacher's shifted time scale by default) and noise shaped `like`.

        With a margin (`--t_margin`, `--t_lowest`, `--t_highest`, recipe part 4) `t` lies in
        `recipe.margin_t_bounds`'s `[t_lo, t_hi]` instead (the same draws)."""
        n, device, r = self.b * self.n_proc, self.d.device, self.recipe
        bounds = {}
        if r.t_margin_on:
            lo, hi = margin_t_bounds(float(s), batch.shift, r.t_margin, r.t_lowest, r.t_highest)
            bounds = {"min_gap": max(lo - float(s), 1e-3), "t_max": hi}
        t = sample_t(s, n, self.gen, sampling=self.sampling, shift=batch.shift, **self.logit, **bounds)
        # pageable host-to-device copies with `non_blocking`: no stream sync between back-simulation and the loss
        t = t[self.mine].to(device, non_blocking=True)
        eps = torch.randn((n, *like.shape[1:]), generator=self.gen)[self.mine].to(device, non_blocking=True)
        return t, eps
