"""Sampling time through the public pipelines, end to end: teacher, the family's own 4 steps, Phased DMD experts.

Every figure is the wall clock of a whole `pipe(...)` call as a user makes it (prompt in, images or frames out;
device synchronised before and after; median of `--reps` after warm-up), all measured side by side in one run:

- the family pipeline with its teacher settings (Qwen-Image: `QwenImagePipeline`, 50 steps, true CFG 4; Wan2.2 T2V
  A14B: `WanPipeline`, 40 steps, CFG 4 / 3, run for real);
- the family pipeline's own 4-step call (no guidance);
- `PhasedMoEPipeline.from_pretrained(base, experts=<experts folder>)` in each `expert_swap_mode` (adapter, delta,
  resident, auto), uncompiled, with diffusers' regional compilation (`compile_repeated_blocks`) and with a
  whole-transformer `compile()`, at batch 1 and 4; torch.compile's recompilations are counted over the timed calls
  (after warm-up), which swap experts at every call.

`--user_lora` adds a user's own LoRA on top of the experts (`load_lora_weights`, weight 0.8, `"auto"`): its
unfused forward on the merged experts, then `fuse_lora()`; such a run writes the doc section
`gpu_sampling_<model>_user_lora` (not the full table's).

`--memory_modes` adds, for Qwen-Image with LoRA experts, what a user with a small card does: model / sequential /
group offloading, layerwise casting (fp8 storage, bf16 compute), fp16 instead of bf16, and `to()` to the host and
back with merged experts: the largest difference to the plain call's image and the peak device memory of each.

    # base: a saved QwenImagePipeline; experts: a folder written by examples/phased_dmd/train_phased_dmd_qwen_image.py
    python benchmarks/gpu_sampling.py --model qwen --base BASE_DIR --experts EXPERTS_DIR --out sampling_qwen.json
    python benchmarks/gpu_sampling.py --model qwen --base BASE_DIR --experts EXPERTS_DIR --memory_modes \
        --skip student teacher family --out memory_qwen.json
    # Wan2.2 A14B (nvidia-h200): base built in memory (random weights), experts fabricated unless --experts; the
    # teacher alone takes about 4.5 min at batch 1, so keep one call under 10 min with a small grid:
    python benchmarks/gpu_sampling.py --model wan --batches 1 --reps 2 --compile none --modes auto \
        --out sampling_wan.json
    python benchmarks/gpu_sampling.py --tiny --memory_modes    # CPU logic check, < 2 min
    # A user's LoRA on the experts (Qwen-Image, H100): the family 4 steps and the student, uncompiled, auto, +- the LoRA
    python benchmarks/gpu_sampling.py --model qwen --base BASE_DIR --experts EXPERTS_DIR --user_lora \
        --modes auto --compile none --skip teacher --out user_lora_qwen.json

`--skip` drops every measurement whose key contains one of the given words (keys look like
`student/auto/regional/b4`, `family4/none/b1`, `teacher/none/b1`, `memory/group_offload`); `--compile`, `--modes`
and `--batches` choose the grid. Results are saved to `--out` after every measurement, so a run cut short keeps
what it measured.
"""

from __future__ import annotations

import pathlib
import tempfile

import gpu_common as gc_
import torch


NAME = "gpu_sampling"
PROMPT = "a red fox sitting in fresh snow at sunrise, detailed fur, soft light"
NEGATIVE = " "
MODES = ("auto", "resident", "delta", "adapter")
COMPILES = ("none", "regional", "full")
SETTINGS = {
    # family teacher settings, sizes, and the experts fabricated when --experts is not given
    "qwen": {
        "family": "qwen-image",
        "teacher": {"num_inference_steps": 50, "true_cfg_scale": 4.0, "negative_prompt": NEGATIVE},
        "family4": {"num_inference_steps": 4, "true_cfg_scale": 1.0},
        "size": {"height": 1024, "width": 1024},
        "tiny_size": {"height": 32, "width": 32},
        "experts": [("transformer", "phase0"), ("transformer", "phase1")],
        "boundaries": [0.875],
        "batch_arg": "num_images_per_prompt",
    },
    "wan": {
        "family": "wan2.2-t2v-a14b",
        "teacher": {"num_inference_steps": 40, "guidance_scale": 4.0, "guidance_scale_2": 3.0},
        "family4": {"num_inference_steps": 4, "guidance_scale": 1.0, "guidance_scale_2": 1.0},
        "size": {"height": 480, "width": 832, "num_frames": 81},
        "tiny_size": {"height": 16, "width": 16, "num_frames": 5},
        "experts": [("transformer", "phase0"), ("transformer_2", "phase1")],
        "boundaries": [0.875],
        "batch_arg": "num_videos_per_prompt",
    },
}


