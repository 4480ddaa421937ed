"""The memory plan of a training run (`--memory auto`): the fastest speed / memory flag set that fits the device,
chosen from the base's config files before any weights load.

Three steps, each a small function:

1. [`model_sizes`]: parameter counts of the base (teacher transformers, the LoRA-adapted linears, fp8-storable
   weights, text encoder, VAE), built from the config files on the meta device (no memory, no weights);
2. [`estimate_peak`]: the peak allocated device memory of each trained phase under a flag set ([`Flags`]) for a
   [`Workload`] (tokens of the largest bucket, batch, LoRA ranks, phases, which transformers each phase calls);
3. [`choose_flags`]: the candidates (every combination of the flags the user did not pass), ranked exact bf16
   first, then by the time they cost ([`SLOWDOWN`]), then by how many flags they add; the first whose peak plus
   the margin fits the budget wins. If none fits, [`MemoryPlanError`] names the card size needed and the flag sets
   tried.

[`apply_memory_plan`] wires them to the parsed flags of the example scripts (one call before the base loads). The
estimator's constants are calibrated on measured runs of the example scripts (docs/training.md, "The memory plan",
lists them); `choose_swap_mode` (pipelines/expert_swap.py) is the sampling-side counterpart.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path


logger = logging.getLogger("diffusers_pdmd.train")

GIB = 2**30
MEMORY_MODES = ("auto", "off")
# Flags the plan may turn on (never off: a flag the user passed stays), in the order the log names them.
PLAN_FLAGS = ("gradient_checkpointing", "offload_idle_transformers", "offload_activations", "base_fp8")
# Relative time per update of each flag (for ranking only). Measured: eager / compiled Qwen-Image 14.9 / 9.9 s
# (phase 1, H100); gradient checkpointing ~+30% (its recompute); offloaded activations: T2V-A14B eager with
# `--offload_idle_transformers --offload_activations` 58.6 / 62.4 s against 55.6 / 65.6 s with
# `--base_fp8 --offload_idle_transformers` (1 fake update): within a few %; the idle transformer moves once a phase.
SLOWDOWN = {
    "eager": 1.5,
    "gradient_checkpointing": 1.3,
    "offload_activations": 1.05,
    "offload_idle_transformers": 1.01,
    "base_fp8": 1.0,  # one teacher forward: 3457 ms vs 3431 ms in bf16 (H100); but not exact: ranked last
}
# Calibrated on the measured peaks (docs/training.md lists them): bytes per token and block of one block's working
# set in backward (recompute included), as multiples of the hidden width and of the MLP width.
BLOCK_BYTES_PER_HIDDEN = 24
BLOCK_BYTES_PER_FFN = 6
# A block run without checkpointing (`--uncheckpointed_blocks`) keeps this fraction of its working set until its
# backward (compiled, H100; implied by the measured peaks against the estimate with none kept): Wan2.2 0.84 (A14B
# phase 0, 3 of 40 kept), 0.86 (TI2V-5B, 3 of 30), 0.93 (TI2V-5B, 12 of 30: 70.0 GiB allocated under a 79 GiB cap).
KEPT_BLOCK_FRACTION = 0.95
# Qwen-Image: 0.59 of the working set as counted, which takes `--max_sequence_length` (512) text rows per block where
# the runs' prompts have under 32 tokens (0.41 GiB per kept block: 51.0 -> 65.4 GiB with 35 of 60 kept).
KEPT_BLOCK_FRACTION_JOINT_TEXT = 0.8
# The plan fills the memory left over counting each kept block at its whole working set: what a block does not use
# (a twentieth for Wan2.2, a fifth for Qwen-Image) stays free beyond the margin (compiled runs reserved up to 10 GiB
# beyond their allocated peak: I2V-A14B phase 0 69.5 allocated / 79.1 GiB on the device under a 79 GiB cap, 3 blocks
# kept).
KEPT_BLOCK_FILL = 1.0
FIXED_BYTES = 1 * GIB  # cuBLAS workspaces, the latents, the loss's fp32 tensors
# Kept free beyond the estimate: allocator fragmentation under memory pressure (T2V-A14B under a 79 GiB cap: 1.8 GiB
# reserved beyond the 74.9 GiB allocated where it fitted, 2.9 GiB where it ran out) and the estimate's error on the
# calibration runs (at most 1.1 GiB below a measured peak).
# Under `--base_fp8`, `--offload_activations` left 30% of the block inputs' bytes on the device: T2V-A14B phase 0
# with `--offload_idle_transformers` (H100): 42.2 GiB allocated without it, 33.5 GiB with it, where moving every block
# input (12.5 GiB) would give 29.7. Measured once, cause not identified; in bf16 the same flag moved all of them
# (phase 1: 74.2 GiB against 73.9 estimated).
FP8_OFFLOAD_RESIDUE = 0.3
MARGIN_BYTES = 3 * GIB
MARGIN_FRACTION = 0.01


class MemoryPlanError(ValueError):
    """No flag set fits the device; raised before any weights load."""


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of a base pipeline, per teacher transformer where they differ.

    Args:
        transformer_params: Parameters of each teacher transformer (`transformer`, then `transformer_2`).
        fp8_params: Of those, the weights `--base_fp8` stores in one byte (linears outside the model's
            layerwise-casting skips).
        lora_width: Per transformer, the sum of `in + out` features over the LoRA-targeted linears: one rank of
            LoRA costs that many parameters.
        hidden (`int`), ffn (`int`), layers (`int`): Block width, MLP width and number of blocks.
        joint_text (`bool`): The text tokens run through every block beside the image tokens (Qwen-Image).
        per_token_time (`bool`): A time embedding per token (Wan2.2 TI2V-5B's `expand_timesteps`).
        text_dim (`int`): Width of the prompt embeddings (the cached embeddings' size).
        text_encoder_params (`int`), vae_params (`int`): Kept on the device (the text encoder only without
            `--cache_text_embeddings`).
    """

    transformer_params: tuple[int, ...]
    fp8_params: tuple[int, ...]
    lora_width: tuple[int, ...]
    hidden: int
    ffn: int
    layers: int
    joint_text: bool = False
    per_token_time: bool = False
    text_dim: int = 0
    text_encoder_params: int = 0
    vae_params: int = 0


