"""Tiny random-weight diffusers pipelines for fast, offline tests.

Four families are supported, each saved in the standard diffusers folder layout (``model_index.json`` plus one
sub-folder per component, weights as safetensors), so that ``QwenImagePipeline.from_pretrained(folder)`` /
``WanPipeline.from_pretrained(folder)`` load them without any network access:

``qwen-image``
    ``QwenImagePipeline``. Transformer: 2 layers, 3 heads x 16 dims, ``in_channels=16`` (z_dim 4 x 2x2 patch),
    ``joint_attention_dim=16``, rope axes (8, 4, 4). VAE (``AutoencoderKLQwenImage``): ``base_dim=24``, ``z_dim=4``,
    ``dim_mult=[1, 2, 4]``, spatial factor 4. Text encoder (``Qwen2_5_VLForConditionalGeneration``): 2 layers,
    hidden 16, 2 heads, vocab 640; 2-layer vision tower of width 16. Scheduler: ``FlowMatchEulerDiscreteScheduler``
    with the real Qwen-Image settings (dynamic exponential shift 0.5 -> 0.9 over 256 -> 8192 tokens,
    ``shift_terminal=0.02``).
``wan2.2-t2v-a14b``
    ``WanPipeline`` with two different transformers (``transformer`` for high noise, ``transformer_2`` for low
    noise) and ``boundary_ratio=0.875``. Each transformer: 2 layers, 2 heads x 12 dims, ffn 32, 16 latent channels,
    patch (1, 2, 2), ``text_dim=32``. VAE (``AutoencoderKLWan``, Wan2.1 layout): ``base_dim=3``, ``z_dim=16``,
    spatial factor 8, temporal factor 4. Text encoder: ``UMT5EncoderModel`` (the class of the real Wan2.2
    checkpoints, the type ``WanPipeline`` expects), 2 layers, d_model 32, 4 heads, vocab 448. Scheduler:
    ``UniPCMultistepScheduler`` (flow prediction, ``flow_shift=12.0``).
``wan2.2-i2v-a14b``
    ``WanImageToVideoPipeline`` shaped like ``wan2.2-t2v-a14b``, except that each transformer reads 36 channels (16
    noisy latent channels, a 4-channel first-frame mask and 16 image-latent channels, concatenated) and writes 16,
    ``boundary_ratio=0.9``, UniPC ``flow_shift=5.0``, and no image encoder (as the real Wan2.2 I2V-A14B). The
    ``image`` argument is required.
``wan2.2-ti2v-5b``
    ``WanPipeline`` with one transformer (48 latent channels, otherwise as above) and ``expand_timesteps=True``.
    VAE shaped like the Wan2.2 VAE: ``z_dim=48``, ``patch_size=2``, residual blocks, spatial factor 16, temporal 4,
    ``base_dim=3``. Scheduler: UniPC with ``flow_shift=5.0``. The same folder loads with
    ``WanImageToVideoPipeline.from_pretrained(folder)`` for image-to-video (as for the real TI2V-5B there is no
    image encoder: the first frame's latents condition the video through ``expand_timesteps``). Note that
    ``WanImageToVideoPipeline`` of diffusers 0.42.1 calls ``ftfy`` unconditionally to clean prompts: install
    ``ftfy`` or pass ``prompt_embeds`` / ``negative_prompt_embeds`` (e.g. from ``WanPipeline.encode_prompt``).

Tokenizers are built locally, as byte-level BPEs: the 256 byte symbols (GPT-2's byte-to-unicode map) plus merges
that make a few dozen common prompt words (digit names, "handwritten", "digit", "photo", colours, ...) single
tokens; any other text falls back to one token per byte, so every prompt tokenizes and different prompts give
different ids. Qwen: a ``Qwen2Tokenizer`` (byte symbols at ids 0..255, ``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>`` last) with merges for the words of the Qwen-Image prompt template too, so that the template prefix
is 34 tokens as with the real tokenizer and ``prompt_template_encode_start_idx=34`` drops exactly it. Wan: a
``PreTrainedTokenizerFast`` with T5's ``<pad>``/``</s>``/``<unk>`` at ids 0/1/2, a space prefixed to every word
like sentencepiece, and ``</s>`` appended to every prompt ("a handwritten digit seven" -> 5 ids).

With the default sizes a 2-step pipeline call on CPU takes about 0.1 s: ``qwen-image`` at 32x32,
``wan2.2-t2v-a14b`` at 16x16 with 5 frames, ``wan2.2-ti2v-5b`` at 32x32 with 5 frames (its smallest valid size:
VAE factor 16 x patch 2).

Example::

    python -m diffusers_pdmd.tiny qwen-image /tmp/tiny-qwen-image --seed 0
"""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any


