"""Memory and speed of one Phased DMD iteration on the full-size Qwen-Image transformer, one GPU.

Setup (the paper's recipe with LoRA on one frozen base): Qwen-Image transformer in bf16, frozen, gradient
checkpointing, 1024x1024 (4096 image tokens), batch 1, cached text embeddings (random, 64 tokens; negative 8).
Three rank-64 LoRA adapters on the one base: `expert0` (phase 0, frozen, bf16), `expert1` (the generator expert
being trained, phase 1 of 2, fp32 master weights, AdamW) and `fake` (the fake score F_1, fp32, AdamW); the teacher is
the base with adapters disabled. Forwards run under bf16 autocast. Adapters are switched by `set_active_adapter_`.

One iteration = one generator update + 5 fake-score updates:

- generator: `backsimulate` (expert0 2 steps without grad, expert1 2 steps with grad through the last), `dmd_loss`
  with the teacher under true CFG (2 forwards, guidance 4) and the fake score (1 forward), backward, AdamW step;
- fake (x5): a no-grad generator sample (4 forwards), `fake_score_loss` (subinterval target, 1 forward with grad),
  backward, AdamW step.

Note for training code: with gradient checkpointing the blocks are recomputed during `backward()` with whatever
adapter is active *then*; the generator expert must be re-activated before `loss.backward()`, after `dmd_loss` has
switched to the teacher and the fake score. Without it the gradients are silently wrong (the recomputed activations
come from the fake score's adapter; checked on the tiny model: no error, different gradients).

`--fake_full_finetune` asks for the paper's full-parameter fake score (a second trainable 20B transformer with
AdamW); the script computes its memory and runs it only where it fits.

    python benchmarks/gpu_train_memory.py --out train.json
"""

from __future__ import annotations

import contextlib
import json

import gpu_common as gc_
import torch

from diffusers_pdmd.pipelines.lora_delta import cast_adapters_, set_active_adapter_
from diffusers_pdmd.training.losses import dmd_loss, fake_score_loss, sample_t
from diffusers_pdmd.training.simulate import backsimulate, phase_sigmas


NAME = "gpu_train_memory"
ADAPTERS = ("expert0", "expert1", "fake")
GUIDANCE = 4.0
FAKE_UPDATES = 5


def autocast():
    if torch.cuda.is_available():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_finetune_bytes(params: int, master_fp32: bool) -> dict:
    """Memory of a full-parameter trainable copy: bf16 weights + bf16 grads + fp32 AdamW m and v (+ fp32 master)."""
    per = 2 + 2 + 8 + (4 if master_fp32 else 0)
    return {"bytes_per_param": per, "gib": gc_.gib(per * params)}