@dataclass(frozen=True)
class Workload:
    """What the flags ask the device to hold and compute (see [`workload_from_args`]).

    Args:
        tokens (`int`): Latent tokens of one sample at the largest training size.
        text_tokens (`int`): Prompt tokens (an upper bound: `--max_sequence_length`).
        batch (`int`): Samples per forward with gradient (`--train_batch_size`).
        lora_rank (`int`), fake_rank (`int`): Ranks of the experts and of the fake-score LoRA.
        fake_full (`bool`): Full-parameter fake score (`--fake_full_finetune`): an fp32 copy of every teacher
            transformer with its gradients and AdamW state.
        expert_base: Per phase, the index of the transformer its expert lives on.
        trained: Phases this run trains.
        uses: Per phase, the indices of the transformers training it calls (`Distiller.transformers_used`).
        alternate (`bool`): `--phase_order alternate` (every trained phase's optimizers live at once).
        fake_real (`bool`): `--real_data` (fake-on-real): one more LoRA fake score per trained phase on every
            teacher transformer, at the fake score's rank, with its own AdamW state.
        weight_bytes (`int`): Bytes of a base weight (2 under bf16 / fp16 mixed precision, else 4).
        cache_text (`bool`): `--cache_text_embeddings`; num_prompts (`int`): prompts whose embeddings it keeps.
        one_cuda_process (`bool`): One process on a CUDA device (where the blocks compile by default).
    """

    tokens: int
    text_tokens: int
    batch: int
    lora_rank: int
    fake_rank: int
    fake_full: bool
    expert_base: tuple[int, ...]
    trained: tuple[int, ...]
    uses: tuple[frozenset, ...]
    alternate: bool = False
    fake_real: bool = False
    weight_bytes: int = 2
    cache_text: bool = True
    num_prompts: int = 1
    one_cuda_process: bool = True


