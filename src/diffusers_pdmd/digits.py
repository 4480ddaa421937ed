"""A small real teacher: a Qwen-Image pipeline trained on scikit-learn's handwritten digits.

The folder that `build_digits_teacher` writes is a standard `QwenImagePipeline` checkpoint (``model_index.json``,
safetensors weights), so ``QwenImagePipeline.from_pretrained(folder)`` samples from it offline, and the project's
distillation code treats it exactly like the real Qwen-Image. Prompts are ``"a handwritten digit zero"`` ...
``"a handwritten digit nine"`` (`PROMPTS`, `prompt_for`); sample 16x16 images with true CFG against the empty
prompt, e.g. ``pipe(prompt, negative_prompt="", true_cfg_scale=4.0, num_inference_steps=30, height=16, width=16)``.

Data. `sklearn.datasets.load_digits`: 1797 8x8 images (values 0..16, 10 classes), split 80/20 (stratified,
``random_state=0``) into 1437 train and 360 test digits (`real_digits`). The teacher and the metrics' classifier
(`diffusers_pdmd.metrics`) train on the train split only, so the test split stays unseen by both. Images are
upsampled bilinearly to 16x16 and replicated to 3 channels (the Qwen VAE takes RGB). 16x16 is the smallest size
at which the pipeline's latent grid is a real image: VAE factor 2 x patch 2 gives 4x4 = 16 image tokens; 32x32
would quadruple the cost of every teacher call without adding information to 8x8 sources.

Components (all from `diffusers_pdmd.tiny.build_components("qwen-image", ...)` with the overrides below):

- VAE (`AutoencoderKLQwenImage`, ``base_dim=12``, ``z_dim=4``, ``dim_mult=[1, 2]``: spatial factor 2), trained as
  a VAE (L2 reconstruction + a small KL) on the train digits. Its ``latents_mean`` / ``latents_std`` are set to the
  per-channel statistics of the encoded (posterior mean) train set, so the transformer sees unit-scale latents
  ``z_norm = (z - latents_mean) / latents_std``; the pipeline decodes with ``z = z_norm * latents_std +
  latents_mean``.
- Text encoder: the tiny random Qwen2.5-VL (hidden 16) of `diffusers_pdmd.tiny`, frozen. The 10 prompts and the
  empty prompt are encoded once with the pipeline's own `encode_prompt`.
- Transformer (`QwenImageTransformer2DModel`, 4 layers, 2 heads x 32 dims, ``joint_attention_dim=16``), trained by
  rectified flow matching on packed normalised latents: ``x_t = (1 - t) x_0 + t eps``, target ``v = eps - x_0``,
  ``timestep=t``. ``t`` is uniform, then shifted as the pipeline's scheduler shifts its sigmas for this sequence
  length (``exp(mu)`` with ``mu = calculate_shift(16 tokens)``, about 1.63), so training covers the sampled
  times with the same density. The prompt is dropped to the empty prompt's embedding 10% of the time, for true
  CFG.
- Scheduler: `FlowMatchEulerDiscreteScheduler` with Qwen-Image's settings.

Size: 3.8 MB (transformer 2.5 MB, VAE 1.0 MB, text encoder 0.2 MB; float32 safetensors). A copy built with the
defaults (``seed=0``, torch 2.13 CPU, 2 threads) ships in ``diffusers_pdmd/assets/digits_teacher``;
`load_or_build_teacher` returns it, or rebuilds one (about 5 minutes on 2 idle CPU cores: 302 s measured, of which
78 s VAE). With 30 steps and ``true_cfg_scale=3`` against ``""`` its samples are read as the prompted digit
99.5% of the time by the classifier of `diffusers_pdmd.metrics` (20 per digit; 95.5% without CFG, 100% at scale 4).

Command line::

    python -m diffusers_pdmd.digits build-teacher OUT_DIR [--seed N] [--steps N] [--vae-steps N]
    python -m diffusers_pdmd.digits evaluate [TEACHER_DIR] [--per-class N] [--steps N] [--cfg S] [--grid PNG]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import time

import numpy as np
import torch

from . import metrics
from .metrics import IMAGE_SIZE, real_digits  # the data set lives with the metrics that are measured on it


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPTS = [f"a handwritten digit {name}" for name in DIGIT_NAMES]
NEGATIVE_PROMPT = ""

ASSET_DIR = pathlib.Path(__file__).resolve().parent / "assets" / "digits_teacher"

TEACHER_VAE_KWARGS = {
    "base_dim": 12,
    "z_dim": 4,
    "dim_mult": [1, 2],
    "num_res_blocks": 1,
    "temperal_downsample": [False],
}
TEACHER_TRANSFORMER_KWARGS = {
    "patch_size": 2,
    "in_channels": 16,  # z_dim 4 x 2x2 patch
    "out_channels": 4,
    "num_layers": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "joint_attention_dim": 16,  # hidden size of the tiny text encoder
    "axes_dims_rope": (8, 12, 12),
}
VAE_STEPS = 300
TRANSFORMER_STEPS = 2000
PROMPT_DROPOUT = 0.1
# Recommended sampling settings (the teacher's reference samples).
SAMPLE_STEPS = 30
TRUE_CFG_SCALE = 3.0


def prompt_for(label: int) -> str:
    """The prompt of digit ``label`` (0..9), e.g. ``prompt_for(7) == "a handwritten digit seven"``."""
    label = int(label)
    if not 0 <= label <= 9:
        raise ValueError(f"`label` must be a digit 0..9, got {label}.")
    return PROMPTS[label]


def label_for(prompt: str) -> int:
    """Inverse of `prompt_for`."""
    if prompt not in PROMPTS:
        raise ValueError(f"`prompt` must be one of PROMPTS, got {prompt!r}.")
    return PROMPTS.index(prompt)


def write_real_digits(folder: str | os.PathLike, split: str = "train") -> pathlib.Path:
    """The real digits of `split` as a `--real_data` folder (fake-on-real): `<i>.png` (16x16 RGB) beside `<i>.txt`,
    its digit's prompt ([`prompt_for`]). Written once; a folder that holds them already is returned as it is."""
    from PIL import Image

    folder = pathlib.Path(folder)
    images, labels = real_digits(split)
    if len(list(folder.glob("*.png"))) == len(images):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    pixels = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    for i, (image, label) in enumerate(zip(pixels, labels.tolist())):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(prompt_for(label) + "\n", encoding="utf-8")
    return folder


