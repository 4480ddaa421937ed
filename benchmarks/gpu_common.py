"""Shared helpers of the GPU benchmarks (`benchmarks/gpu_*.py`): published configs, models built directly on the
device in bf16 with random weights, timing, the device's own ceilings, and the doc writer.

Every script runs standalone on a GPU machine (`python benchmarks/gpu_swap.py --out swap.json`) and with `--tiny`
on a CPU (small configs, a check of the logic, not a measurement). Each writes its JSON and its section of
`docs/benchmarks/gpu.md` (between `<!-- name:begin -->` and `<!-- name:end -->`); `--from_json FILE` re-renders the
section from a saved JSON without running anything (for results that came back from a remote machine).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch


REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks" / "gpu.md"

# Published configs (Qwen/Qwen-Image transformer/config.json, Qwen2.5-VL-7B-Instruct, Wan-AI/Wan2.2-T2V-A14B-Diffusers).
QWEN_IMAGE_TRANSFORMER = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
QWEN_IMAGE_TRANSFORMER_TINY = {
    **QWEN_IMAGE_TRANSFORMER,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}
QWEN25_VL_7B_TEXT = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    "tie_word_embeddings": False,
}
QWEN25_VL_7B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "window_size": 112,
}
WAN22_A14B_TRANSFORMER = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
WAN22_A14B_TRANSFORMER_TINY = {
    **WAN22_A14B_TRANSFORMER,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "text_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "rope_max_seq_len": 32,
}
UMT5_XXL_ENCODER = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
}

# LoRA on every attention and MLP linear of the Qwen-Image blocks (not the modulation linears img_mod / txt_mod).
QWEN_LORA_TARGETS = (
    r".*transformer_blocks\.\d+\.("
    r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|img_mlp\.net\.(0\.proj|2)|txt_mlp\.net\.(0\.proj|2))"
)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU logic check, not a measurement)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--doc", default=str(DOC), help="markdown file whose section this script rewrites")
    parser.add_argument("--from_json", default=None, help="only re-render the doc section from this JSON")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    return parser


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def environment() -> dict:
    info = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join(["python", *sys.argv]),
    }
    for name in ("diffusers", "peft", "transformers"):
        with contextlib.suppress(ImportError):
            info[name] = __import__(name).__version__
    if torch.cuda.is_available():
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> dict:
    """Median (and all) wall times in ms of `fn`, synchronising the device around each call.

    Each region is bracketed by CUDA events on the current stream and by a host clock; the reported figure is the
    event time (device timeline), the host time is kept for regions that are bound by Python (a swap of 840 layers).
    """
    for _ in range(warmup):
        fn()
    sync()
    dev, host = [], []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            host.append((time.perf_counter() - t0) * 1e3)
            dev.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)
            dev.append(host[-1])
    return {
        "ms": statistics.median(dev),
        "host_ms": statistics.median(host),
        "all_ms": [round(x, 3) for x in dev],
        "spread_ms": round(max(dev) - min(dev), 3),
    }


def ceilings(tiny: bool = False) -> dict:
    """The card's bf16 matmul rate (8192^3 on random data) and device-to-device copy bandwidth (read + write)."""
    if not torch.cuda.is_available() or tiny:
        return {"matmul_tflops": float("nan"), "copy_gbps": float("nan")}
    n = 8192
    a, b = (
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
    )
    t = time_ms(lambda: a @ b, reps=10, warmup=3)["ms"]
    src = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    tc = time_ms(lambda: dst.copy_(src), reps=10, warmup=3)["ms"]
    out = {"matmul_tflops": 2 * n**3 / t / 1e9, "copy_gbps": 2 * src.numel() * 2 / tc / 1e6}
    a = b = src = dst = None  # free before returning
    free()
    return out


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 2)


def mem() -> dict:
    if not torch.cuda.is_available():
        return {"allocated_gib": 0.0, "peak_gib": 0.0}
    return {"allocated_gib": gib(torch.cuda.memory_allocated()), "peak_gib": gib(torch.cuda.max_memory_allocated())}


