"""Teacher vs 4-step / 2-phase student sampling time, transformer only and end to end, at full size.

Qwen-Image (1024x1024): teacher 50 steps with true CFG (cond + uncond forward per step, as `QwenImagePipeline`)
against 4 steps / 2 phases with two LoRA experts on the one transformer, swapped by the fastest option of
`gpu_swap.py` (resident merged copies) and, for comparison, by the in-place delta. End to end adds the text encoder
(Qwen2.5-VL-7B at full size, text-only forward of the templated prompt; the teacher also encodes the negative
prompt) and the VAE decode (`AutoencoderKLQwenImage`, published config).

Wan2.2 T2V A14B (480x832, 81 frames = latent 21x60x104 = 32760 tokens): two 14B transformers. The student's two
phase experts live on the two transformers (high-noise and low-noise, boundary at the teacher's own switch), merged,
so a phase change is a change of module and costs nothing. Teacher 40 steps with CFG (80 forwards) is
extrapolated from the measured per-forward time (say so in the doc); the student's 4-step loop is run. End to end adds
UMT5-XXL (512 tokens) and the Wan VAE decode (bf16).

    python benchmarks/gpu_sampling.py --model qwen --out sampling_qwen.json
    python benchmarks/gpu_sampling.py --model wan --out sampling_wan.json      # needs ~70 GB: nvidia-h200
"""

from __future__ import annotations

import gpu_common as gc_
import torch

from diffusers_pdmd.pipelines.lora_delta import DeltaExperts, ResidentExperts


NAME = "gpu_sampling"
EXPERTS = ("phase0", "phase1")
STUDENT_SIGMAS = [1.0, 0.95, 0.875, 0.66, 0.0]


def teacher_sigmas(steps: int) -> list[float]:
    return torch.linspace(1.0, 0.0, steps + 1).tolist()


# ----------------------------------------------------------------------------------------------- Qwen-Image