class Run:
    """Holds the results and the filters of one run; saves the JSON after every measurement."""

    def __init__(self, args, res: dict):
        self.args, self.res = args, res

    def wanted(self, key: str) -> bool:
        return not any(word in key for word in self.args.skip)

    def save(self):
        gc_.save_json(self.args.out, self.res)

    def measure(self, key: str, fn, warmup: int, extra: callable = None) -> dict | None:
        """Time `fn` (a whole pipeline call) under `key` and count torch.compile's work over the timed calls."""
        if not self.wanted(key):
            return None
        try:
            start = gc_.compile_counts()
            for _ in range(warmup):
                fn()
            before = gc_.compile_counts()
            gc_.free()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            out = gc_.time_call(
                fn, reps=self.args.reps if not key.startswith("teacher") else self.args.teacher_reps, warmup=0
            )
            out["compile_in_warmup"] = gc_.compile_delta(start, before)
            out["compile_after_warmup"] = gc_.compile_delta(before, gc_.compile_counts())
            out["peak_gib"] = gc_.mem()["peak_gib"]
            if extra is not None:
                out.update(extra())
        except Exception as err:  # keep the other figures; the error is part of the result
            out = {"error": repr(err)[:500]}
        self.res["calls"][key] = out
        print(key, {k: v for k, v in out.items() if k != "all_ms"}, flush=True)
        self.save()
        return out


def family_call(pipe, spec: dict, size: dict, batch: int, settings: dict, output_type=None):
    kwargs = {**size, **settings, spec["batch_arg"]: batch}
    if output_type is not None:
        kwargs["output_type"] = output_type

    def call():
        return pipe(prompt=PROMPT, generator=torch.Generator(gc_.device()).manual_seed(0), **kwargs)

    return call


def load_base(args, spec: dict, workdir: pathlib.Path):
    """The family pipeline and the folder `PhasedMoEPipeline.from_pretrained` reads its index from."""
    import diffusers

    from diffusers_pdmd import tiny as tiny_models

    if args.base:
        index = gc_.load_json(pathlib.Path(args.base) / "model_index.json")
        cls = getattr(diffusers, index["_class_name"])
        pipe = cls.from_pretrained(args.base, dtype=torch.bfloat16, use_safetensors=True).to(gc_.device())
        return pipe, pathlib.Path(args.base)
    base_dir = workdir / "base"
    if args.tiny and args.model == "qwen":  # the whole public path, from a saved folder
        tiny_models.save_pipeline(spec["family"], base_dir)
        pipe = tiny_models.pipeline_class(spec["family"]).from_pretrained(base_dir, dtype=torch.bfloat16)
        return pipe.to(gc_.device()), base_dir
    # Wan2.2 A14B does not fit twice on the disk: the base stays in memory, its folder holds model_index.json only
    # and `from_pretrained` takes the modules as keyword arguments (as diffusers' own from_pretrained does).
    pipe = gc_.build_family_pipeline(args.model, args.tiny)
    pipe.save_config(base_dir)
    pipe.scheduler.save_pretrained(base_dir / "scheduler")  # a few bytes; the student's scheduler derives from it
    return pipe, base_dir


def load_student(base_pipe, base_dir: pathlib.Path, experts_dir):
    from diffusers_pdmd import PhasedMoEPipeline

    # The modules in memory go in as keyword arguments, as diffusers' from_pretrained takes them; the scheduler is
    # the experts' own (from their folder).
    modules = {k: v for k, v in base_pipe.components.items() if k != "scheduler"}
    student = PhasedMoEPipeline.from_pretrained(
        str(base_dir), experts=str(experts_dir), dtype=torch.bfloat16, **modules
    )
    return student.to(gc_.device())


def compile_kwargs(args) -> dict:
    return {"backend": args.compile_backend, "fullgraph": False}


def transformers(pipe) -> list:
    return [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if m is not None]