@contextlib.contextmanager
def build_context(dtype=torch.bfloat16):
    """Build modules directly on the device in `dtype` (random init there: seconds, not minutes, at 20B)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device()):
            yield
    finally:
        torch.set_default_dtype(previous)


def dtype_for(tiny: bool) -> torch.dtype:
    return torch.bfloat16


def build_qwen_transformer(tiny: bool, seed: int = 0):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    config = QWEN_IMAGE_TRANSFORMER_TINY if tiny else QWEN_IMAGE_TRANSFORMER
    with build_context():
        model = QwenImageTransformer2DModel(**config)
    return model.eval().requires_grad_(False)


def qwen_shapes(tiny: bool, height: int = 1024, width: int = 1024) -> dict:
    """Packed latent shape of Qwen-Image: VAE /8, 2x2 patches -> (H/16 * W/16) tokens of 16*4 channels."""
    if tiny:
        height = width = 128
    config = QWEN_IMAGE_TRANSFORMER_TINY if tiny else QWEN_IMAGE_TRANSFORMER
    h, w = height // 16, width // 16
    return {
        "height": height,
        "width": width,
        "tokens": h * w,
        "channels": config["in_channels"],
        "img_shapes": (1, h, w),
        "text_len": 8 if tiny else 64,
        "text_dim": config["joint_attention_dim"],
    }


def qwen_inputs(tiny: bool, batch: int = 1, text_len: int | None = None, seed: int = 0) -> dict:
    shapes = qwen_shapes(tiny)
    g = torch.Generator(device()).manual_seed(seed)
    text_len = text_len or shapes["text_len"]
    return {
        "x": torch.randn(batch, shapes["tokens"], shapes["channels"], generator=g, device=device()),
        "text": torch.randn(batch, text_len, shapes["text_dim"], generator=g, device=device(), dtype=torch.bfloat16),
        "img_shapes": [[shapes["img_shapes"]]] * batch,
    }


def qwen_velocity(model, text: torch.Tensor, img_shapes) -> Callable:
    """`v = f(x_t, t)` of the Qwen-Image transformer, `t` a `(B,)` tensor of sigmas in [0, 1].

    The prompt embeddings carry no padding, so `encoder_hidden_states_mask=None` as the diffusers pipeline passes
    for an all-ones mask (attention then takes the flash kernel).
    """

    def f(x, t):
        out = model(
            hidden_states=x.to(torch.bfloat16),
            encoder_hidden_states=text,
            encoder_hidden_states_mask=None,
            timestep=t.to(x.device),
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
        return out

    return f


def add_lora(model, names, rank: int = 64, alpha: float = 8.0, targets=QWEN_LORA_TARGETS, delta_ratio: float = 0.02):
    """Add one peft LoRA adapter per name (diffusers' `add_adapter`: adapters in the base's dtype).

    `B` is not zero as peft initialises it but random, rescaled so that `||s B A|| = delta_ratio * ||W||` in every
    layer: swaps and merges then move real numbers, and rounding errors are measured against a realistic delta.
    """
    from peft import LoraConfig

    from diffusers_pdmd.pipelines.lora_delta import lora_linear_layers

    for name in names:
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
        with torch.device(device()):
            model.add_adapter(config, adapter_name=name)
    layers = lora_linear_layers(model, names)
    with torch.no_grad():
        for layer in layers:
            w = layer.get_base_layer().weight
            for name in names:
                b = layer.lora_B[name].weight
                b.normal_()
                d = (b.float() @ layer.lora_A[name].weight.float()) * layer.scaling[name]
                b.mul_(delta_ratio * w.float().norm() / d.norm())
    return layers


def lora_stats(layers, names) -> dict:
    adapted = sum(layer.get_base_layer().weight.numel() for layer in layers)
    adapter = sum(layer.lora_A[n].weight.numel() + layer.lora_B[n].weight.numel() for layer in layers for n in names)
    return {
        "lora_layers": len(layers),
        "adapted_params": adapted,
        "adapted_gib_bf16": gib(2 * adapted),
        "adapter_params_per_expert": adapter // len(names),
    }


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of `fn` as torch's FlopCounterMode counts them (matmuls and attention, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def save_json(path: str | None, data: dict):
    if path:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(path).write_text(json.dumps(data, indent=1, default=str))


def load_json(path: str) -> dict:
    return json.loads(pathlib.Path(path).read_text())


def write_section(doc: str | os.PathLike, name: str, markdown: str):
    """Replace (or append) the section between `<!-- name:begin -->` and `<!-- name:end -->` of `doc`."""
    doc = pathlib.Path(doc)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else "# GPU benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def env_line(env: dict) -> str:
    keys = ("device", "torch", "cuda", "diffusers", "peft", "transformers")
    return ", ".join(f"{k} {env[k]}" for k in keys if env.get(k))


def finish(args, name: str, results: dict, render: Callable[[dict], str]):
    """Save JSON, print the markdown, write the doc section."""
    save_json(args.out, results)
    markdown = render(results)
    print(markdown)
    if args.doc and not results.get("env", {}).get("tiny"):
        write_section(args.doc, name, markdown)


def maybe_from_json(args, name: str, render: Callable[[dict], str]) -> bool:
    if not args.from_json:
        return False
    results = load_json(args.from_json)
    markdown = render(results)
    print(markdown)
    write_section(args.doc, name, markdown)
    return True


# ----------------------------------------------------------------------------------------------- public pipelines

# LoRA on the attention and FFN linears of the Wan2.2 blocks (self- and cross-attention).
WAN_LORA_TARGETS = (
    r".*blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|attn2\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2))"
)


def build_family_pipeline(model: str, tiny: bool, dtype=torch.bfloat16):
    """A family pipeline in memory on `device()`: `QwenImagePipeline` (`model="qwen"`) or Wan2.2 T2V A14B's
    `WanPipeline` (`model="wan"`), random weights at the published configs (tiny: `diffusers_pdmd.tiny`'s).

    The tokenizer and scheduler are the tiny ones of `diffusers_pdmd.tiny` (no download; a full-size text encoder
    reads their token ids as any other).
    """
    from diffusers_pdmd import tiny as tiny_models

    family = "qwen-image" if model == "qwen" else "wan2.2-t2v-a14b"
    components = tiny_models.build_components(family)
    if not tiny:
        with build_context(dtype):
            if model == "qwen":
                from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
                from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

                torch.manual_seed(0)
                components["transformer"] = QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER)
                components["vae"] = AutoencoderKLQwenImage()
                config = Qwen2_5_VLConfig(text_config=QWEN25_VL_7B_TEXT, vision_config=QWEN25_VL_7B_VISION)
                components["text_encoder"] = Qwen2_5_VLForConditionalGeneration(config)
            else:
                from diffusers import AutoencoderKLWan, WanTransformer3DModel
                from transformers import UMT5Config, UMT5EncoderModel

                torch.manual_seed(0)
                components["transformer"] = WanTransformer3DModel(**WAN22_A14B_TRANSFORMER)
                torch.manual_seed(1)
                components["transformer_2"] = WanTransformer3DModel(**WAN22_A14B_TRANSFORMER)
                components["vae"] = AutoencoderKLWan()
                components["text_encoder"] = UMT5EncoderModel(UMT5Config(**UMT5_XXL_ENCODER))
    pipe = tiny_models.pipeline_class(family)(**components)
    for _name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe.to(device(), dtype)


def fabricate_experts(pipe, out_dir, experts, phase_boundaries, steps_per_phase, rank: int = 64, targets=None):
    """Write an experts-only folder with the library's own `save_pretrained`: one random LoRA per phase on the
    family pipeline's transformers (`experts[k] = (slot, adapter_name)`), rescaled as `add_lora` does; the adapters
    are removed from the modules afterwards. Returns the folder."""
    from diffusers_pdmd import PhasedDMDScheduler
    from diffusers_pdmd.pipelines import PhasedMoEPipeline

    targets = targets or (QWEN_LORA_TARGETS if "Qwen" in type(pipe).__name__ else WAN_LORA_TARGETS)
    by_slot: dict[str, list[str]] = {}
    for slot, name in experts:
        by_slot.setdefault(slot, []).append(name)
    for slot, names in by_slot.items():
        add_lora(getattr(pipe, slot), names, rank=rank, targets=targets)
    scheduler = PhasedDMDScheduler.from_config(
        pipe.scheduler.config, phase_boundaries=phase_boundaries, steps_per_phase=steps_per_phase
    )
    extra = {"boundary_ratio": pipe.config.get("boundary_ratio")} if "transformer_2" in pipe.components else {}
    student = PhasedMoEPipeline(
        **{**pipe.components, "scheduler": scheduler}, experts=[list(e) for e in experts], **extra
    )
    student.save_pretrained(out_dir, experts_only=True, base_model="in-memory-base")
    for slot, names in by_slot.items():
        getattr(pipe, slot).delete_adapters(names)
    return pathlib.Path(out_dir)


def time_call(fn: Callable[[], object], reps: int = 3, warmup: int = 1) -> dict:
    """Wall clock (ms) of `fn` as a user sees it: host time from call to return, device synchronised before and
    after; median of `reps` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "all_ms": [round(t, 2) for t in times]}