def run(args) -> dict:
    tiny, reps = args.tiny, args.reps
    dev = gc_.device()
    res = {"env": {**gc_.environment(), "tiny": tiny}, "ceilings": gc_.ceilings(tiny)}
    print("ceilings", res["ceilings"], flush=True)
    model = gc_.build_qwen_transformer(tiny)
    params = gc_.param_count(model)
    res["params"] = params
    res["memory_base"] = gc_.mem()
    layers = gc_.add_lora(model, ADAPTERS)
    res["lora"] = gc_.lora_stats(layers, ADAPTERS)
    model.requires_grad_(False)
    cast_adapters_(layers, torch.float32, ["expert1", "fake"])
    trainable = {}
    for name in ("expert1", "fake"):
        ps = [p for layer in layers for mod in (layer.lora_A[name], layer.lora_B[name]) for p in mod.parameters()]
        for p in ps:
            p.requires_grad_(True)
        trainable[name] = ps
    model.enable_gradient_checkpointing()
    fused = {"fused": True} if torch.cuda.is_available() else {}
    opt_g = torch.optim.AdamW(trainable["expert1"], lr=5e-5, **fused)
    opt_f = torch.optim.AdamW(trainable["fake"], lr=1e-5, **fused)

    inp = gc_.qwen_inputs(tiny)
    neg = gc_.qwen_inputs(tiny, text_len=4 if tiny else 8, seed=1)["text"]
    f_pos = gc_.qwen_velocity(model, inp["text"], inp["img_shapes"])
    f_neg = gc_.qwen_velocity(model, neg, inp["img_shapes"])
    sigmas = phase_sigmas([0.875], [2, 2], shift=3.0)
    phase = 1

    def expert(name):
        def f(x, t):
            set_active_adapter_(layers, name)
            return f_pos(x, t)

        return f

    def real(x, t):  # teacher = base, true CFG
        set_active_adapter_(layers, None)
        c, u = f_pos(x, t).float(), f_neg(x, t).float()
        return u + GUIDANCE * (c - u)

    experts = [expert("expert0"), expert("expert1")]
    fake = expert("fake")
    counts = {"generator": {"no_grad": 0, "grad": 0}, "fake": {"no_grad": 0, "grad": 0}}

    def generator_update():
        noise = torch.randn(1, *inp["x"].shape[1:], device=dev)
        with autocast():
            x_s, s = backsimulate(noise, sigmas, experts, phase, grad=True)
            t = sample_t(s, 1, device=dev)
            loss, logs = dmd_loss(x_s, s, real, fake, t, torch.randn_like(x_s))
        set_active_adapter_(layers, "expert1")  # checkpointed blocks recompute with the active adapter
        loss.backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        return logs

    def fake_update():
        noise = torch.randn(1, *inp["x"].shape[1:], device=dev)
        with torch.no_grad(), autocast():
            x_s, s = backsimulate(noise, sigmas, experts, phase, grad=False)
        t = sample_t(s, 1, device=dev)
        with autocast():
            loss, logs = fake_score_loss(fake, x_s, s, t, torch.randn_like(x_s))
        loss.backward()  # the fake adapter is the active one
        opt_f.step()
        opt_f.zero_grad(set_to_none=True)
        return logs

    # forwards per update: generator 2 + 1 (no grad) + 1 (grad) + 2 (teacher CFG) + 1 (fake) ; fake 4 + 1 (grad)
    counts["generator"] = {"no_grad": 6, "grad": 1}
    counts["fake"] = {"no_grad": 4, "grad": 1}
    res["forwards_per_iteration"] = {
        "no_grad": counts["generator"]["no_grad"] + FAKE_UPDATES * counts["fake"]["no_grad"],
        "grad": counts["generator"]["grad"] + FAKE_UPDATES * counts["fake"]["grad"],
    }

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    res["generator_update"] = gc_.time_ms(generator_update, reps=max(1, reps - 3), warmup=1)
    print("generator update", res["generator_update"]["ms"], gc_.mem(), flush=True)
    res["fake_update"] = gc_.time_ms(fake_update, reps=max(2, reps - 2), warmup=1)
    print("fake update", res["fake_update"]["ms"], gc_.mem(), flush=True)
    res["iteration_ms"] = res["generator_update"]["ms"] + FAKE_UPDATES * res["fake_update"]["ms"]
    res["memory_training"] = gc_.mem()
    opt_bytes = sum(
        t.numel() * t.element_size() for o in (opt_g, opt_f) for st in o.state.values() for t in st.values()
    )
    res["optimizer_state_gib"] = gc_.gib(opt_bytes)

    # FLOPs (FlopCounterMode; includes the checkpoint recompute, which runs inside backward). The counting pass
    # holds more memory than training itself: on an 80 GB H100 it ran out of memory after the timed iterations had
    # run, so the timings and peak above are kept and the FLOP figures are left out there.
    print("training", json.dumps({k: res[k] for k in ("iteration_ms", "memory_training")}), flush=True)
    try:
        with torch.no_grad(), autocast():
            set_active_adapter_(layers, "expert1")
            x = inp["x"]
            t = torch.full((1,), 0.9, device=dev)
            res["flops_forward"] = gc_.count_flops(lambda: f_pos(x, t))
        res["flops_generator_update"] = gc_.count_flops(generator_update)
        res["flops_fake_update"] = gc_.count_flops(fake_update)
        hw = res["flops_generator_update"] + FAKE_UPDATES * res["flops_fake_update"]
        recompute = res["forwards_per_iteration"]["grad"] * res["flops_forward"]
        res["flops_iteration_hardware"] = hw
        res["flops_iteration_model"] = hw - recompute
        secs = res["iteration_ms"] / 1e3
        peak = res["ceilings"]["matmul_tflops"] * 1e12
        res["hfu"] = hw / secs / peak
        res["mfu"] = (hw - recompute) / secs / peak

    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        res["flops_note"] = "FLOP counting ran out of memory on this card; see the H200 run for MFU"

    # --fake_full_finetune: arithmetic, and a run only where it fits
    full = {
        "params": params,
        "bf16_grads_fp32_adam": full_finetune_bytes(params, master_fp32=False),
        "plus_fp32_master": full_finetune_bytes(params, master_fp32=True),
        "base_and_adapters_gib": res["memory_training"]["allocated_gib"],
    }
    need = full["bf16_grads_fp32_adam"]["gib"] + res["memory_training"]["peak_gib"]
    full["total_gib_one_gpu"] = round(need, 1)
    total = res["env"].get("gpu_memory_gib", 0.0)
    full["fits_this_gpu"] = bool(total and need < total)
    full["fsdp_gib_per_gpu"] = {
        n: round((full["bf16_grads_fp32_adam"]["gib"] + gc_.gib(2 * params)) / n + 8, 1) for n in (2, 4, 8)
    }
    res["fake_full_finetune"] = full
    if args.fake_full_finetune and not full["fits_this_gpu"]:
        full["run"] = f"skipped: needs ~{need:.0f} GiB, this GPU has {total} GiB"
    elif args.fake_full_finetune:  # pragma: no cover - only on a card larger than any one lent here
        full["run"] = "not implemented on one GPU beyond the arithmetic"
    opt_g = opt_f = model = None
    gc_.free()
    return res


