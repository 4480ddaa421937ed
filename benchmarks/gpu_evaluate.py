"""Full-size cost of `python -m diffusers_pdmd.evaluate`: sampling teacher and experts, then each metric.

Runs the evaluate path itself (`evaluate.samplers.generate`, `evaluate.measure_all`, `evaluate.write_outputs`) on
pipelines built in memory with random weights at the published configs (`gpu_common.build_family_pipeline`; Wan2.2
A14B does not fit twice on the disk), random LoRA experts written by the library's `save_pretrained`
(`gpu_common.fabricate_experts`, 2 + 2 steps) and random-weight backbones at the real configs (DINOv3 ViT-B/16 or
DINOv2 ViT-B/14, CLIP ViT-L/14, LPIPS AlexNet, RAFT large). Records the wall time of sampling each sampler and of
each metric, and the peak GPU memory, in `docs/benchmarks/gpu.md` (section `evaluate-qwen` / `evaluate-wan`).

    python benchmarks/gpu_evaluate.py --model qwen --prompts 4 --seeds 8 --out eval_qwen.json     # ~19 s a teacher image
    python benchmarks/gpu_evaluate.py --model wan --prompts 2 --seeds 4 --out eval_wan.json       # ~258 s a teacher video
    python benchmarks/gpu_evaluate.py --model qwen --tiny                                         # CPU logic check

A device call lasts at most 10 minutes. Samples are kept under `--workdir` (default `outputs/gpu_evaluate`, ignored
by git, kept on a warm device machine), so a call cut off by the limit is continued by the same command: it samples
only what is missing (the random weights are seeded, the same in every call). Reduced runs that fit one call:
`--model qwen --prompts 1 --seeds 8` (about 8 x 19 s of teacher), `--model wan --prompts 1 --seeds 2 --teacher_steps
10`. Per-sample seconds are measured on each sample; a stage's wall time counts the samples made in that call.
"""

from __future__ import annotations

import pathlib
import sys
import time

import torch


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gpu_common as gc_  # noqa: E402
from gpu_sampling import NEGATIVE, SETTINGS, load_base, load_student  # noqa: E402


def build_backbones(tiny: bool, device) -> dict:
    """Random-weight DINO, CLIP, LPIPS and RAFT at the real configs (tiny: test-sized)."""
    import transformers
    from transformers import CLIPConfig, CLIPModel

    from diffusers_pdmd import tiny as tiny_models
    from diffusers_pdmd.evaluate import backbones

    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
    vit_b = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
    if hasattr(transformers, "DINOv3ViTModel"):  # ViT-B/16 (the config's default is ViT-S)
        dino = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**(small if tiny else vit_b)))
    else:
        dino = transformers.Dinov2Model(transformers.Dinov2Config(**(small if tiny else vit_b)))
    tokenizer = tiny_models.build_tokenizer("wan2.2-t2v-a14b")
    text = dict(small if tiny else {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12})
    vision = dict(small) if tiny else {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16}
    vision.update(num_hidden_layers=2 if tiny else 24, image_size=224, patch_size=14)
    text.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=0)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16 if tiny else 768))
    return {
        "features": backbones.FeatureModel(type(dino).__name__, device, model=dino),
        "clip": backbones.ClipModel(type(clip).__name__, device, model=clip, tokenizer=tokenizer),
        "lpips": backbones.LPIPSModel("alex").to(device).eval(),
        "flow": backbones.build_flow_model("raft_small" if tiny else "raft_large").to(device).eval(),
    }