def compile_counts() -> dict:
    """Snapshot of torch.compile's work so far: frames compiled, graphs made, recompilations (dynamo counters)."""
    from torch._dynamo.utils import counters

    return {
        "frames_compiled": int(counters["frames"]["ok"]),
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "recompiles": int(sum(counters["recompiles"].values())),
    }


def compile_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def set_compiled(module, kind: str, **compile_kwargs):
    """Compile `module` in place: `"none"` (undo any compile), `"regional"` (diffusers' `compile_repeated_blocks`)
    or `"full"` (`module.compile()`, the whole transformer)."""
    for sub in module.modules():
        sub._compiled_call_impl = None
    if kind == "regional":
        module.compile_repeated_blocks(**compile_kwargs)
    elif kind == "full":
        module.compile(**compile_kwargs)
    elif kind != "none":
        raise ValueError(f"compile kind must be none, regional or full, got {kind!r}")


# ----------------------------------------------------------------------------------------------------------------
# Full pipelines for the training benchmark (`gpu_train.py`): published transformer configs, text encoders at full
# width with 2 layers (training caches the prompt embeddings, so depth only costs the one encoding pass)
# ----------------------------------------------------------------------------------------------------------------

WAN22_TI2V_5B_TRANSFORMER = {
    **WAN22_A14B_TRANSFORMER,
    "num_attention_heads": 24,
    "in_channels": 48,
    "out_channels": 48,
    "ffn_dim": 14336,
    "num_layers": 30,
}
WAN22_VAE = {  # Wan2.2-TI2V-5B: 48 latent channels, 16x spatial, 2x2 pixel patchify
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "latents_mean": [0.0] * 48,
    "latents_std": [1.0] * 48,
}
# Sizes the training benchmark runs at: (height, width, frames); Qwen-Image frames None.
TRAIN_SIZES = {
    "qwen": (1024, 1024, None),
    "wan-a14b": (480, 832, 81),
    "wan-i2v-a14b": (480, 832, 81),
    "wan-ti2v-5b": (704, 1280, 121),
}
TRAIN_SIZES_TINY = {
    "qwen": (32, 32, None),
    "wan-a14b": (16, 16, 5),
    "wan-i2v-a14b": (16, 16, 5),
    "wan-ti2v-5b": (32, 32, 5),
}
TRAIN_FAMILIES = {
    "qwen": "qwen-image",
    "wan-a14b": "wan2.2-t2v-a14b",
    "wan-i2v-a14b": "wan2.2-i2v-a14b",
    "wan-ti2v-5b": "wan2.2-ti2v-5b",
}