FAMILIES = ("qwen-image", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b")
# Qwen-Image's published `scheduler/scheduler_config.json` (FlowMatchEulerDiscreteScheduler), used at every size.
QWEN_IMAGE_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}

# Words of QwenImagePipeline's prompt template, as the Qwen pre-tokenizer splits them (a leading space is kept).
_QWEN_TEMPLATE_WORDS = (
    "system",
    "user",
    "assistant",
    "Describe",
    " the",
    " image",
    " by",
    " detailing",
    " color",
    " shape",
    " size",
    " texture",
    " quantity",
    " text",
    " spatial",
    " relationships",
    " of",
    " objects",
    " and",
    " background",
)
# Common prompt words that get a single token (any other text still tokenizes, byte by byte), so that short prompts
# stay short, e.g. "a handwritten digit seven" is 4 tokens.
_COMMON_WORDS = (
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    *("handwritten", "digit", "number", "letter", "photo", "image", "picture", "video", "drawing", "painting"),
    *("a", "an", "the", "of", "and", "with", "in", "on", "at", "is"),
    *("cat", "dog", "person", "man", "woman", "car", "tree", "house", "sky", "water"),
    *("red", "green", "blue", "black", "white", "small", "large", "bright", "dark", "blurry"),
)
_QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"`family` must be one of {FAMILIES}, got {family!r}.")