@dataclass(frozen=True)
class Flags:
    """The flags the plan reads and sets; `compile`: `True` (`--compile`), `False` (`--no_compile`) or `None`;
    `uncheckpointed_blocks`: blocks that keep their activations under `--gradient_checkpointing`."""

    gradient_checkpointing: bool = False
    offload_idle_transformers: bool = False
    offload_activations: bool = False
    base_fp8: bool = False
    compile: bool | None = None
    uncheckpointed_blocks: int = 0

    def compiled(self, one_cuda_process: bool) -> bool:
        """Whether the blocks compile (the rule of `distill.compile_wanted`)."""
        if self.compile is not None:
            return self.compile
        return one_cuda_process and not self.base_fp8 and not self.offload_activations

    def names(self) -> list[str]:
        return [f"--{n}" for n in PLAN_FLAGS if getattr(self, n)]


@dataclass
class MemoryPlan:
    """The chosen flags, the estimate behind them and the alternatives that were ranked before them."""

    flags: Flags
    peak_bytes: float
    need_bytes: float
    budget_bytes: float
    added: list[str]
    tried: list[tuple[Flags, float]] = field(default_factory=list)

    def line(self) -> str:
        """The one log line of the plan."""
        added = " ".join(self.added) or "none"
        kept = self.flags.uncheckpointed_blocks
        final = " ".join(self.flags.names()) or "(none)"
        final += f" --uncheckpointed_blocks {kept}" if self.flags.gradient_checkpointing else ""
        return (
            f"Memory plan (--memory auto): flags added: {added}; final: {final}; "
            f"estimated peak {self.peak_bytes / GIB:.1f} GiB + margin = {self.need_bytes / GIB:.1f} GiB of "
            f"{self.budget_bytes / GIB:.1f} GiB available; {len(self.tried)} flag set(s) ranked before it did not fit."
        )


# ----------------------------------------------------------------------------------------------------------------
# Sizes from the config files
# ----------------------------------------------------------------------------------------------------------------


def _matches(name: str, targets) -> bool:
    """peft's rule for a list of target modules: the name is a target or ends with `.target`."""
    return any(name == t or name.endswith("." + t) for t in targets)


def transformer_sizes(config: dict, targets) -> dict:
    """Counts of one diffusers transformer built from `config` on the meta device (its `_class_name` names the
    class): parameters, fp8-storable weights, LoRA width of the `targets`, block width, MLP width, blocks."""
    import diffusers
    import torch

    config = dict(config)
    cls = getattr(diffusers, config.pop("_class_name"))
    with torch.device("meta"):
        model = cls.from_config(config)
    lora = ffn = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _matches(name, targets):
            lora += module.in_features + module.out_features
        if not ffn and name.endswith("net.0.proj") and isinstance(module, torch.nn.Linear):
            ffn = module.out_features
    params = sum(p.numel() for p in model.parameters())
    # what `--base_fp8` stores in one byte: diffusers' own layerwise casting, applied on the meta device
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    fp8 = sum(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn)
    return {
        "params": params,
        "fp8": fp8,
        "lora_width": lora,
        "hidden": model.config.num_attention_heads * model.config.attention_head_dim,
        "ffn": ffn,
        "layers": model.config.num_layers,
    }


def _meta_params(config: dict | None, library: str) -> int:
    """Parameters of a model built on the meta device from `config` (0 where that cannot be done)."""
    if not config:
        return 0
    import torch

    try:
        if library == "diffusers":
            import diffusers

            config = dict(config)
            cls = getattr(diffusers, config.pop("_class_name"))
            with torch.device("meta"):
                model = cls.from_config(config)
        else:
            import transformers

            cls = getattr(transformers, config["architectures"][0])
            with torch.device("meta"):
                model = cls(transformers.AutoConfig.for_model(**config))
    except Exception as err:  # an unknown layout: the plan then leaves the component out, and says so
        logger.warning("Memory plan: could not size a %s component (%s); counted as 0.", library, err)
        return 0
    return sum(p.numel() for p in model.parameters())


def model_sizes(configs: dict, targets, joint_text: bool = False, per_token_time: bool = False) -> ModelSizes:
    """[`ModelSizes`] from the config dicts of a base (`transformer`, `transformer_2`, `text_encoder`, `vae`; the
    last three may be `None`) and the LoRA target modules."""
    per = [transformer_sizes(configs[n], targets) for n in ("transformer", "transformer_2") if configs.get(n)]
    text_dim = configs["transformer"].get("joint_attention_dim") or configs["transformer"].get("text_dim") or 0
    return ModelSizes(
        transformer_params=tuple(s["params"] for s in per),
        fp8_params=tuple(s["fp8"] for s in per),
        lora_width=tuple(s["lora_width"] for s in per),
        hidden=per[0]["hidden"],
        ffn=per[0]["ffn"],
        layers=per[0]["layers"],
        joint_text=joint_text,
        per_token_time=per_token_time,
        text_dim=int(text_dim),
        text_encoder_params=_meta_params(configs.get("text_encoder"), "transformers"),
        vae_params=_meta_params(configs.get("vae"), "diffusers"),
    )