def qwen_text_encoder(tiny: bool):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text, vision = dict(gc_.QWEN25_VL_7B_TEXT), dict(gc_.QWEN25_VL_7B_VISION)
    if tiny:
        text.update(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        text.update(num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
        vision.update(depth=2, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64)
        vision.update(fullatt_block_indexes=[1])
    with gc_.build_context():
        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()


def encode_time(encoder, length: int, reps: int, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (1, length), device=gc_.device())
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            out = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-1] if hasattr(out, "hidden_states") and out.hidden_states else out[0]

    return gc_.time_ms(run, reps=reps, warmup=2)


def qwen_vae_decode(tiny: bool, reps: int) -> dict:
    from diffusers import AutoencoderKLQwenImage

    kwargs = {"base_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1} if tiny else {}
    with gc_.build_context():
        vae = AutoencoderKLQwenImage(**kwargs).eval()
    side = 16 if tiny else 128
    z = torch.randn(1, 16, 1, side, side, device=gc_.device(), dtype=torch.bfloat16)
    with torch.no_grad():
        out = gc_.time_ms(lambda: vae.decode(z, return_dict=False)[0], reps=reps, warmup=1)
    out["output_shape"] = list(vae.decode(z, return_dict=False)[0].shape) if tiny else [1, 3, 1, 1024, 1024]
    vae = None
    gc_.free()
    return out


def qwen(args) -> dict:
    tiny, reps = args.tiny, args.reps
    res = {}
    # text encoder (first, then freed: it does not share the card with the transformer's resident copies)
    try:
        enc = qwen_text_encoder(tiny)
        vocab = enc.config.text_config.vocab_size
        res["text_encoder_params"] = gc_.param_count(enc)
        # QwenImagePipeline: 34 template tokens + prompt (64 here) + 5 closing tokens; negative prompt " "
        res["text_encode_prompt"] = encode_time(enc, 34 + 64 + 5, reps, vocab)
        res["text_encode_negative"] = encode_time(enc, 34 + 1 + 5, reps, vocab)
        print("text encoder", res["text_encode_prompt"]["ms"], res["text_encode_negative"]["ms"], flush=True)
    except Exception as e:  # keep the transformer figures if the text encoder fails on this transformers version
        res["text_encoder_error"] = repr(e)
        print("text encoder failed", repr(e), flush=True)
    enc = None
    gc_.free()
    try:
        res["vae_decode"] = qwen_vae_decode(tiny, reps=max(2, reps - 2))
        print("vae decode", res["vae_decode"]["ms"], flush=True)
    except Exception as e:
        res["vae_error"] = repr(e)
        print("vae failed", repr(e), flush=True)
    gc_.free()

    model = gc_.build_qwen_transformer(tiny)
    res["transformer_params"] = gc_.param_count(model)
    cond = gc_.qwen_inputs(tiny)
    uncond_text = gc_.qwen_inputs(tiny, text_len=8 if not tiny else 4, seed=1)["text"]
    f_cond = gc_.qwen_velocity(model, cond["text"], cond["img_shapes"])
    f_uncond = gc_.qwen_velocity(model, uncond_text, cond["img_shapes"])
    x0 = cond["x"]
    t = torch.full((1,), 0.9, device=gc_.device())
    steps = 50 if not tiny else 3

    def teacher(x, guidance=4.0):
        sig = teacher_sigmas(steps)
        for i in range(steps):
            ti = torch.full((1,), sig[i], device=x.device)
            c, u = f_cond(x, ti).float(), f_uncond(x, ti).float()
            comb = u + guidance * (c - u)  # true CFG with the pipeline's norm rescale
            v = comb * (c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
            x = x + (sig[i + 1] - sig[i]) * v
        return x

    def student(swap):
        x = x0
        for i in range(4):
            if i in (0, 2):
                swap(EXPERTS[i // 2])
            ti = torch.full((1,), STUDENT_SIGMAS[i], device=x.device)
            x = x + (STUDENT_SIGMAS[i + 1] - STUDENT_SIGMAS[i]) * f_cond(x, ti).float()
        return x

    with torch.no_grad():
        res["forward_cond"] = gc_.time_ms(lambda: f_cond(x0, t), reps=reps, warmup=2)
        res["forward_uncond"] = gc_.time_ms(lambda: f_uncond(x0, t), reps=reps, warmup=1)
        res["teacher_steps"] = steps
        res["teacher"] = gc_.time_ms(lambda: teacher(x0), reps=1, warmup=0)
        print("teacher", res["teacher"]["ms"], flush=True)
        res["student_base_no_swap"] = gc_.time_ms(lambda: student(lambda name: None), reps=reps, warmup=1)

        layers = gc_.add_lora(model, EXPERTS)
        delta = DeltaExperts(layers, EXPERTS)
        res["student_inplace_delta"] = gc_.time_ms(lambda: student(delta.activate), reps=reps, warmup=1)
        delta.restore()
        delta = None
        gc_.free()
        resident = ResidentExperts(layers, EXPERTS, keep_base=False)
        res["student_resident"] = gc_.time_ms(lambda: student(resident.activate), reps=reps, warmup=1)
        res["memory_resident"] = gc_.mem()
        print("student", res["student_inplace_delta"]["ms"], res["student_resident"]["ms"], flush=True)
    model = resident = layers = None
    gc_.free()
    return res


# ----------------------------------------------------------------------------------------------- Wan2.2 A14B


def wan(args) -> dict:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tiny, reps = args.tiny, args.reps
    res = {}
    t5_config = dict(gc_.UMT5_XXL_ENCODER)
    if tiny:
        t5_config.update(vocab_size=1000, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_heads=4)
    with gc_.build_context():
        t5 = UMT5EncoderModel(UMT5Config(**t5_config)).eval()
    res["text_encoder_params"] = gc_.param_count(t5)
    res["text_encode"] = encode_time(t5, 512 if not tiny else 16, reps, t5_config["vocab_size"])
    del t5
    gc_.free()
    print("umt5", res["text_encode"]["ms"], flush=True)

    frames, h, w = (21, 60, 104) if not tiny else (3, 8, 8)
    vae_kwargs = {"base_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1} if tiny else {}
    with gc_.build_context():
        vae = AutoencoderKLWan(**vae_kwargs).eval()
    with torch.no_grad():
        z_small = torch.randn(1, 16, 2, h, w, device=gc_.device(), dtype=torch.bfloat16)
        vae.decode(z_small, return_dict=False)
        z = torch.randn(1, 16, frames, h, w, device=gc_.device(), dtype=torch.bfloat16)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        res["vae_decode"] = gc_.time_ms(lambda: vae.decode(z, return_dict=False)[0], reps=1, warmup=0)
        res["vae_decode"]["peak_gib"] = gc_.mem()["peak_gib"]
    vae = z = z_small = None
    gc_.free()
    print("wan vae", res["vae_decode"]["ms"], flush=True)

    config = gc_.WAN22_A14B_TRANSFORMER_TINY if tiny else gc_.WAN22_A14B_TRANSFORMER
    with gc_.build_context():
        torch.manual_seed(0)
        high = WanTransformer3DModel(**config).eval().requires_grad_(False)
        torch.manual_seed(1)
        low = WanTransformer3DModel(**config).eval().requires_grad_(False)
    res["transformer_params"] = gc_.param_count(high)
    res["tokens"] = frames * (h // 2) * (w // 2)
    g = torch.Generator(gc_.device()).manual_seed(0)
    x0 = torch.randn(1, 16, frames, h, w, generator=g, device=gc_.device())
    text = torch.randn(1, 512 if not tiny else 16, config["text_dim"], generator=g, device=gc_.device())
    text = text.to(torch.bfloat16)

    def f(model, x, sigma):
        t = torch.full((1,), 1000.0 * sigma, device=x.device)
        return model(hidden_states=x.to(torch.bfloat16), timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    def student():
        x = x0
        for i in range(4):
            model = high if i < 2 else low  # the phase experts, merged into the two teacher experts
            x = x + (STUDENT_SIGMAS[i + 1] - STUDENT_SIGMAS[i]) * f(model, x, STUDENT_SIGMAS[i]).float()
        return x

    with torch.no_grad():
        res["forward_high"] = gc_.time_ms(lambda: f(high, x0, 0.95), reps=max(2, reps - 3), warmup=1)
        res["forward_low"] = gc_.time_ms(lambda: f(low, x0, 0.5), reps=max(2, reps - 3), warmup=1)
        print("wan forward", res["forward_high"]["ms"], res["forward_low"]["ms"], flush=True)
        res["flops_per_forward"] = gc_.count_flops(lambda: f(high, x0, 0.5))
        res["student"] = gc_.time_ms(student, reps=1, warmup=0)
        res["memory"] = gc_.mem()
    res["teacher_steps"] = 40 if not tiny else 3
    per_forward = (res["forward_high"]["ms"] + res["forward_low"]["ms"]) / 2
    res["teacher_extrapolated_ms"] = 2 * res["teacher_steps"] * per_forward
    high = low = None
    gc_.free()
    return res


# ----------------------------------------------------------------------------------------------- report


def run(args) -> dict:
    res = {"env": {**gc_.environment(), "tiny": args.tiny}, "ceilings": gc_.ceilings(args.tiny)}
    if args.model in ("qwen", "both"):
        res["qwen"] = qwen(args)
    if args.model in ("wan", "both"):
        res["wan"] = wan(args)
    return res


def _speedup_rows(enc_teacher, teacher, dec, enc_student, student):
    e2e_t = enc_teacher + teacher + dec
    e2e_s = enc_student + student + dec
    return e2e_t, e2e_s


def render(res: dict) -> str:
    env = res["env"]
    models = [name for key, name in (("qwen", "Qwen-Image"), ("wan", "Wan2.2 A14B")) if key in res]
    lines = [
        f"## Sampling: teacher vs 4-step / 2-phase student ({', '.join(models)})",
        "",
        f"Device: **{env['device']}** ({gc_.env_line(env)}). Command: `{env['command']}`. Random bf16 weights at the "
        "published configs, batch 1; CUDA events, median after warm-up.",
        "",
    ]
    if "qwen" in res:
        q = res["qwen"]
        nan = {"ms": float("nan")}
        q.setdefault("text_encode_prompt", nan), q.setdefault("text_encode_negative", nan)
        q.setdefault("vae_decode", nan), q.setdefault("text_encoder_params", float("nan"))
        enc_t = q["text_encode_prompt"]["ms"] + q["text_encode_negative"]["ms"]
        enc_s = q["text_encode_prompt"]["ms"]
        dec = q["vae_decode"]["ms"]
        teach = q["teacher"]["ms"]
        rows = []
        for key, label in (
            ("student_resident", "student, resident merged experts"),
            ("student_inplace_delta", "student, in-place delta swaps"),
            ("student_base_no_swap", "4 plain forwards (no experts, floor)"),
        ):
            s = q[key]["ms"]
            e2e_t, e2e_s = _speedup_rows(enc_t, teach, dec, enc_s, s)
            rows.append([label, round(s, 1), f"{teach / s:.1f}x", round(e2e_s, 1), f"{e2e_t / e2e_s:.1f}x"])
        rows.insert(
            0,
            [
                f"teacher, {q['teacher_steps']} steps, true CFG",
                round(teach, 1),
                "1x",
                round(enc_t + teach + dec, 1),
                "1x",
            ],
        )
        lines += [
            "### Qwen-Image, 1024x1024",
            "",
            gc_.md_table(["sampler", "transformer ms", "speed-up", "end-to-end ms", "end-to-end speed-up"], rows),
            "",
            f"Components: one transformer forward {q['forward_cond']['ms']:.1f} ms (64 text tokens; uncond, 8 "
            f"tokens: {q['forward_uncond']['ms']:.1f} ms); text encoder ({q['text_encoder_params'] / 1e9:.2f}B "
            f"Qwen2.5-VL-7B, text only) {q['text_encode_prompt']['ms']:.1f} ms for the 103-token templated prompt, "
            f"{q['text_encode_negative']['ms']:.1f} ms for the negative prompt (teacher only); VAE decode to "
            f"1024x1024 {dec:.1f} ms. End to end = text encode + transformer steps + decode (latent preparation, "
            "scheduler arithmetic and image post-processing not counted). Peak memory with both experts resident: "
            f"{q['memory_resident']['peak_gib']} GiB.",
            "",
        ]
    if "wan" in res:
        w = res["wan"]
        enc = w["text_encode"]["ms"]
        dec = w["vae_decode"]["ms"]
        teach = w["teacher_extrapolated_ms"]
        s = w["student"]["ms"]
        per_fwd = (w["forward_high"]["ms"] + w["forward_low"]["ms"]) / 2
        rows = [
            [
                f"teacher, {w['teacher_steps']} steps, CFG (extrapolated)",
                round(teach),
                "1x",
                round(2 * enc + teach + dec),
                "1x",
            ],
            [
                "student, 4 steps / 2 phases (run)",
                round(s),
                f"{teach / s:.1f}x",
                round(enc + s + dec),
                f"{(2 * enc + teach + dec) / (enc + s + dec):.1f}x",
            ],
        ]
        lines += [
            "### Wan2.2 T2V A14B, 480x832, 81 frames",
            "",
            gc_.md_table(["sampler", "transformer ms", "speed-up", "end-to-end ms", "end-to-end speed-up"], rows),
            "",
            f"One forward of a 14B transformer over {w['tokens']} tokens (512 text tokens): high-noise "
            f"{w['forward_high']['ms']:.0f} ms, low-noise {w['forward_low']['ms']:.0f} ms "
            f"({w['flops_per_forward'] / 1e15:.2f} PFLOP, {w['flops_per_forward'] / per_fwd / 1e9:.0f} TFLOP/s). "
            f"The teacher's {2 * w['teacher_steps']} forwards were not run: its time is 2 x {w['teacher_steps']} x "
            f"the mean forward. UMT5-XXL ({w['text_encoder_params'] / 1e9:.2f}B, 512 tokens) {enc:.1f} ms (teacher: "
            f"prompt + negative prompt); Wan VAE decode (bf16) to 81x480x832 {dec:.0f} ms (peak "
            f"{w['vae_decode']['peak_gib']} GiB). Both experts are merged into their own transformer, so the "
            f"student's phase change is a change of module (no swap cost). Peak memory "
            f"{w['memory']['peak_gib']} GiB.",
            "",
        ]
    return "\n".join(lines)


def main():
    parser = gc_.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("qwen", "wan", "both"), default="qwen")
    args = parser.parse_args()
    if gc_.maybe_from_json(args, f"{NAME}_{args.model}", render):
        return
    res = run(args)
    gc_.finish(args, f"{NAME}_{args.model}", res, render)


if __name__ == "__main__":
    main()