@contextlib.contextmanager
def _num_threads(n: int | None):
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _progress(iterable, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled, leave=False)


def _decode_raw(vae, z: torch.Tensor) -> torch.Tensor:
    """The VAE decoder without the final clamp of ``vae.decode`` (so that the L2 loss has gradients everywhere)."""
    return vae.decoder(vae.post_quant_conv(z))


def train_vae(
    vae,
    images: torch.Tensor,
    steps: int = VAE_STEPS,
    batch_size: int = 64,
    lr: float = 2e-3,
    kl_weight: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Trains an `AutoencoderKLQwenImage` in place as a VAE on images in [0, 1] (N, 3, H, W).

    Loss: ``mean (decode(z) - x)^2 + kl_weight * mean KL(q(z|x) || N(0, I))`` with ``z ~ q(z|x)``, ``x`` in
    [-1, 1]; AdamW, one-cycle schedule (5% warm-up, cosine decay).

    Returns:
        The reconstruction loss of each step.
    """
    x_all = (2.0 * images - 1.0)[:, :, None]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    vae.train()
    losses = []
    for _ in _progress(range(steps), "VAE", progress):
        x = x_all[torch.randint(0, len(x_all), (batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = ((_decode_raw(vae, z) - x) ** 2).mean()
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
        optimizer.zero_grad()
        (reconstruction + kl_weight * kl).backward()
        optimizer.step()
        scheduler.step()
        losses.append(reconstruction.item())
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, normalize: bool = True, batch_size: int = 256) -> torch.Tensor:
    """Posterior means of images in [0, 1] (N, 3, H, W): (N, z_dim, H / 2, W / 2), normalised with the VAE config.

    With ``normalize`` the result is ``(z - latents_mean) / latents_std``, the space the transformer works in (the
    inverse of what `QwenImagePipeline` applies before decoding).
    """
    z = torch.cat([vae.encode((2.0 * x - 1.0)[:, :, None]).latent_dist.mean for x in images.split(batch_size)])[
        :, :, 0
    ]
    if normalize:
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
        z = (z - mean) / std
    return z


@torch.no_grad()
def decode_latents(vae, z_norm: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_latents`: normalised latents (N, z_dim, h, w) to images in [0, 1], as the pipeline does."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    x = vae.decode((z_norm * std + mean)[:, :, None], return_dict=False)[0][:, :, 0]
    return (x / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def set_latent_stats(vae, images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Sets the VAE config's ``latents_mean`` / ``latents_std`` to the per-channel statistics of the latents."""
    z = encode_latents(vae, images, normalize=False)
    mean = z.mean(dim=(0, 2, 3)).tolist()
    std = z.std(dim=(0, 2, 3)).tolist()
    vae.register_to_config(latents_mean=mean, latents_std=std)
    return mean, std


@torch.no_grad()
def prompt_table(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of the 10 prompts and of the empty prompt (row 10), from the pipeline's own `encode_prompt`.

    Each prompt is encoded alone (as the pipeline does for a batch of one prompt), then right-padded.

    Returns:
        ``(embeds, mask)``: float32 (11, L, D) and bool (11, L).
    """
    rows = [pipe.encode_prompt(prompt, device="cpu")[0][0] for prompt in [*PROMPTS, NEGATIVE_PROMPT]]
    length = max(len(row) for row in rows)
    embeds = torch.zeros(len(rows), length, rows[0].shape[-1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        embeds[i, : len(row)] = row
        mask[i, : len(row)] = True
    return embeds, mask


def sequence_shift(pipe, image_seq_len: int) -> float:
    """``exp(mu)``: the time shift the pipeline's scheduler applies for ``image_seq_len`` packed tokens."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    config = pipe.scheduler.config
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    return float(np.exp(mu))


def train_transformer(
    pipe,
    latents: torch.Tensor,
    labels: torch.Tensor,
    steps: int = TRANSFORMER_STEPS,
    batch_size: int = 128,
    lr: float = 2e-3,
    prompt_dropout: float = PROMPT_DROPOUT,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Trains ``pipe.transformer`` in place by rectified flow matching on normalised latents (N, z_dim, h, w).

    ``x_t = (1 - t) x_0 + t eps``, loss ``mean (v_theta(x_t, t, prompt) - (eps - x_0))^2`` on packed latents,
    ``t = shift u / (1 + (shift - 1) u)`` with ``u`` uniform and ``shift = exp(mu)`` of this sequence length; the
    prompt is replaced by the empty prompt with probability ``prompt_dropout``.

    Returns:
        The loss of each step.
    """
    transformer = pipe.transformer
    embeds, mask = prompt_table(pipe)
    n, channels, height, width = latents.shape
    packed = pipe._pack_latents(latents, n, channels, height, width)
    img_shapes = [[(1, height // 2, width // 2)]] * batch_size
    shift = sequence_shift(pipe, packed.shape[1])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    transformer.train().requires_grad_(True)
    losses = []
    for _ in _progress(range(steps), "transformer", progress):
        index = torch.randint(0, n, (batch_size,), generator=generator)
        x0 = packed[index]
        drop = torch.rand(batch_size, generator=generator) < prompt_dropout
        prompt = torch.where(drop, len(PROMPTS), labels[index])
        u = torch.rand(batch_size, generator=generator)
        t = shift * u / (1 + (shift - 1) * u)
        eps = torch.randn(x0.shape, generator=generator)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        v = transformer(
            hidden_states=x_t,
            encoder_hidden_states=embeds[prompt],
            encoder_hidden_states_mask=mask[prompt],
            timestep=t,
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
        loss = ((v - (eps - x0)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    transformer.eval().requires_grad_(False)
    return losses


def build_digits_teacher(
    out_dir: str | os.PathLike,
    seed: int = 0,
    steps: int = TRANSFORMER_STEPS,
    vae_steps: int = VAE_STEPS,
    num_threads: int | None = 2,
    progress: bool = True,
) -> pathlib.Path:
    """Trains the digits teacher from scratch and saves it as a `QwenImagePipeline` folder.

    Deterministic given ``seed`` and ``num_threads`` on one machine and torch version (fixed initial weights from
    `diffusers_pdmd.tiny.build_components`, fixed data order, noise and times). With the defaults it takes about
    5 minutes on 2 idle CPU cores and reproduces the shipped ``assets/digits_teacher`` (same torch version).

    Args:
        out_dir: Destination folder (created; existing files are overwritten).
        seed: Seed of the initial weights and of the training randomness.
        steps: Transformer training steps (batch 128).
        vae_steps: VAE training steps (batch 64).
        num_threads: torch CPU threads during the build (restored afterwards); ``None`` leaves the setting alone.
        progress: Show tqdm progress bars.

    Returns:
        The destination folder.
    """
    from diffusers import QwenImagePipeline

    from .tiny import build_components

    out_dir = pathlib.Path(out_dir)
    with _num_threads(num_threads):
        start = time.perf_counter()
        components = build_components(
            "qwen-image", seed=seed, transformer_kwargs=TEACHER_TRANSFORMER_KWARGS, vae_kwargs=TEACHER_VAE_KWARGS
        )
        pipe = QwenImagePipeline(**components)
        pipe.text_encoder.requires_grad_(False)
        images, labels = real_digits("train")
        vae_losses = train_vae(pipe.vae, images, steps=vae_steps, seed=seed, progress=progress)
        set_latent_stats(pipe.vae, images)
        vae_seconds = time.perf_counter() - start
        latents = encode_latents(pipe.vae, images)
        flow_losses = train_transformer(pipe, latents, labels, steps=steps, seed=seed + 1, progress=progress)
        total_seconds = time.perf_counter() - start
    pipe.save_pretrained(out_dir, safe_serialization=True)
    info = {
        "seed": seed,
        "vae_steps": vae_steps,
        "transformer_steps": steps,
        "num_threads": num_threads,
        "final_vae_reconstruction_mse": float(np.mean(vae_losses[-50:])),
        "final_flow_loss": float(np.mean(flow_losses[-100:])),
        "vae_seconds": round(vae_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        "torch": torch.__version__,
    }
    (out_dir / "digits_teacher.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def _default_cache_dir(seed: int) -> pathlib.Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "diffusers_pdmd" / f"digits_teacher_seed{seed}"


def load_or_build_teacher(path: str | os.PathLike | None = None, seed: int = 0, **build_kwargs) -> pathlib.Path:
    """Returns a folder holding the digits teacher, building it only when needed.

    Args:
        path: Where the teacher should be. If it already holds a pipeline (``model_index.json``) it is returned as
            is. Otherwise, for ``seed=0`` the shipped teacher is copied there, and for other seeds one is built
            there. ``None``: the shipped teacher itself for ``seed=0``, else a per-seed folder under
            ``$XDG_CACHE_HOME/diffusers_pdmd`` (``~/.cache/diffusers_pdmd``).
        seed: Seed of the teacher (see `build_digits_teacher`).
        **build_kwargs: Forwarded to `build_digits_teacher` when a build happens.

    Returns:
        The teacher's folder, for ``QwenImagePipeline.from_pretrained``.
    """
    shipped = seed == 0 and not build_kwargs and (ASSET_DIR / "model_index.json").is_file()
    if path is None:
        if shipped:
            return ASSET_DIR
        path = _default_cache_dir(seed)
    path = pathlib.Path(path)
    if (path / "model_index.json").is_file():
        return path
    if shipped:
        shutil.copytree(ASSET_DIR, path, dirs_exist_ok=True)
        return path
    return build_digits_teacher(path, seed=seed, **build_kwargs)


def load_teacher(path: str | os.PathLike | None = None, seed: int = 0):
    """`load_or_build_teacher`, loaded as a `QwenImagePipeline` on CPU with its progress bar off."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(load_or_build_teacher(path, seed=seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_digits(
    pipe,
    labels,
    num_inference_steps: int = SAMPLE_STEPS,
    true_cfg_scale: float = TRUE_CFG_SCALE,
    seed: int = 0,
    batch_size: int = 200,
) -> torch.Tensor:
    """Samples one 16x16 image per entry of ``labels`` through the pipeline's own ``__call__``.

    Args:
        pipe: A `QwenImagePipeline` (e.g. `load_teacher`).
        labels: Digits to prompt for, (N,).
        num_inference_steps: Euler steps of the pipeline's scheduler.
        true_cfg_scale: True CFG scale against the empty prompt (1 disables CFG).
        seed: Seed of the initial noise (one generator, consumed batch after batch).
        batch_size: Images per pipeline call.

    Returns:
        Images, float32 (N, 3, 16, 16) in [0, 1].
    """
    labels = [int(label) for label in torch.as_tensor(labels).reshape(-1)]
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(labels), batch_size):
        prompts = [prompt_for(label) for label in labels[start : start + batch_size]]
        cfg = {"negative_prompt": [NEGATIVE_PROMPT] * len(prompts)} if true_cfg_scale > 1 else {}
        images = pipe(
            prompts,
            true_cfg_scale=true_cfg_scale,
            num_inference_steps=num_inference_steps,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            generator=generator,
            output_type="pt",
            **cfg,
        ).images
        out.append(images.float().cpu())
    return torch.cat(out)


def save_grid(images, path: str | os.PathLike, nrow: int = 10, scale: int = 4) -> pathlib.Path:
    """Saves images in [0, 1] (N, C, H, W) as one PNG grid, ``nrow`` per row, each pixel ``scale`` x ``scale``."""
    from PIL import Image

    x = torch.as_tensor(images).float().clamp(0, 1)
    if x.ndim == 3:
        x = x[:, None]
    n, c, h, w = x.shape
    rows = -(-n // nrow)
    grid = torch.zeros(c, rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = x[i]
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    array = array.repeat(scale, axis=0).repeat(scale, axis=1)
    path = pathlib.Path(path)
    Image.fromarray(array[..., 0] if c == 1 else array).save(path)
    return path


def evaluate_teacher(
    path: str | os.PathLike | None = None,
    per_class: int = 20,
    num_inference_steps: int = SAMPLE_STEPS,
    true_cfg_scale: float = TRUE_CFG_SCALE,
    seed: int = 0,
    grid: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Samples ``per_class`` images per digit from the teacher and measures them with `diffusers_pdmd.metrics`.

    Returns:
        `diffusers_pdmd.metrics.digit_metrics` of the samples (Fréchet distance to the real test digits), plus the
        classifier's own test accuracy (``classifier_test_accuracy``).
    """
    pipe = load_teacher(path)
    labels = torch.arange(10).repeat_interleave(per_class)
    images = sample_digits(pipe, labels, num_inference_steps, true_cfg_scale, seed=seed)
    if grid is not None:
        order = torch.arange(len(labels)).view(10, per_class).T.reshape(-1)  # one digit per column
        save_grid(images[order], grid, nrow=10)
    out = metrics.digit_metrics(images, labels, reference_images=real_digits("test")[0])
    out["classifier_test_accuracy"] = metrics.digit_classifier().test_accuracy
    return out


def main(argv=None) -> int:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m diffusers_pdmd.digits", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-teacher", help="train the digits teacher and save it")
    build.add_argument("out_dir", help="destination folder")
    build.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    build.add_argument("--steps", type=int, default=TRANSFORMER_STEPS, help="transformer training steps")
    build.add_argument("--vae-steps", type=int, default=VAE_STEPS, help="VAE training steps")
    build.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    evaluate = commands.add_parser("evaluate", help="sample the teacher and report digit metrics")
    evaluate.add_argument("teacher_dir", nargs="?", default=None, help="teacher folder (default: the shipped one)")
    evaluate.add_argument("--per-class", type=int, default=20, help="samples per digit (default: 20)")
    evaluate.add_argument("--steps", type=int, default=SAMPLE_STEPS, help="sampling steps")
    evaluate.add_argument("--cfg", type=float, default=TRUE_CFG_SCALE, help="true CFG scale")
    evaluate.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    evaluate.add_argument("--grid", default=None, help="save the samples as a PNG grid here")
    args = parser.parse_args(argv)
    if args.command == "build-teacher":
        out_dir = build_digits_teacher(
            args.out_dir, seed=args.seed, steps=args.steps, vae_steps=args.vae_steps, num_threads=args.threads
        )
        info = json.loads((out_dir / "digits_teacher.json").read_text())
        print(f"saved the digits teacher to {out_dir} in {info['total_seconds']:.0f} s")
    else:
        result = evaluate_teacher(
            args.teacher_dir, args.per_class, args.steps, args.cfg, seed=args.seed, grid=args.grid
        )
        print(json.dumps({key: round(value, 4) for key, value in result.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