def sampling(args, run: Run, spec: dict, workdir: pathlib.Path) -> None:
    size = spec["tiny_size"] if args.tiny else spec["size"]
    torch._dynamo.config.recompile_limit = 64  # adapter and merged modes, two batch sizes: more than the default 8
    base, base_dir = load_base(args, spec, workdir)
    base.set_progress_bar_config(disable=True)
    run.res["size"] = size
    run.res["transformer_params"] = sum(gc_.param_count(m) for m in transformers(base))

    # 1. The family pipeline (before the experts are put on its transformers): its own 4 steps, then the teacher
    # (the most important figures first: a run cut short keeps them).
    for batch in args.batches:
        run.measure(f"family4/none/b{batch}", family_call(base, spec, size, batch, spec["family4"]), warmup=1)
    for batch in args.batches:
        run.measure(f"teacher/none/b{batch}", family_call(base, spec, size, batch, spec["teacher"]), warmup=0)
    for kind in [k for k in args.compile if k != "none"]:
        if not any(run.wanted(f"family4/{kind}/b{b}") for b in args.batches):
            continue
        for m in transformers(base):
            gc_.set_compiled(m, kind, **compile_kwargs(args))
        for batch in args.batches:
            run.measure(f"family4/{kind}/b{batch}", family_call(base, spec, size, batch, spec["family4"]), warmup=2)
    for m in transformers(base):
        gc_.set_compiled(m, "none")

    # 2. The experts: the folder given, or one fabricated with the library's save functions.
    experts_dir = args.experts
    if experts_dir is None:
        experts_dir = gc_.fabricate_experts(
            base,
            workdir / "experts",
            spec["experts"],
            spec["boundaries"],
            [2, 2],
            rank=8 if args.tiny else 64,
        )
    run.res["experts"] = str(experts_dir)
    if not any(run.wanted(f"student/{mode}") for mode in args.modes) and not args.memory_modes:
        return
    student = load_student(base, base_dir, experts_dir)
    student.set_progress_bar_config(disable=True)
    run.res["student_scheduler"] = {
        "phase_boundaries": list(student.scheduler.config.phase_boundaries),
        "steps_per_phase": list(student.scheduler.config.steps_per_phase),
    }
    student_settings = {}  # the experts' own settings: no guidance, the experts' 4 steps
    for kind in args.compile:
        if not any(run.wanted(f"student/{mode}/{kind}") for mode in args.modes):
            continue
        for m in transformers(student):
            gc_.set_compiled(m, kind, **compile_kwargs(args))
        for mode in args.modes:
            student.expert_swap_mode = mode
            for batch in args.batches:

                def extra(student=student):
                    switcher = student.expert_switcher
                    return {"mode": switcher.mode, "mode_reason": switcher.mode_reason, "swaps": switcher.num_swaps}

                run.measure(
                    f"student/{mode}/{kind}/b{batch}",
                    family_call(student, spec, size, batch, student_settings),
                    warmup=1 if kind == "none" else 2,
                    extra=extra,
                )
    for m in transformers(student):
        gc_.set_compiled(m, "none")
    m = None  # the loop variable would keep a 41 GB transformer alive past `del student` below
    if args.user_lora:
        user_lora(args, run, student, spec, size, experts_dir)
    student.release_experts()
    if not (args.memory_modes and args.model == "qwen"):
        return
    memory = MemoryModes(run, size, base_dir, experts_dir)
    memory.plain(student)
    # The modes that change the weights for good load the pipeline afresh, before any offloading hook exists (an
    # H100 run measured them after sequential offloading, whose pipeline was still held: out of memory).
    del student, base
    extra = None
    gc_.free()
    memory.fresh()
    memory.shared(memory.load().to(gc_.device()))


def user_lora(args, run: Run, student, spec: dict, size: dict, experts_dir) -> None:
    """A user's own LoRA on top of the experts (`load_lora_weights`, weight 0.8), uncompiled, `expert_swap_mode`
    "auto": unfused on the merged experts (`student/auto+user_lora/...`), then fused into the base weights
    (`fuse_lora`, `student/auto+user_lora_fused/...`). Phase 0's expert file stands in for the user's LoRA (a LoRA of
    the experts' rank on the experts' modules); for Wan2.2 A14B it goes into both transformers."""
    style = pathlib.Path(experts_dir) / "phase_0" / "pytorch_lora_weights.safetensors"
    student.expert_swap_mode = "auto"
    for slot in ("transformer", "transformer_2")[: len(transformers(student))]:
        student.load_lora_weights(
            str(style.parent),
            weight_name=style.name,
            adapter_name="style",
            load_into_transformer_2=slot == "transformer_2",
        )
    student.set_adapters("style", 0.8)

    def extra():
        return {"mode": student.expert_switcher.mode, "swaps": student.expert_switcher.num_swaps}

    for name in ("user_lora", "user_lora_fused"):
        if name == "user_lora_fused":
            student.fuse_lora()
        for batch in args.batches:
            key = f"student/auto+{name}/none/b{batch}"
            run.measure(key, family_call(student, spec, size, batch, {}), warmup=1, extra=extra)
    student.unfuse_lora()
    student.unload_lora_weights()