def family_sizes(configs: dict, family) -> ModelSizes:
    """[`model_sizes`] with the family's LoRA targets and token layout (cached per config: sizing builds the
    models on the meta device, a few seconds for Qwen-Image's)."""
    per_token_time = bool(getattr(family, "expand_timesteps", False))
    return _family_sizes(json.dumps(configs, sort_keys=True), family.name, per_token_time)


@functools.lru_cache(maxsize=8)
def _family_sizes(configs_json: str, name: str, per_token_time: bool) -> ModelSizes:
    from .adapters import lora_targets

    return model_sizes(json.loads(configs_json), lora_targets(name), name == "qwen-image", per_token_time)


def read_base_configs(base: str, revision: str | None = None) -> dict | None:
    """The config dicts of a base pipeline folder or Hub repo (`model_index`, `transformer`, `transformer_2`,
    `text_encoder`, `vae`), or `None` when its `transformer/config.json` cannot be read (no weights are read)."""

    def read(name):
        if os.path.isdir(base):
            path = Path(base) / name
        else:
            try:
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(base, name, revision=revision))
            except Exception:
                return None
        return json.loads(path.read_text()) if path.is_file() else None

    index = read("model_index.json") or {}
    out = {"model_index": index, "transformer": read("transformer/config.json")}
    if not out["transformer"]:
        return None
    has_second = (index.get("transformer_2") or [None])[0] is not None
    out["transformer_2"] = read("transformer_2/config.json") if has_second else None
    out["text_encoder"] = read("text_encoder/config.json")
    out["vae"] = read("vae/config.json")
    return out


# ----------------------------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------------------------


def weight_bytes(sizes: ModelSizes, work: Workload, flags: Flags, on_device) -> float:
    """Base weights of the transformers `on_device` (indices): fp8-storable ones in 1 byte under `--base_fp8`."""
    total = 0.0
    for i in on_device:
        params, fp8 = sizes.transformer_params[i], sizes.fp8_params[i]
        total += fp8 * 1 + (params - fp8) * work.weight_bytes if flags.base_fp8 else params * work.weight_bytes
    return total


def trainable_bytes(sizes: ModelSizes, work: Workload, phase: int, on_device) -> tuple[float, float, float]:
    """`(adapters, optimizer state, gradients)` in bytes while `phase` trains.

    Adapters on the transformers `on_device`: the experts of every phase and the fake scores of the trained ones,
    fp32 while trained (the optimizer's master copy), in the base's dtype otherwise. In sequential order a phase
    before `phase` is over: its expert is back in the base's dtype and its fake score deleted
    (`Distiller.end_phase`), as in a run that trains `phase` alone. AdamW's two fp32 moments exist only for
    parameters that received a gradient: those on the transformers the live phases call. Gradients: the larger of
    the generator's and the fake score's (each is freed after its step).
    """
    live = work.trained if work.alternate else (phase,)
    lora_fakes = (0 if work.fake_full else 1) + (1 if work.fake_real else 0)  # fake-on-real's is LoRA too
    adapters = 0.0
    for i in on_device:
        for j, base in enumerate(work.expert_base):
            if base == i:
                adapters += sizes.lora_width[i] * work.lora_rank * (4 if j in live else work.weight_bytes)
        for j in work.trained:
            if j in live:
                adapters += lora_fakes * sizes.lora_width[i] * work.fake_rank * 4
            elif j > phase:  # made when the Distiller starts, trained later
                adapters += lora_fakes * sizes.lora_width[i] * work.fake_rank * work.weight_bytes
    optimizer = gradients = 0.0
    for k in live:
        expert = sizes.lora_width[work.expert_base[k]] * work.lora_rank
        used = sorted(work.uses[k])
        if work.fake_full:  # an fp32 trainable copy of every teacher transformer
            fake = sum(sizes.transformer_params[i] for i in range(len(sizes.transformer_params)))
            adapters += 4.0 * fake
        else:
            fake = sum(sizes.lora_width[i] for i in used) * work.fake_rank
        fake_real = sum(sizes.lora_width[i] for i in used) * work.fake_rank if work.fake_real else 0
        optimizer += 8.0 * (expert + fake + fake_real)
        gradients = max(gradients, 4.0 * max(expert, fake))
    return adapters, optimizer, gradients