def _byte_symbols() -> list[str]:
    """Returns the printable unicode symbol of each byte 0..255, as GPT-2 style byte-level BPE maps them.

    Printable latin-1 bytes stand for themselves; the others (controls, space, ...) are shifted to code points 256+
    in byte order, so that e.g. the space byte is ``"Ġ"`` and the newline byte is ``"Ċ"``.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def _round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def _bpe_segment(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Applies BPE merges (lowest rank first, leftmost first) to a list of symbols."""
    while len(pieces) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def _byte_level_bpe(words, head=(), tail=()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Builds a byte-level BPE vocabulary in which each of ``words`` is a single token.

    Args:
        words: Strings (with their leading space where the pre-tokenizer keeps one) to make single tokens.
        head: Tokens placed before the 256 byte symbols.
        tail: Tokens placed after everything else.

    Returns:
        The vocabulary (token -> id) and the ranked merges. Merges are appended word by word, each word first
        segmented with the merges so far, so adding a word never changes how the previous ones tokenize.
    """
    symbols = _byte_symbols()
    vocab = {token: i for i, token in enumerate([*head, *symbols])}
    ranks = {}
    for word in words:
        pieces = _bpe_segment([symbols[b] for b in word.encode("utf-8")], ranks)
        while len(pieces) > 1:
            ranks[pieces[0], pieces[1]] = len(ranks)
            pieces[:2] = [pieces[0] + pieces[1]]
            vocab.setdefault(pieces[0], len(vocab))
    for token in tail:
        vocab[token] = len(vocab)
    return vocab, list(ranks)


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    # The first word of a prompt follows "user\n" without a space, the others have one: add both forms.
    words = [*_QWEN_TEMPLATE_WORDS, *(form for word in _COMMON_WORDS for form in (word, " " + word))]
    vocab, merges = _byte_level_bpe(words, tail=_QWEN_SPECIAL_TOKENS)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        additional_special_tokens=list(_QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=32768,
    )


def _t5_tokenizer():
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    pad, eos, unk = _T5_SPECIAL_TOKENS
    # Like T5's sentencepiece, every word (the first one too) starts with a space marker.
    vocab, merges = _byte_level_bpe([" " + word for word in _COMMON_WORDS], head=_T5_SPECIAL_TOKENS)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, eos_token=eos, unk_token=unk, model_max_length=512
    )


def build_tokenizer(family: str):
    """Builds the local (download-free) tokenizer of a family.

    Args:
        family: One of `FAMILIES`.

    Returns:
        A `Qwen2Tokenizer` for ``qwen-image``, a `PreTrainedTokenizerFast` (T5-like special tokens) for the Wan
        families.
    """
    _check_family(family)
    return _qwen_tokenizer() if family == "qwen-image" else _t5_tokenizer()


def _seeded(seed: int, make, *args, **kwargs):
    """Calls ``make`` (which initialises weights on CPU) with the CPU RNG seeded, restoring the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return make(*args, **kwargs)


def _with_latent_stats(vae_config: dict) -> dict:
    """Fills identity latent statistics (mean 0, std 1) of the right length when not given explicitly."""
    z_dim = vae_config["z_dim"]
    vae_config.setdefault("latents_mean", [0.0] * z_dim)
    vae_config.setdefault("latents_std", [1.0] * z_dim)
    return vae_config


def _qwen_components(seed: int, transformer_kwargs: dict, vae_kwargs: dict) -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _qwen_tokenizer()
    text_config = {
        "vocab_size": _round_up(len(tokenizer)),
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1000000.0},
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16}
    text_encoder_config = Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config)
    transformer_config = {
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 4,
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 3,
        "joint_attention_dim": 16,
        "guidance_embeds": False,
        "axes_dims_rope": (8, 4, 4),
        **transformer_kwargs,
    }
    vae_config = {
        "base_dim": 24,
        "z_dim": 4,
        "dim_mult": [1, 2, 4],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True],
        **vae_kwargs,
    }
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    return {
        "transformer": _seeded(seed, QwenImageTransformer2DModel, **transformer_config),
        "vae": _seeded(seed + 1, AutoencoderKLQwenImage, **_with_latent_stats(vae_config)),
        "text_encoder": _seeded(seed + 2, Qwen2_5_VLForConditionalGeneration, text_encoder_config).eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def _wan_components(family: str, seed: int, transformer_kwargs: dict, vae_kwargs: dict) -> dict:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    ti2v, i2v = family == "wan2.2-ti2v-5b", family == "wan2.2-i2v-a14b"
    tokenizer = _t5_tokenizer()
    text_encoder_config = UMT5Config(
        vocab_size=_round_up(len(tokenizer)),
        d_model=32,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    latent_channels = 48 if ti2v else 16
    transformer_config = {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        # I2V-A14B: noisy latents + 4 mask channels (one per frame of a temporal group) + image latents.
        "in_channels": 2 * latent_channels + 4 if i2v else latent_channels,
        "out_channels": latent_channels,
        "text_dim": text_encoder_config.d_model,
        "freq_dim": 256,
        "ffn_dim": 32,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 32,
        **transformer_kwargs,
    }
    vae_config = {
        "base_dim": 3,
        "z_dim": latent_channels,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
        "scale_factor_temporal": 4,
        "scale_factor_spatial": 16 if ti2v else 8,
    }
    if ti2v:  # Wan2.2 VAE: 2x2 pixel patchify (3 -> 12 channels) and residual down/up-sampling.
        vae_config.update(in_channels=12, out_channels=12, patch_size=2, is_residual=True)
    vae_config.update(vae_kwargs)
    components = {
        "transformer": _seeded(seed, WanTransformer3DModel, **transformer_config),
        "vae": _seeded(seed + 1, AutoencoderKLWan, **_with_latent_stats(vae_config)),
        "text_encoder": _seeded(seed + 2, UMT5EncoderModel, text_encoder_config).eval(),
        "tokenizer": tokenizer,
        "scheduler": UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0 if ti2v or i2v else 12.0
        ),
    }
    if ti2v:
        components.update(transformer_2=None, boundary_ratio=None, expand_timesteps=True)
    else:
        components.update(
            transformer_2=_seeded(seed + 3, WanTransformer3DModel, **transformer_config),
            boundary_ratio=0.9 if i2v else 0.875,
            expand_timesteps=False,
        )
        if i2v:
            components.update(image_encoder=None, image_processor=None)
    return components


def build_components(
    family: str, seed: int = 0, transformer_kwargs: dict | None = None, vae_kwargs: dict | None = None
) -> dict[str, Any]:
    """Builds the random-weight components of a tiny pipeline.

    Every module is initialised from its own seed derived from ``seed`` (transformer: ``seed``, VAE: ``seed + 1``,
    text encoder: ``seed + 2``, Wan A14B ``transformer_2``: ``seed + 3``), so results do not depend on the global
    torch RNG, which is left untouched.

    Args:
        family: One of `FAMILIES`.
        seed: Base seed of the random weights.
        transformer_kwargs: Overrides of the transformer config (applied to both Wan A14B transformers). The caller
            keeps it consistent with the VAE (latent channels) and text encoder (``joint_attention_dim`` /
            ``text_dim``).
        vae_kwargs: Overrides of the VAE config. ``latents_mean`` / ``latents_std`` default to 0 / 1 of length
            ``z_dim``.

    Returns:
        Keyword arguments for `pipeline_class(family)`: the modules, tokenizer and scheduler, plus for the Wan
        families the ``transformer_2``, ``boundary_ratio`` and ``expand_timesteps`` settings.
    """
    _check_family(family)
    transformer_kwargs = dict(transformer_kwargs or {})
    vae_kwargs = dict(vae_kwargs or {})
    if family == "qwen-image":
        return _qwen_components(seed, transformer_kwargs, vae_kwargs)
    return _wan_components(family, seed, transformer_kwargs, vae_kwargs)


def pipeline_class(family: str):
    """Returns the diffusers pipeline class of a family: `QwenImagePipeline`, `WanImageToVideoPipeline`
    (``wan2.2-i2v-a14b``) or `WanPipeline`."""
    _check_family(family)
    import diffusers

    if family == "qwen-image":
        return diffusers.QwenImagePipeline
    return diffusers.WanImageToVideoPipeline if family == "wan2.2-i2v-a14b" else diffusers.WanPipeline


def build_pipeline(family: str, seed: int = 0, **kwargs):
    """Builds a tiny random-weight pipeline in memory.

    Args:
        family: One of `FAMILIES`.
        seed: Base seed of the random weights (see `build_components`).
        **kwargs: Forwarded to `build_components` (``transformer_kwargs``, ``vae_kwargs``).

    Returns:
        The `DiffusionPipeline` (on CPU, float32).
    """
    return pipeline_class(family)(**build_components(family, seed=seed, **kwargs))


def save_pipeline(family: str, out_dir: str | os.PathLike, seed: int = 0, **kwargs) -> pathlib.Path:
    """Builds a tiny pipeline and saves it (safetensors) in the diffusers folder layout.

    Args:
        family: One of `FAMILIES`.
        out_dir: Destination folder, created if needed.
        seed: Base seed of the random weights (see `build_components`).
        **kwargs: Forwarded to `build_components` (``transformer_kwargs``, ``vae_kwargs``).

    Returns:
        The destination folder.
    """
    out_dir = pathlib.Path(out_dir)
    build_pipeline(family, seed=seed, **kwargs).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def main(argv=None) -> int:
    """Command line entry point: ``python -m diffusers_pdmd.tiny FAMILY OUT_DIR [--seed N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_pdmd.tiny", description="Save a tiny random-weight diffusers pipeline."
    )
    parser.add_argument("family", choices=FAMILIES, help="model family")
    parser.add_argument("out_dir", help="destination folder")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the random weights (default: 0)")
    args = parser.parse_args(argv)
    out_dir = save_pipeline(args.family, args.out_dir, seed=args.seed)
    print(f"saved tiny {args.family} pipeline to {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