# ----------------------------------------------------------------------------------------------- memory modes


class MemoryModes:
    """Each way of fitting Qwen-Image on a smaller card against the plain call (batch 1): the largest difference of
    the image (in [0, 1]) to the plain call's, and the peak device memory of the call itself
    (`torch.cuda.max_memory_allocated`, reset after the mode is set up). The reference is the benchmark's pipeline;
    fp8 layerwise casting, fp16 and group offloading (which change the weights or their placement for good) each load
    a fresh `PhasedMoEPipeline.from_pretrained` of the same folders, then one more fresh load serves `to()` with
    merged experts and, last, model and sequential offloading."""

    def __init__(self, run: Run, size: dict, base_dir, experts_dir):
        self.run, self.size, self.base_dir, self.experts_dir = run, size, pathlib.Path(base_dir), experts_dir
        self.results = run.res.setdefault("memory_modes", {})
        self.reference = None

    def image(self, pipe):
        import numpy as np

        gc_.free()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        out = pipe(
            prompt=PROMPT, generator=torch.Generator(gc_.device()).manual_seed(0), output_type="np", **self.size
        )
        self.peak = gc_.mem()["peak_gib"]
        return np.asarray(out.images, dtype=np.float32)

    def record(self, name: str, fn):
        import numpy as np

        key = f"memory/{name}"
        if not self.run.wanted(key):
            return
        try:
            out, mode = fn()
            entry = {"max_abs_diff": float(np.abs(out - self.reference).max()), "peak_gib": self.peak, "mode": mode}
        except Exception as err:  # keep the other modes; the error is part of the result
            entry = {"error": repr(err)[:500]}
        gc_.free()
        self.results[name] = entry
        print(key, entry, flush=True)
        self.run.save()

    def plain(self, student) -> None:
        """The reference: the plain call with the default `expert_swap_mode`."""
        student.expert_swap_mode = "auto"
        self.reference = self.image(student)
        self.results["plain"] = {"max_abs_diff": 0.0, "peak_gib": self.peak, "mode": student.expert_switcher.mode}
        self.run.save()

    def shared(self, student) -> None:
        """`to()` with merged experts, then model and sequential offloading, on one pipeline (offloading last)."""
        dev = gc_.device()
        student.set_progress_bar_config(disable=True)

        def moved(mode):
            def fn():
                student.expert_swap_mode = mode
                student(prompt=PROMPT, output_type="latent", **self.size)  # merged on the device
                student.to("cpu")
                student.to(dev)
                return self.image(student), student.expert_switcher.mode

            return fn

        self.record("to_cpu_and_back_resident", moved("resident"))
        self.record("to_cpu_and_back_delta", moved("delta"))

        def offload(method):
            def fn():
                student.expert_swap_mode = "auto"
                getattr(student, method)(device=dev)
                try:
                    return self.image(student), student.expert_switcher.mode
                finally:
                    student.remove_all_hooks()
                    student.to(dev)

            return fn

        self.record("model_cpu_offload", offload("enable_model_cpu_offload"))
        self.record("sequential_cpu_offload", offload("enable_sequential_cpu_offload"))
        student.release_experts()

    def load(self, dtype=torch.bfloat16):
        from diffusers_pdmd import PhasedMoEPipeline

        if not (self.base_dir / "transformer").is_dir():
            raise ValueError("needs a saved base pipeline (--base) to load afresh")
        pipe = PhasedMoEPipeline.from_pretrained(str(self.base_dir), experts=str(self.experts_dir), dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def fresh(self) -> None:
        dev = gc_.device()

        def layerwise_fp8():
            pipe = self.load().to(dev)
            pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
            return self.image(pipe), pipe.expert_switcher.mode

        def fp16():
            pipe = self.load(torch.float16).to(dev)
            return self.image(pipe), pipe.expert_switcher.mode

        def group_offload():
            pipe = self.load()
            pipe.enable_group_offload(
                onload_device=dev,
                offload_device=torch.device("cpu"),
                offload_type="leaf_level",
                use_stream=torch.cuda.is_available(),
            )
            return self.image(pipe), pipe.expert_switcher.mode

        for name, fn in (("layerwise_fp8", layerwise_fp8), ("fp16", fp16), ("group_offload_leaf", group_offload)):
            self.record(name, fn)


# ----------------------------------------------------------------------------------------------- report


def run_all(args) -> dict:
    spec = SETTINGS[args.model]
    res = {
        "env": {**gc_.environment(), "tiny": args.tiny},
        "model": args.model,
        "family": spec["family"],
        "settings": {k: spec[k] for k in ("teacher", "family4")},
        "calls": {},
    }
    run = Run(args, res)
    with tempfile.TemporaryDirectory(prefix="gpu_sampling_") as tmp, torch.no_grad():
        sampling(args, run, spec, pathlib.Path(tmp))
    return res


def _ms(res, key):
    entry = res["calls"].get(key) or {}
    return entry.get("ms")


def render(res: dict) -> str:
    env = res["env"]
    model = {"qwen": "Qwen-Image, 1024x1024", "wan": "Wan2.2 T2V A14B, 480x832, 81 frames"}[res["model"]]
    if env.get("tiny"):
        model += " (tiny configs, CPU logic check: not a measurement)"
    calls = res["calls"]
    batches = sorted({int(k.rsplit("/b", 1)[1]) for k in calls})
    teacher = res["settings"]["teacher"]
    lines = [
        f"### Sampling through the public pipelines: {model}",
        "",
        f"Device: **{env['device']}** ({gc_.env_line(env)}). Command: `{env['command']}`. Wall clock of the whole "
        "`pipe(prompt)` call (text encoding, steps, VAE decode, PIL images), median after warm-up, all rows from "
        "this one run. Random bf16 weights at the published configs; the experts: "
        f"`{pathlib.Path(str(res.get('experts', '?'))).name}` "
        f"(phases {res.get('student_scheduler', {}).get('phase_boundaries')}, steps "
        f"{res.get('student_scheduler', {}).get('steps_per_phase')}). Teacher: the family pipeline with "
        f"{teacher}.",
        "",
    ]
    header = ["call", "compile"] + [f"batch {b}: s" for b in batches] + [f"vs family 4-step, b{b}" for b in batches]
    header += [f"speed-up vs teacher, b{b}" for b in batches] + ["recompiles after warm-up"]
    rows = []
    keys = []
    for key in calls:
        stem = key.rsplit("/b", 1)[0]
        if stem not in keys:
            keys.append(stem)
    for stem in keys:
        parts = stem.split("/")
        kind = parts[-1]
        if parts[0] == "teacher":
            label = "family pipeline, teacher settings"
        elif parts[0] == "family4":
            label = "family pipeline, its own 4 steps"
        else:
            resolved = {calls.get(f"{stem}/b{b}", {}).get("mode") for b in batches} - {None}
            mode, _, user = parts[1].partition("+")
            label = f"PhasedMoEPipeline, `{mode}`" + (f" (-> {', '.join(sorted(resolved))})" if mode == "auto" else "")
            label += {"user_lora": " + a user LoRA", "user_lora_fused": " + a user LoRA, fused"}.get(user, "")
        row = [label, kind]
        for b in batches:
            ms = _ms(res, f"{stem}/b{b}")
            err = (calls.get(f"{stem}/b{b}") or {}).get("error")
            row.append(round(ms / 1e3, 3) if ms else ("error" if err else "-"))
        for b in batches:
            ms, ref = _ms(res, f"{stem}/b{b}"), _ms(res, f"family4/{kind}/b{b}") or _ms(res, f"family4/none/b{b}")
            row.append(f"{ms / ref:.3f}" if ms and ref and parts[0] != "teacher" else "-")
        for b in batches:
            ms, t = _ms(res, f"{stem}/b{b}"), _ms(res, f"teacher/none/b{b}")
            row.append(f"{t / ms:.1f}x" if ms and t else "-")
        recompiles = [
            (calls.get(f"{stem}/b{b}") or {}).get("compile_after_warmup", {}).get("frames_compiled") for b in batches
        ]
        row.append(", ".join("-" if r is None else str(r) for r in recompiles) if kind != "none" else "-")
        rows.append(row)
    lines += [gc_.md_table(header, rows), ""]
    errors = {k: v["error"] for k, v in calls.items() if v and "error" in v}
    if errors:
        lines += ["Errors: " + "; ".join(f"`{k}`: {_short(v)}" for k, v in errors.items()), ""]
    return "\n".join(lines)


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).replace("\\n", " ").split()).replace("|", "/")
    return text if len(text) <= n else text[: n - 3] + "..."