def _peak_gib() -> float | None:
    return gc_.gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def run(args) -> dict:
    from diffusers_pdmd import evaluate
    from diffusers_pdmd.evaluate import samplers

    spec = SETTINGS[args.model]
    size = spec["tiny_size"] if args.tiny else spec["size"]
    workdir = pathlib.Path(args.workdir)
    base, base_dir = load_base(args, spec, workdir)
    rank = 8 if args.tiny else 64
    experts = gc_.fabricate_experts(base, workdir / "experts", spec["experts"], spec["boundaries"], [2, 2], rank=rank)
    student = load_student(base, base_dir, experts)
    prompts = [p for p in (gc_.REPO / "benchmarks" / "prompts.txt").read_text().splitlines() if p.strip()]
    prompts = prompts[: args.prompts]
    steps = args.teacher_steps or spec["teacher"]["num_inference_steps"]
    negative = NEGATIVE if args.model == "qwen" else None
    teacher = samplers.SamplerSpec("teacher", "in-memory", steps=steps, cfg=4.0, negative=negative, kind="teacher")
    ours = samplers.SamplerSpec("phased_dmd", str(experts), kind="experts")
    out = workdir / "eval"
    h, w, f = size["height"], size["width"], size.get("num_frames")
    seeds, res = (
        list(range(args.seeds)),
        {"env": {**gc_.environment(), "tiny": args.tiny}, "args": vars(args), "sampling": {}, "metrics": {}},
    )
    for s, pipe in ((teacher, base), (ours, student)):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        gc_.sync()
        start = time.perf_counter()
        n = samplers.generate(s, prompts, seeds, out, h, w, f, device=gc_.device(), pipe=pipe)
        gc_.sync()
        res["sampling"][s.name] = {"samples": n, "seconds": time.perf_counter() - start, "peak_gib": _peak_gib()}
    del student, base, pipe
    gc_.free()
    data = {s.name: evaluate.load_samples(out, s.name, len(prompts), seeds) for s in (teacher, ours)}
    models = build_backbones(args.tiny, gc_.device())
    metrics = [m for m in evaluate.METRICS if m != "flow" or f is not None]
    rows = {}
    for metric in metrics:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = evaluate.measure_all(data, prompts, (metric,), models, "teacher")
        gc_.sync()
        res["metrics"][metric] = {"seconds": time.perf_counter() - start, "peak_gib": _peak_gib()}
        for name, row in result["samplers"].items():
            rows.setdefault(name, {}).update(row)
    result = {"samplers": rows, "fd": result.get("fd") or {}, "prompts": prompts, "seeds": seeds}
    result.update(size=f"{f}x{h}x{w}" if f else f"{h}x{w}", reference="teacher", feature_model="random weights")
    evaluate.write_outputs(out, result, data, "benchmarks/gpu_evaluate.py " + " ".join(sys.argv[1:]))
    res["values"] = {
        name: {k: v for k, v in row.items() if not k.endswith("_per_prompt")} for name, row in rows.items()
    }
    res.update(prompts=len(prompts), seeds=len(seeds), size=result["size"], teacher_steps=steps)
    return res


def render(res: dict) -> str:
    model = res["args"]["model"]
    rows = [[f"sampling {k}", v["samples"], f"{v['seconds']:.1f}", v["peak_gib"]] for k, v in res["sampling"].items()]
    rows += [[f"metric {k}", "", f"{v['seconds']:.1f}", v["peak_gib"]] for k, v in res["metrics"].items()]
    per = res["values"]
    cost = ", ".join(
        f"{k}: {v.get('seconds_per_sample', 0):.2f} s / {v.get('forwards_per_sample', 0):g} forwards"
        for k, v in per.items()
    )
    return "\n".join(
        [
            f"### `python -m diffusers_pdmd.evaluate` at full size ({model})"
            + (" (tiny configs, CPU logic check: not a measurement)" if res["env"].get("tiny") else ""),
            "",
            f"{res['prompts']} prompts x {res['seeds']} seeds at {res['size']}, teacher {res['teacher_steps']} steps "
            f"with CFG 4 vs random LoRA experts (2 + 2 steps); random-weight backbones. {gc_.env_line(res['env'])}",
            "",
            gc_.md_table(["stage", "samples", "wall s", "peak GiB"], rows),
            "",
            f"Per sample: {cost}.",
            "",
            f"Command: `python benchmarks/gpu_evaluate.py {' '.join(f'--{k} {v}' for k, v in res['args'].items() if k in ('model', 'prompts', 'seeds', 'teacher_steps') and v)}`",
        ]
    )


def main():
    parser = gc_.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(SETTINGS), default="qwen")
    parser.add_argument("--prompts", type=int, default=None, help="prompts (default: 4 for qwen, 2 for wan)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per prompt (default: 8 for qwen, 4 for wan)")
    parser.add_argument("--teacher_steps", type=int, default=None, help="default: 50 (qwen) / 40 (wan)")
    parser.add_argument("--base", default=None, help="saved family pipeline folder (default: built in memory)")
    parser.add_argument(
        "--workdir", default=str(gc_.REPO / "outputs" / "gpu_evaluate"), help="samples and report (kept: resumable)"
    )
    args = parser.parse_args()
    args.prompts = args.prompts or (4 if args.model == "qwen" else 2)
    args.seeds = args.seeds or (8 if args.model == "qwen" else 4)
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (diversity needs pairs)")
    name = f"evaluate-{args.model}"
    if gc_.maybe_from_json(args, name, render):
        return
    gc_.finish(args, name, run(args), render)


if __name__ == "__main__":
    main()