def kept_block_fraction(sizes: ModelSizes) -> float:
    """The fraction of its working set an uncheckpointed block keeps until its backward, as calibrated for the
    family's block ([`KEPT_BLOCK_FRACTION`], [`KEPT_BLOCK_FRACTION_JOINT_TEXT`])."""
    return KEPT_BLOCK_FRACTION_JOINT_TEXT if sizes.joint_text else KEPT_BLOCK_FRACTION


def activation_bytes(sizes: ModelSizes, work: Workload, flags: Flags, kept_fraction: float | None = None) -> float:
    """Activations of one forward with gradient and its backward.

    With gradient checkpointing each block keeps its input (`tokens x hidden` bf16, plus the text stream where the
    text runs through the blocks), in pinned CPU memory under `--offload_activations`; the block being recomputed
    holds its whole working set ([`BLOCK_BYTES_PER_HIDDEN`], [`BLOCK_BYTES_PER_FFN`] per token), and each of the
    `uncheckpointed_blocks` keeps `kept_fraction` of it (default: [`kept_block_fraction`]) instead of its input.
    Without checkpointing every block keeps its working set.
    """
    rows = work.batch * (work.tokens + (work.text_tokens if sizes.joint_text else 0))
    block = rows * (BLOCK_BYTES_PER_HIDDEN * sizes.hidden + BLOCK_BYTES_PER_FFN * sizes.ffn)
    # Wan2.2 TI2V-5B (`expand_timesteps`): the time embedding and its 6 modulation vectors are per token, alive
    # through the whole forward
    time_embedding = 2 * rows * 6 * sizes.hidden * 2 if sizes.per_token_time else 0
    if not flags.gradient_checkpointing:
        saved = sizes.layers * block
        return (saved / 2 if flags.offload_activations else saved) + time_embedding  # ~half: block inputs, outputs
    kept = min(flags.uncheckpointed_blocks, sizes.layers)
    kept_fraction = kept_block_fraction(sizes) if kept_fraction is None else kept_fraction
    inputs = (sizes.layers - kept) * rows * sizes.hidden * 2
    if flags.offload_activations:
        inputs *= FP8_OFFLOAD_RESIDUE if flags.base_fp8 else 0
    # under `--base_fp8` a kept block's matmuls also save the bf16 copies of its weights that layerwise casting made
    copies = kept * 2 * max(sizes.fp8_params) / sizes.layers if flags.base_fp8 else 0
    return inputs + kept * kept_fraction * block + copies + block + time_embedding


def phase_peak(sizes: ModelSizes, work: Workload, flags: Flags, phase: int, kept_fraction=None) -> dict:
    """Peak allocated bytes while `phase` trains, by part (`kept_fraction`: [`activation_bytes`])."""
    n = len(sizes.transformer_params)
    on_device = sorted(work.uses[phase]) if flags.offload_idle_transformers else range(n)
    adapters, optimizer, gradients = trainable_bytes(sizes, work, phase, on_device)
    other = FIXED_BYTES + sizes.vae_params * work.weight_bytes
    if work.cache_text:
        other += work.num_prompts * work.text_tokens * sizes.text_dim * work.weight_bytes
    else:
        other += sizes.text_encoder_params * work.weight_bytes
    parts = {
        "weights": weight_bytes(sizes, work, flags, on_device),
        "adapters": adapters,
        "optimizer": optimizer,
        "gradients": gradients,
        "activations": activation_bytes(sizes, work, flags, kept_fraction),
        "other": other,
    }
    parts["total"] = sum(parts.values())
    return parts