def render_memory(res: dict) -> str:
    env = res["env"]
    size = res.get("size", {})
    runs = res.get("runs")  # results gathered from several runs on one machine kind, each with its own plain call
    rows = [
        [name, v.get("mode", "-"), v.get("max_abs_diff", "-"), v.get("peak_gib", "-"), _short(v.get("error", ""))]
        + ([v.get("run", 1)] if runs else [])
        for name, v in res["memory_modes"].items()
    ]
    tiny = " (tiny configs, CPU logic check: not a measurement)" if env.get("tiny") else ""
    command = f"Command: `{env['command']}`."
    if runs:
        command = (
            "Commands (one per run; each mode's image is compared with the plain call of its own run): "
            + "; ".join(f"run {i}: `{c}`" for i, c in enumerate(runs, 1))
            + "."
        )
    return "\n".join(
        [
            f"### Memory modes: Qwen-Image with LoRA experts, {size.get('height')}x{size.get('width')}, batch 1{tiny}",
            "",
            f"Device: **{env['device']}** ({gc_.env_line(env)}). {command} Each mode's image "
            "(`output_type='np'`, values in [0, 1]) against the plain bf16 call's on the device, same seed; peak = "
            "`torch.cuda.max_memory_allocated` over the call alone (reset after the mode is set up). `expert swap` is "
            "what `expert_swap_mode='auto'` chose under that mode.",
            "",
            gc_.md_table(
                ["mode", "expert swap", "max abs diff", "peak GiB", "error"] + (["run"] if runs else []), rows
            ),
            "",
        ]
    )