def build_train_pipeline(model: str, tiny: bool, in_cpu_memory: bool = False):
    """A random-weight pipeline of `model` (`qwen`, `wan-a14b`, `wan-i2v-a14b`, `wan-ti2v-5b`) in bf16.

    Full size: transformers with the published configs, built on the GPU (random init there takes seconds), VAE
    with the published config, text encoder at full width with 2 layers, the tiny offline tokenizer of
    `diffusers_pdmd.tiny`. `in_cpu_memory`: every module moved to the CPU as soon as it is built, as
    `from_pretrained` leaves a pipeline (a GPU never holds two bf16 A14B transformers at once). `tiny`:
    `diffusers_pdmd.tiny.build_pipeline` (CPU, float32).
    """
    from diffusers_pdmd import tiny as tiny_models

    family = TRAIN_FAMILIES[model]
    if tiny:
        return tiny_models.build_pipeline(family)
    import diffusers
    import transformers

    def built(module):
        return module.to("cpu") if in_cpu_memory else module

    if model == "qwen":  # schedulers outside the build context: they keep their tables on the CPU
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**tiny_models.QWEN_IMAGE_SCHEDULER)
    else:
        scheduler = diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0 if model == "wan-a14b" else 5.0
        )
    with build_context():
        if model == "qwen":
            text_config = dict(QWEN25_VL_7B_TEXT, num_hidden_layers=2)
            vision_config = dict(QWEN25_VL_7B_VISION, depth=2, fullatt_block_indexes=[1])
            tok = tiny_models.build_tokenizer("qwen-image")
            text_config.update(
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.pad_token_id,
            )
            encoder = built(
                transformers.Qwen2_5_VLForConditionalGeneration(
                    transformers.Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config)
                ).eval()
            )
            transformer = built(diffusers.QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER))
            return diffusers.QwenImagePipeline(
                scheduler=scheduler,
                vae=built(diffusers.AutoencoderKLQwenImage()),
                text_encoder=encoder,
                tokenizer=tok,
                transformer=transformer.eval(),
            )
        tok = tiny_models.build_tokenizer(family)
        t5 = dict(UMT5_XXL_ENCODER, num_layers=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        encoder = built(transformers.UMT5EncoderModel(transformers.UMT5Config(**t5)).eval())
        ti2v, i2v = model == "wan-ti2v-5b", model == "wan-i2v-a14b"
        config = {"wan-ti2v-5b": WAN22_TI2V_5B_TRANSFORMER, "wan-i2v-a14b": WAN22_I2V_A14B_TRANSFORMER}.get(
            model, WAN22_A14B_TRANSFORMER
        )
        transformer = built(diffusers.WanTransformer3DModel(**config).eval())
        if ti2v:
            transformer_2, extra = None, {"boundary_ratio": None, "expand_timesteps": True}
            vae = built(diffusers.AutoencoderKLWan(**WAN22_VAE))
        else:
            transformer_2 = built(diffusers.WanTransformer3DModel(**config).eval())
            extra = {"boundary_ratio": 0.9 if i2v else 0.875, "expand_timesteps": False}
            vae = built(diffusers.AutoencoderKLWan())
        if i2v:  # no image encoder, as the released Wan2.2 I2V-A14B
            return diffusers.WanImageToVideoPipeline(
                tokenizer=tok,
                text_encoder=encoder,
                vae=vae,
                scheduler=scheduler,
                transformer=transformer,
                transformer_2=transformer_2,
                image_encoder=None,
                image_processor=None,
                **extra,
            )
        return diffusers.WanPipeline(
            tokenizer=tok,
            text_encoder=encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
            transformer_2=transformer_2,
            **extra,
        )


def linear_flops(model, tokens_of: Callable[[str], int]) -> int:
    """Multiply-add FLOPs (2 per MAC) of every `nn.Linear` of `model`, each applied to `tokens_of(name)` rows."""
    total = 0
    for name, module in model.named_modules():
        if ".lora_" in name:  # peft adapters: left out; their base linear counts under the layer's own name
            continue
        name = name.replace(".base_layer", "")
        if isinstance(module, torch.nn.Linear):
            total += 2 * module.in_features * module.out_features * tokens_of(name)
        elif isinstance(module, torch.nn.Conv3d) and module.kernel_size == module.stride:  # Wan's patch embedding
            macs = module.in_channels * module.out_channels * int(torch.Size(module.kernel_size).numel())
            total += 2 * macs * tokens_of(name)
    return total


def transformer_forward_flops(model, batch: int, tokens: int, text_tokens: int, per_token_time: bool = False) -> int:
    """Model FLOPs of one forward (see [`transformer_flops`])."""
    return sum(transformer_flops(model, batch, tokens, text_tokens, per_token_time))


def transformer_flops(model, batch: int, tokens: int, text_tokens: int, per_token_time: bool = False):
    """`(linear, attention)` model FLOPs of one forward of a Qwen-Image or Wan transformer, analytically from its
    modules and token counts.

    Linears: `2 * in * out` per row they see (Qwen-Image: image-stream linears on `tokens`, text-stream linears
    (`add_*`, `to_add_out`, `txt_*`) on `text_tokens`, modulation / time linears on one row; Wan: the blocks on
    `tokens` except the cross-attention keys / values on `text_tokens`, the text embedder on `text_tokens`).
    Attention: `4 * S_q * S_kv * inner_dim` per layer (scores and weighted sum). LoRA adapters are left out (rank 64
    adds under 5%). `tokens` counts patches (Qwen-Image: packed tokens; Wan: `F * H/2 * W/2` latent patches).
    `per_token_time`: Wan2.2 TI2V-5B embeds a timestep per token (`expand_timesteps`), so its time linears see
    `tokens` rows.
    """
    cfg = model.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    layers = cfg.num_layers
    qwen = type(model).__name__.startswith("QwenImage")

    def tokens_of(name: str) -> int:
        leaf = name.rsplit(".", 1)[-1]
        if qwen:
            if any(k in name for k in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "txt_mlp", "txt_in")):
                return text_tokens
            if any(k in name for k in ("img_mod", "txt_mod", "time_text_embed", "norm_out")):
                return 1
            return tokens
        if "attn2" in name and leaf in ("to_k", "to_v", "add_k_proj", "add_v_proj"):
            return text_tokens
        if "text_embedder" in name:
            return text_tokens
        if any(k in name for k in ("time_embedder", "time_proj")):
            return tokens if per_token_time else 1
        return tokens

    linear = linear_flops(model, tokens_of)
    if qwen:
        attention = layers * 4 * (tokens + text_tokens) ** 2 * inner
    else:
        attention = layers * 4 * (tokens * tokens + tokens * text_tokens) * inner
    return batch * linear, batch * attention