def encode_peak(sizes: ModelSizes, work: Workload, flags: Flags) -> float:
    """Allocated bytes while the prompts are encoded: the text encoder, the VAE and the base transformers (none with
    `--offload_idle_transformers`, which places them when a phase starts) are on the device together."""
    on_device = () if flags.offload_idle_transformers else range(len(sizes.transformer_params))
    encoder = (sizes.text_encoder_params + sizes.vae_params) * work.weight_bytes
    return weight_bytes(sizes, work, flags, on_device) + encoder + FIXED_BYTES


def estimate_peak(sizes: ModelSizes, work: Workload, flags: Flags, kept_fraction=None) -> float:
    """Peak allocated device bytes of the run: the largest of its trained phases' peaks and the encoding's."""
    phases = max(phase_peak(sizes, work, flags, k, kept_fraction)["total"] for k in work.trained)
    return max(phases, encode_peak(sizes, work, flags))


def margin_bytes(peak: float) -> float:
    """Memory kept free beyond an estimated peak ([`MARGIN_BYTES`] plus [`MARGIN_FRACTION`] of the peak)."""
    return MARGIN_BYTES + MARGIN_FRACTION * peak


# ----------------------------------------------------------------------------------------------------------------
# The choice
# ----------------------------------------------------------------------------------------------------------------


def allowed(flags: Flags, work: Workload, mixed_precision: str | None, num_transformers: int) -> bool:
    """Whether the scripts take `flags` (the rules of `distill.check_speed_args`) and each flag does something."""
    if flags.base_fp8 and (mixed_precision != "bf16" or work.fake_full):
        return False
    if flags.base_fp8 and flags.gradient_checkpointing and flags.compile is True:
        return False
    if flags.offload_idle_transformers and (work.alternate or num_transformers < 2):
        return False
    return True


def slowdown(flags: Flags, work: Workload) -> float:
    """Relative time per update of a flag set ([`SLOWDOWN`]); compiled with no flag is 1."""
    factor = 1.0 if flags.compiled(work.one_cuda_process) or not work.one_cuda_process else SLOWDOWN["eager"]
    for name in PLAN_FLAGS:
        if getattr(flags, name):
            factor *= SLOWDOWN[name]
    return factor


def candidates(given: Flags, work: Workload, mixed_precision: str | None, num_transformers: int) -> list[Flags]:
    """Every flag set that keeps what `given` turns on and adds any of the others, in the order the plan tries
    them: exact before `--base_fp8`, then faster first ([`slowdown`]), then fewer added flags."""
    free = [n for n in PLAN_FLAGS if not getattr(given, n)]
    out = []
    for k in range(len(free) + 1):
        for combo in itertools.combinations(free, k):
            flags = replace(given, **dict.fromkeys(combo, True))
            if flags == given or (allowed(flags, work, mixed_precision, num_transformers) and combo):
                out.append((flags, len(combo)))
    return [
        f for f, _ in sorted(out, key=lambda fk: (fk[0].base_fp8 and not given.base_fp8, slowdown(fk[0], work), fk[1]))
    ]


def choose_flags(
    sizes: ModelSizes, work: Workload, given: Flags, budget_bytes: float, mixed_precision: str | None = "bf16"
) -> MemoryPlan:
    """The first of [`candidates`] whose estimated peak plus [`margin_bytes`] fits `budget_bytes`.

    Raises:
        [`MemoryPlanError`]: None fits; the message names the memory the leanest flag set needs and every flag set
            tried.
    """
    tried = []
    for flags in candidates(given, work, mixed_precision, len(sizes.transformer_params)):
        peak = estimate_peak(sizes, work, flags)
        need = peak + margin_bytes(peak)
        if need <= budget_bytes:
            added = [f"--{n}" for n in PLAN_FLAGS if getattr(flags, n) and not getattr(given, n)]
            return MemoryPlan(flags, peak, need, budget_bytes, added, tried)
        tried.append((flags, need))
    least = min(tried, key=lambda fn: fn[1])
    card = math.ceil(least[1] / GIB)
    listing = "; ".join(f"{' '.join(f.names()) or '(no flag)'}: {n / GIB:.1f} GiB" for f, n in tried)
    per_phase = "training one phase per run (`--train_phase k`), " if len(work.trained) > 1 else ""
    raise MemoryPlanError(
        f"No flag set fits the {budget_bytes / GIB:.1f} GiB available: the leanest "
        f"({' '.join(least[0].names()) or 'no flag'}) needs about {least[1] / GIB:.1f} GiB (estimate + margin), so a "
        f"card with at least {card} GiB free. Tried: {listing}. Other ways down: {per_phase}a smaller "
        "`--resolution`/`--height`/`--width`/`--num_frames`, a lower `--lora_rank`, `--cache_text_embeddings`, "
        "several GPUs (FSDP2, examples/phased_dmd/README.md); `--memory off` runs the flags as given."
    )


