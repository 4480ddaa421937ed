"""Expert-swap overhead of a 4-step / 2-phase Qwen-Image sampling (transformer only), option by option.

Two rank-64 LoRA experts (lora_alpha 8) on every attention and MLP linear of the full-size Qwen-Image transformer
(random bf16 weights), 1024x1024 (4096 image tokens), 64 text tokens, batch 1. One "image" is, in steady state:
activate expert 0, 2 steps, activate expert 1, 2 steps (so two swaps per image). Options:

- `base`: the plain transformer, no adapters (the reference).
- `peft fp32 + set_adapter`: unfused adapters in fp32 (peft autocast / `cast_training_params`), diffusers'
  `set_adapter` at each phase change.
- (a) `peft bf16 + set_adapter`: the same with adapters in bf16.
- (b) `bf16 + attribute flip`: unfused bf16 adapters, swap by setting the active adapter on each LoRA layer
  (`set_active_adapter_`, what `ExpertSwitcher(mode="adapter")` does).
- `peft fuse/unfuse`: diffusers' `unfuse_lora()` + `fuse_lora(adapter_names=[...])` at each phase change.
- (c) `in-place delta`: `DeltaExperts`, one fused `addmm_` per layer, `W += s1 B1 A1 - s0 B0 A0`.
- (d) `resident copies`: `ResidentExperts(keep_base=False)`, a swap re-points `weight.data`.
- (e) amortised: the delta option with a batch of B images per swap pair.

Also measured: the drift of the in-place delta over many swaps (bf16), against the exact merge.

    python benchmarks/gpu_swap.py --out swap.json
"""

from __future__ import annotations

import math

import gpu_common as gc_
import torch

from diffusers_pdmd.pipelines.lora_delta import (
    DeltaExperts,
    ResidentExperts,
    cast_adapters_,
    lora_linear_layers,
    set_active_adapter_,
)


NAME = "gpu_swap"
EXPERTS = ("phase0", "phase1")
SIGMAS = [1.0, 0.95, 0.875, 0.66, 0.0]  # 4 steps, 2 per phase