WAN22_I2V_A14B_TRANSFORMER = {**WAN22_A14B_TRANSFORMER, "in_channels": 36}  # latents + 4 mask + image latents
PIPELINE_LAYOUTS = {  # family: (pipeline class, transformer configs, VAE config, text encoder, index extras)
    "qwen-image": ("QwenImagePipeline", [QWEN_IMAGE_TRANSFORMER], {}, "qwen", {}),
    "wan2.2-t2v-a14b": ("WanPipeline", [WAN22_A14B_TRANSFORMER] * 2, {}, "umt5", {"boundary_ratio": 0.875}),
    "wan2.2-i2v-a14b": (
        "WanImageToVideoPipeline",
        [WAN22_I2V_A14B_TRANSFORMER] * 2,
        {},
        "umt5",
        {"boundary_ratio": 0.9},
    ),
    "wan2.2-ti2v-5b": ("WanPipeline", [WAN22_TI2V_5B_TRANSFORMER], WAN22_VAE, "umt5", {"expand_timesteps": True}),
}


def write_config_base(family: str, folder) -> pathlib.Path:
    """A base folder of `family` with the published configs and no weights (`model_index.json` and each component's
    `config.json`): what `--memory auto` reads before loading. The benchmarks pass it as the script's
    `--pretrained_model_name_or_path` while their `load_pipeline` hook builds the random-weight pipeline."""
    import diffusers
    import transformers

    folder = pathlib.Path(folder)
    cls_name, transformer_configs, vae_config, encoder, extras = PIPELINE_LAYOUTS[family]
    qwen = family == "qwen-image"
    index = {"_class_name": cls_name, "_diffusers_version": diffusers.__version__, **extras}
    transformer_cls = diffusers.QwenImageTransformer2DModel if qwen else diffusers.WanTransformer3DModel
    vae_cls = diffusers.AutoencoderKLQwenImage if qwen else diffusers.AutoencoderKLWan
    with torch.device("meta"):
        for slot, config in zip(("transformer", "transformer_2"), transformer_configs):
            transformer_cls(**config).save_config(folder / slot)
            index[slot] = ["diffusers", transformer_cls.__name__]
        vae_cls(**vae_config).save_config(folder / "vae")
    if not qwen and len(transformer_configs) == 1:
        index["transformer_2"] = [None, None]
    index["vae"] = ["diffusers", vae_cls.__name__]
    if encoder == "qwen":
        text = transformers.Qwen2_5_VLConfig(text_config=QWEN25_VL_7B_TEXT, vision_config=QWEN25_VL_7B_VISION)
        text.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    else:
        text = transformers.UMT5Config(**UMT5_XXL_ENCODER)
        text.architectures = ["UMT5EncoderModel"]
    text.save_pretrained(folder / "text_encoder")
    index["text_encoder"] = ["transformers", text.architectures[0]]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