def keep_activations(plan: MemoryPlan, sizes: ModelSizes, work: Workload) -> MemoryPlan:
    """`plan` with as many `uncheckpointed_blocks` as its budget holds: under `--gradient_checkpointing` (and
    without `--offload_activations`), the memory the chosen flags leave over keeps the activations of the last
    blocks instead of recomputing them in backward; not under `--base_fp8`, where each would also keep bf16 copies
    of its weights (counted by [`activation_bytes`] where the flag is passed). Each is counted at its whole working
    set while filling ([`KEPT_BLOCK_FILL`]); the plan reports the estimate ([`kept_block_fraction`])."""
    flags = plan.flags
    if not flags.gradient_checkpointing or flags.offload_activations or flags.base_fp8:  # fp8: not measured kept
        return plan

    def fits(n: int) -> bool:
        filled = estimate_peak(sizes, work, replace(flags, uncheckpointed_blocks=n), KEPT_BLOCK_FILL)
        return filled + margin_bytes(filled) <= plan.budget_bytes

    kept = flags.uncheckpointed_blocks
    while kept < sizes.layers and fits(kept + 1):
        kept += 1
    if kept == flags.uncheckpointed_blocks:
        return plan
    more = replace(flags, uncheckpointed_blocks=kept)
    peak = estimate_peak(sizes, work, more)
    return replace(plan, flags=more, peak_bytes=peak, need_bytes=peak + margin_bytes(peak))


# ----------------------------------------------------------------------------------------------------------------
# The flags of the example scripts
# ----------------------------------------------------------------------------------------------------------------


def add_memory_args(parser) -> None:
    """`--memory` and `--memory_budget_gib` of the example scripts, as the parser's "memory plan" group."""
    parser = parser.add_argument_group("memory plan", "docs/training.md, 'The memory plan', gives the arithmetic.")
    parser.add_argument(
        "--memory",
        default="auto",
        choices=MEMORY_MODES,
        help="auto: before the base loads, turn on the fastest of --gradient_checkpointing, "
        "--offload_idle_transformers, --offload_activations (exact) and then --base_fp8 that fits the device, from "
        "the base's config files; flags you pass stay on; stops before loading if nothing fits. off: the flags as "
        "given. One process on a CUDA device only (docs/training.md, 'The memory plan').",
    )
    parser.add_argument(
        "--memory_budget_gib",
        type=float,
        default=None,
        help="Plan for this much device memory instead of what the device has free (e.g. to leave room for "
        "another process).",
    )