def sections(res: dict) -> list[tuple[str, str]]:
    """(doc section name, markdown) for what this run measured: the calls, the memory modes, or both. A run with
    `--user_lora` writes its calls to a section of their own (`gpu_sampling_<model>_user_lora`), so that its few rows
    do not replace the full table."""
    out = []
    if res.get("calls"):
        user = any("+user_lora" in key for key in res["calls"])
        out.append((f"{NAME}_{res['model']}" + ("_user_lora" if user else ""), render(res)))
    if res.get("memory_modes"):
        out.append(("gpu_memory_modes", render_memory(res)))
    return out


def publish(args, res: dict, write: bool) -> None:
    for name, markdown in sections(res):
        print(markdown)
        if write:
            gc_.write_section(args.doc, name, markdown)


def main():
    parser = gc_.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(reps=None)
    parser.add_argument("--model", choices=tuple(SETTINGS), default="qwen")
    parser.add_argument("--base", default=None, help="saved family pipeline folder (default: built in memory)")
    parser.add_argument("--experts", default=None, help="experts folder (default: random LoRAs, fabricated)")
    parser.add_argument("--teacher_reps", type=int, default=1, help="timed teacher calls (no warm-up of its own)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--compile", nargs="+", choices=COMPILES, default=list(COMPILES))
    parser.add_argument(
        "--compile_backend", default=None, help="torch.compile backend (default: inductor; eager on CPU)"
    )
    parser.add_argument("--skip", nargs="*", default=[], help="skip measurements whose key contains any of these")
    parser.add_argument("--memory_modes", action="store_true", help="also offloading / casting / to() (Qwen-Image)")
    parser.add_argument(
        "--user_lora", action="store_true", help="also a user's LoRA on the experts, unfused and fused (mode auto)"
    )
    args = parser.parse_args()
    if args.reps is None:
        args.reps = 1 if args.tiny else 3
    if args.compile_backend is None:
        args.compile_backend = "inductor" if torch.cuda.is_available() else "eager"
    if args.from_json:
        publish(args, gc_.load_json(args.from_json), write=True)
        return
    res = run_all(args)
    gc_.save_json(args.out, res)
    publish(args, res, write=bool(args.doc) and not args.tiny)


if __name__ == "__main__":
    main()