def render(res: dict) -> str:
    env = res["env"]
    lora = res["lora"]
    full = res["fake_full_finetune"]
    fpi = res["forwards_per_iteration"]
    rows = [
        ["peak memory (max_memory_allocated)", f"{res['memory_training']['peak_gib']} GiB"],
        ["of which: frozen base bf16", f"{res['memory_base']['allocated_gib']} GiB"],
        ["AdamW states (expert1 + fake LoRA, fp32)", f"{res['optimizer_state_gib']} GiB"],
        ["generator update", f"{res['generator_update']['ms'] / 1e3:.2f} s"],
        ["fake-score update (each of 5)", f"{res['fake_update']['ms'] / 1e3:.2f} s"],
        ["one iteration (1 generator + 5 fake updates)", f"{res['iteration_ms'] / 1e3:.2f} s"],
        ["forwards per iteration", f"{fpi['no_grad']} without grad + {fpi['grad']} with grad (and backward)"],
        ["FLOPs per iteration (counted, with recompute)", f"{res['flops_iteration_hardware'] / 1e15:.2f} PFLOP"],
        ["MFU (without recompute) / HFU (with)", f"{100 * res['mfu']:.1f}% / {100 * res['hfu']:.1f}%"],
    ]
    fits80 = res["memory_training"]["peak_gib"] < 78
    return "\n".join(
        [
            "## Training: one Phased DMD iteration, Qwen-Image 1024x1024, one GPU",
            "",
            f"Device: **{env['device']}** ({gc_.env_line(env)}). Command: `{env['command']}`.",
            f"{res['params'] / 1e9:.2f}B frozen bf16 base, gradient checkpointing, bf16 autocast, batch 1, cached text "
            f"embeddings; three rank-64 LoRA adapters ({lora['adapter_params_per_expert'] / 1e6:.0f}M parameters "
            "each) on the one base: frozen phase-0 expert, trained phase-1 generator expert, trained fake score; "
            "teacher = adapters disabled, true CFG (guidance 4). Training phase 1 of 2 (the most expensive "
            "back-simulation). Library functions: `backsimulate`, `phase_sigmas`, `dmd_loss`, `fake_score_loss`, "
            "`sample_t`.",
            "",
            gc_.md_table(["quantity", "value"], rows),
            "",
            f"Fits one 80 GB H100: **{'yes' if fits80 else 'no'}** (peak {res['memory_training']['peak_gib']} GiB "
            "allocated by PyTorch, which does not depend on the card; an H100 shows about 78 GiB usable). MFU is against the bf16 matmul rate measured in the same run "
            f"({res['ceilings']['matmul_tflops']:.0f} TFLOP/s); one forward is "
            f"{res['flops_forward'] / 1e12:.1f} TFLOP. Backward through a frozen base computes activation gradients "
            "only (about 1x a forward, not 2x), plus the LoRA weight gradients; checkpointing adds one recomputed "
            "forward per backward. "
            f"{FAKE_UPDATES * 4} of the {fpi['no_grad'] + fpi['grad']} forwards are the no-grad generator samples "
            "of the fake-score updates (the place to save: share one back-simulated sample among several fake "
            "updates, or merge the frozen phase-0 expert for back-simulation).",
            "",
            "`--fake_full_finetune` (the paper's full-parameter fake score): a second trainable "
            f"{full['params'] / 1e9:.1f}B transformer with bf16 weights and gradients and fp32 AdamW moments needs "
            f"{full['bf16_grads_fp32_adam']['bytes_per_param']} B/parameter = {full['bf16_grads_fp32_adam']['gib']} GiB "
            f"({full['plus_fp32_master']['gib']} GiB with fp32 master weights), on top of the "
            f"{res['memory_training']['peak_gib']} GiB above: about {full['total_gib_one_gpu']} GiB. It fits no single "
            "GPU lent here (H100 80 GB, H200 141 GB). With FSDP sharding the trainable copy, its gradients, its "
            "optimizer states and the frozen base, per GPU (+8 GiB activations): "
            + ", ".join(f"{n} GPUs {v} GiB" for n, v in full["fsdp_gib_per_gpu"].items())
            + " - so 4 x H200 (or 8 x H100) at least; 2 x H200 does not fit with fp32 moments."
            + (f" Run: {full['run']}." if full.get("run") else ""),
        ]
    )


def main():
    parser = gc_.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--fake_full_finetune", action="store_true", help="also try the full-parameter fake score")
    args = parser.parse_args()
    if gc_.maybe_from_json(args, NAME, render):
        return
    res = run(args)
    gc_.finish(args, NAME, res, render)


if __name__ == "__main__":
    main()