def latent_tokens(family, height: int, width: int, num_frames: int | None) -> int:
    """Transformer tokens of one sample: Qwen-Image's packed 2x2 patches, Wan's `F x H x W` latent patches."""
    if num_frames is None:
        step = family.vae_scale_factor * 2
        return (height // step) * (width // step)
    frames = (num_frames - 1) // family.vae_scale_factor_temporal + 1
    pt, ph, pw = family.patch_size
    spatial = family.vae_scale_factor_spatial
    return (frames // pt) * (height // spatial // ph) * (width // spatial // pw)


def phase_transformers(family, boundaries: list[float], num_phases: int) -> tuple[tuple[int, ...], tuple]:
    """`(expert_base, uses)`: per phase, the index of the transformer its expert lives on (the owner of the phase's
    middle) and the indices of those that training it calls (experts `0..k`, and the teacher transformers owning
    some `t` in `(s_k, 1]`), as `Distiller.transformers_used` finds them from the schedule."""
    names = list(family.transformer_names)
    edges = [1.0, *boundaries, 0.0]
    owner = [
        names.index(family.teacher_transformer_for_sigma(0.5 * (edges[k] + edges[k + 1]))) for k in range(num_phases)
    ]
    uses = []
    for k in range(num_phases):
        end = edges[k + 1]
        grid = [end + (1.0 - end) * (i + 1) / 256 for i in range(256)]
        teacher = {names.index(family.teacher_transformer_for_sigma(v)) for v in grid}
        uses.append(frozenset(teacher | set(owner[: k + 1])))
    return tuple(owner), tuple(uses)


def workload_from_args(args, family, plan, buckets, num_prompts: int, mixed_precision, one_cuda_process: bool):
    """The [`Workload`] of parsed flags, the family, the phase plan (`distill.make_plan`) and the training sizes."""
    expert_base, uses = phase_transformers(family, plan.boundaries, plan.num_phases)
    return Workload(
        tokens=max(latent_tokens(family, *size) for size in buckets),
        text_tokens=args.max_sequence_length,
        batch=args.train_batch_size,
        lora_rank=args.lora_rank,
        fake_rank=args.fake_lora_rank or args.lora_rank,
        fake_full=args.fake_full_finetune,
        expert_base=expert_base,
        trained=tuple(plan.phases),
        uses=uses,
        alternate=args.phase_order == "alternate",
        fake_real=getattr(args, "real_data", None) is not None,
        weight_bytes=2 if mixed_precision in ("bf16", "fp16") else 4,
        cache_text=args.cache_text_embeddings,
        num_prompts=num_prompts,
        one_cuda_process=one_cuda_process,
    )


def device_budget(device) -> float:
    """Bytes this process may still allocate on a CUDA `device`: its free memory, or less under a
    `torch.cuda.set_per_process_memory_fraction` cap (the cap minus what this process holds already)."""
    import torch

    device = torch.device(device)
    if device.index is None:  # accelerate's `torch.device("cuda")`; the per-process queries need an index
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    fraction = (
        torch.cuda.get_per_process_memory_fraction(device)
        if hasattr(torch.cuda, "get_per_process_memory_fraction")
        else 1.0
    )
    return min(free, fraction * total - torch.cuda.memory_reserved(device))


def given_flags(args) -> Flags:
    compile_ = True if args.compile else (False if args.no_compile else None)
    kept = getattr(args, "uncheckpointed_blocks", None) or 0
    return Flags(**{n: bool(getattr(args, n)) for n in PLAN_FLAGS}, compile=compile_, uncheckpointed_blocks=kept)


def apply_memory_plan(args, family, plan, buckets, num_prompts: int, accelerator, budget_bytes: float | None = None):
    """Turn on the flags of the memory plan in `args` (`--memory auto`), log it in one line and return it; `None`
    where no plan is made (`--memory off`, several processes, not a CUDA device without `--memory_budget_gib`, the
    base's config files unreadable). Call before the base loads: [`MemoryPlanError`] is raised then.

    `budget_bytes` replaces the device's free memory (tests); `--memory_budget_gib` does the same from the flags.
    """
    if args.memory == "off":
        return None
    if args.memory_budget_gib is not None:
        if not args.memory_budget_gib > 0:
            raise ValueError(f"`--memory_budget_gib` must be > 0, got {args.memory_budget_gib}.")
        budget_bytes = args.memory_budget_gib * GIB
    device = accelerator.device
    why = None
    if accelerator.num_processes > 1:
        why = "several processes (FSDP / DDP): flags as given"
    elif budget_bytes is None and device.type != "cuda":
        why = f"a {device.type} device: flags as given (`--memory_budget_gib` plans for a size)"
    configs = read_base_configs(args.pretrained_model_name_or_path, args.revision) if why is None else None
    if why is None and (configs is None or family is None or plan is None):
        why = "the base's config files could not be read before loading: flags as given"
    if why is not None:
        logger.info("Memory plan (--memory auto): none, %s.", why)
        return None
    sizes = family_sizes(configs, family)
    one_cuda = device.type == "cuda"
    work = workload_from_args(args, family, plan, buckets, num_prompts, accelerator.mixed_precision, one_cuda)
    budget = budget_bytes if budget_bytes is not None else device_budget(device)
    result = choose_flags(sizes, work, given_flags(args), budget, accelerator.mixed_precision)
    if args.uncheckpointed_blocks is None:
        result = keep_activations(result, sizes, work)
    for name in (*PLAN_FLAGS, "uncheckpointed_blocks"):
        setattr(args, name, getattr(result.flags, name))
    logger.info(result.line())
    return result