def sample_image(forward, x, swap=None):
    """One 4-step / 2-phase Euler sampling; `swap(k)` activates expert k (None: nothing to swap)."""
    for i in range(4):
        if swap is not None and i in (0, 2):
            swap(i // 2)
        t = torch.full((x.shape[0],), SIGMAS[i], device=x.device)
        x = x + (SIGMAS[i + 1] - SIGMAS[i]) * forward(x, t).float()
    return x


def drift(layers, reps: int) -> dict:
    """`reps` in-place swaps between the experts on `layers`, error against the exact (fp64) merge."""
    base = [layer.get_base_layer().weight.detach().double().clone() for layer in layers]
    exact = {
        n: [
            b + (layer.lora_B[n].weight.double() @ layer.lora_A[n].weight.double()) * layer.scaling[n]
            for layer, b in zip(layers, base)
        ]
        for n in EXPERTS
    }

    def rel(ws, n):
        num = sum(float((w.double() - e).norm() ** 2) for w, e in zip(ws, exact[n]))
        den = sum(float((e - b).norm() ** 2) for e, b in zip(exact[n], base))
        return math.sqrt(num / den)

    once = {n: rel([e.to(torch.bfloat16) for e in exact[n]], n) for n in EXPERTS}
    swap = DeltaExperts(layers, EXPERTS)
    out = {"layers": len(layers), "swaps": reps, "single_merge_rel_err": once, "rel_err": {}}
    states = []
    for i in range(reps):
        name = EXPERTS[i % 2]
        swap.activate(name)
        if i >= reps - 3:
            states.append([layer.get_base_layer().weight.detach().clone() for layer in layers])
        if i in (0, 1, 9, 99, reps - 2, reps - 1):
            ws = [layer.get_base_layer().weight for layer in layers]
            out["rel_err"][i + 1] = rel(ws, name)
    out["period_2_at_end"] = all(torch.equal(a, b) for a, b in zip(states[0], states[2]))
    swap.restore()
    out["restored_exactly"] = all(
        torch.equal(layer.get_base_layer().weight.double(), b) for layer, b in zip(layers, base)
    )
    set_active_adapter_(layers, None)
    return out


def run(args) -> dict:
    tiny, reps = args.tiny, args.reps
    res = {"env": {**gc_.environment(), "tiny": tiny}, "ceilings": gc_.ceilings(tiny)}
    print("ceilings", res["ceilings"], flush=True)
    model = gc_.build_qwen_transformer(tiny)
    res["params"] = gc_.param_count(model)
    inp = gc_.qwen_inputs(tiny)
    f = gc_.qwen_velocity(model, inp["text"], inp["img_shapes"])
    t = torch.full((1,), 0.9, device=gc_.device())
    fwd = {}
    with torch.no_grad():
        fwd["base"] = gc_.time_ms(lambda: f(inp["x"], t), reps=reps, warmup=2)
        print("forward base", fwd["base"]["ms"], flush=True)
        res["flops_per_forward"] = gc_.count_flops(lambda: f(inp["x"], t))

        layers = gc_.add_lora(model, EXPERTS)
        res["lora"] = gc_.lora_stats(layers, EXPERTS)
        res["memory_after_lora"] = gc_.mem()
        print("lora", res["lora"], flush=True)

        cast_adapters_(layers, torch.float32)
        model.set_adapter("phase0")
        fwd["unfused_fp32"] = gc_.time_ms(lambda: f(inp["x"], t), reps=reps, warmup=1)
        cast_adapters_(layers, torch.bfloat16)
        fwd["unfused_bf16"] = gc_.time_ms(lambda: f(inp["x"], t), reps=reps, warmup=1)
        print("forward unfused", fwd["unfused_fp32"]["ms"], fwd["unfused_bf16"]["ms"], flush=True)
        res["forward"] = fwd

        swaps = {}
        names = iter(EXPERTS * 1000)
        swaps["set_adapter"] = gc_.time_ms(lambda: model.set_adapter(next(names)), reps=reps, warmup=1)
        swaps["attribute_flip"] = gc_.time_ms(
            lambda: set_active_adapter_(layers, next(names)), reps=4 * reps, warmup=2
        )
        model.fuse_lora(adapter_names=["phase0"])
        swaps["peft_fuse_unfuse"] = gc_.time_ms(  # one phase change: unfuse the current expert, fuse the next
            lambda: (model.unfuse_lora(), model.fuse_lora(adapter_names=[next(names)])), reps=reps, warmup=1
        )
        swaps["peft_unfuse"] = gc_.time_ms(model.unfuse_lora, reps=1, warmup=0)
        swaps["peft_fuse"] = gc_.time_ms(lambda: model.fuse_lora(adapter_names=["phase1"]), reps=1, warmup=0)
        model.unfuse_lora()
        model.enable_adapters()

        # --- full samplings, ms per image, steady state (two swaps per image)
        samp = {}
        x0 = inp["x"]

        def timed(fn):
            return gc_.time_ms(fn, reps=max(2, reps - 2), warmup=1)

        model.disable_adapters()
        samp["base"] = timed(lambda: sample_image(f, x0))
        model.enable_adapters()
        cast_adapters_(layers, torch.float32)
        samp["peft_fp32_set_adapter"] = timed(lambda: sample_image(f, x0, lambda k: model.set_adapter(EXPERTS[k])))
        cast_adapters_(layers, torch.bfloat16)
        samp["peft_bf16_set_adapter"] = timed(lambda: sample_image(f, x0, lambda k: model.set_adapter(EXPERTS[k])))
        samp["bf16_attribute_flip"] = timed(
            lambda: sample_image(f, x0, lambda k: set_active_adapter_(layers, EXPERTS[k]))
        )

        def fuse_swap(k):
            if any(layer.merged for layer in layers):
                model.unfuse_lora()
            model.fuse_lora(adapter_names=[EXPERTS[k]])

        samp["peft_fuse_unfuse"] = timed(lambda: sample_image(f, x0, fuse_swap))
        model.unfuse_lora()
        print("samplings so far", {k: v["ms"] for k, v in samp.items()}, flush=True)

        delta = DeltaExperts(layers, EXPERTS)
        samp["inplace_delta"] = timed(lambda: sample_image(f, x0, lambda k: delta.activate(EXPERTS[k])))
        delta.activate("phase0")
        names = iter(EXPERTS[::-1] * 1000)
        swaps["inplace_delta"] = gc_.time_ms(lambda: delta.activate(next(names)), reps=4 * reps, warmup=2)
        swaps["inplace_delta_factor_gib"] = gc_.gib(delta.factor_bytes())
        # (e) amortised: B images share one swap pair
        for batch in (4,) if not tiny else (2,):
            xb = gc_.qwen_inputs(tiny, batch=batch)
            fb = gc_.qwen_velocity(model, xb["text"], xb["img_shapes"])
            samp[f"inplace_delta_batch{batch}"] = timed(
                lambda fb=fb, xb=xb: sample_image(fb, xb["x"], lambda k: delta.activate(EXPERTS[k]))
            )
            delta.activate(None)
            samp[f"base_batch{batch}"] = timed(lambda fb=fb, xb=xb: sample_image(fb, xb["x"]))
            samp[f"inplace_delta_batch{batch}"]["batch"] = samp[f"base_batch{batch}"]["batch"] = batch
            del xb, fb
        delta.restore()
        delta = None
        gc_.free()
        set_active_adapter_(layers, None)

        # drift of the in-place delta over many swaps (the first block's layers, real shapes, the device's GEMM)
        res["drift"] = drift(lora_linear_layers(model.transformer_blocks[:1], EXPERTS), reps=1000 if not tiny else 50)
        print("drift", res["drift"], flush=True)
        set_active_adapter_(layers, None)

        gc_.free()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        resident = ResidentExperts(layers, EXPERTS, keep_base=False)
        res["resident_extra_gib"] = gc_.gib(resident.extra_bytes())
        samp["resident_copies"] = timed(lambda: sample_image(f, x0, lambda k: resident.activate(EXPERTS[k])))
        names = iter(EXPERTS[::-1] * 1000)
        swaps["resident_pointer_flip"] = gc_.time_ms(lambda: resident.activate(next(names)), reps=4 * reps, warmup=2)
        res["memory_resident"] = gc_.mem()
        res["swaps"] = swaps
        res["sampling"] = samp
    return res


ROWS = [
    ("base", "plain transformer, no adapters (reference)", None),
    ("peft_fp32_set_adapter", "unfused fp32 LoRA + diffusers `set_adapter`", "set_adapter"),
    ("peft_bf16_set_adapter", "(a) unfused bf16 LoRA + `set_adapter`", "set_adapter"),
    ("bf16_attribute_flip", "(b) unfused bf16 LoRA + attribute flip", "attribute_flip"),
    ("peft_fuse_unfuse", "peft merged: `unfuse_lora` + `fuse_lora` per phase", "peft_fuse_unfuse"),
    ("inplace_delta", "(c) in-place delta, one fused addmm per layer", "inplace_delta"),
    ("resident_copies", "(d) resident merged copies, pointer flip", "resident_pointer_flip"),
]


def render(res: dict) -> str:
    env, samp, swaps, fwd = res["env"], res["sampling"], res["swaps"], res["forward"]
    base = samp["base"]["ms"]
    lora = res["lora"]
    floor_ms = 2 * lora["adapted_params"] * 2 / (res["ceilings"]["copy_gbps"] * 1e6)
    rows = []
    for key, label, swap_key in ROWS:
        if key not in samp:
            continue
        ms = samp[key]["ms"]
        swap_ms = swaps[swap_key]["ms"] if swap_key else 0.0
        rows.append([label, round(ms, 1), f"{100 * (ms / base - 1):+.1f}%", round(swap_ms, 2)])
    for key in samp:
        if key.startswith("inplace_delta_batch"):
            b = samp[key]["batch"]
            ref = samp[f"base_batch{b}"]["ms"]
            ms = samp[key]["ms"]
            rows.append(
                [
                    f"(e) in-place delta, batch {b} (per image)",
                    round(ms / b, 1),
                    f"{100 * (ms / ref - 1):+.1f}%",
                    round(swaps["inplace_delta"]["ms"] / b, 2),
                ]
            )
    fl = res["flops_per_forward"]
    d = res["drift"]
    lines = [
        "## Expert-swap overhead (Qwen-Image, 1024x1024, 4 steps / 2 phases, transformer only)",
        "",
        f"Device: **{env['device']}** ({gc_.env_line(env)}). Command: `{env['command']}`.",
        f"Model: {res['params'] / 1e9:.2f}B parameters, random bf16 weights; two rank-64 LoRA experts (alpha 8) on "
        f"{lora['lora_layers']} attention/MLP linears ({lora['adapted_params'] / 1e9:.2f}B adapted weights = "
        f"{lora['adapted_gib_bf16']} GiB in bf16; {lora['adapter_params_per_expert'] / 1e6:.0f}M LoRA parameters per "
        "expert). Batch 1, 4096 image + 64 text tokens. Times: CUDA events, median after warm-up; an image is "
        "measured in steady state (two swaps: phase 1 -> 0 at its start, 0 -> 1 in the middle).",
        f"Ceilings measured in the same run: bf16 matmul {res['ceilings']['matmul_tflops']:.0f} TFLOP/s, copy "
        f"{res['ceilings']['copy_gbps']:.0f} GB/s. One forward: {fl / 1e12:.1f} TFLOP (FlopCounterMode) in "
        f"{fwd['base']['ms']:.1f} ms = {fl / fwd['base']['ms'] / 1e9:.0f} TFLOP/s.",
        "",
        gc_.md_table(["option", "ms / image", "overhead vs base", "one swap (ms)"], rows),
        "",
        f"One forward: base {fwd['base']['ms']:.1f} ms, unfused LoRA fp32 {fwd['unfused_fp32']['ms']:.1f} ms "
        f"({100 * (fwd['unfused_fp32']['ms'] / fwd['base']['ms'] - 1):+.0f}%), unfused LoRA bf16 "
        f"{fwd['unfused_bf16']['ms']:.1f} ms ({100 * (fwd['unfused_bf16']['ms'] / fwd['base']['ms'] - 1):+.0f}%).",
        f"Swaps alone: diffusers `set_adapter` {swaps['set_adapter']['ms']:.1f} ms, attribute flip "
        f"{swaps['attribute_flip']['host_ms']:.2f} ms (host), peft `fuse_lora` {swaps['peft_fuse']['ms']:.1f} ms + "
        f"`unfuse_lora` {swaps['peft_unfuse']['ms']:.1f} ms, in-place delta {swaps['inplace_delta']['ms']:.1f} ms "
        f"(memory-bandwidth floor, reading and writing the adapted weights once at the measured copy rate: "
        f"{floor_ms:.1f} ms; cached factors {swaps['inplace_delta_factor_gib']} GiB), resident pointer flip "
        f"{swaps['resident_pointer_flip']['host_ms']:.2f} ms (host) for +{res['resident_extra_gib']} GiB "
        f"(peak {res['memory_resident']['peak_gib']} GiB with the second expert resident).",
        f"In-place delta drift (bf16, the {d['layers']} adapted layers of the first block, {d['swaps']} swaps back and forth): "
        "error of the merged weights against the exact fp64 merge, relative to the size of the delta: "
        + ", ".join(f"after {k}: {v:.4f}" for k, v in d["rel_err"].items())
        + f"; one bf16 merge: {max(d['single_merge_rel_err'].values()):.4f}. Period 2 reached (states bitwise "
        f"repeat): {d['period_2_at_end']}; base restored bitwise after all swaps: {d['restored_exactly']}.",
    ]
    return "\n".join(lines)


def main():
    args = gc_.base_parser(__doc__.splitlines()[0]).parse_args()
    if gc_.maybe_from_json(args, NAME, render):
        return
    res = run(args)
    gc_.finish(args, NAME, res, render)


if __name__ == "__main__":
    main()
