"""Phased DMD training at full size, measured by running the example scripts themselves, one GPU.

The base pipeline is built with random weights on the device (published transformer configs in bf16; text
encoders at full width with 2 layers, since the scripts cache the prompt embeddings and free the encoder), then:

- `--model qwen` (Qwen-Image, 1024x1024): saved to `--base_dir` (~44 GB) and passed to
  `examples/phased_dmd/train_phased_dmd_qwen_image.py` as `--pretrained_model_name_or_path`, so the script loads
  it as a user's run does;
- `--model wan-a14b` (480x832x81) / `wan-ti2v-5b` (704x1280x121): the disk cannot hold a second copy of A14B, so the
  in-memory pipeline goes to `train_phased_dmd_wan22.py`'s `main(argv, load_pipeline=...)`, the script's own
  loading seam; nothing else is replaced.

Each phase runs as its own script call (`--train_phase k`, the paper's sequential order; phase k > 0 loads the
earlier experts from `--output_dir`), so every figure belongs to one phase:

- seconds per generator update with its fake updates: `step_seconds` of the script's history
  (`<output_dir>/logs/history.json`, synchronised), median over the updates after the first (warm-up);
- peak memory: `torch.cuda.max_memory_allocated` and the device's own use (`torch.cuda.mem_get_info`, polled);
- forwards (with / without grad) and backwards of the transformers, counted by forward hooks (a backward when the
  gradient reaches a forward's output);
- MFU: model FLOPs per update (analytic per forward from the config and token counts: `gpu_common.transformer_flops`;
  a backward through the frozen base = its linears once + attention twice; checkpoint recompute not counted) over
  the time per update, against the bf16 matmul rate measured in the same run.

`--output_dir` keeps the experts-only folder of the run (for `benchmarks/gpu_sampling.py --base DIR --experts DIR`).
`--fp8_check` also measures one teacher forward with the base stored in fp8 (`--base_fp8`) against bf16.

`--cap_gib C` caps the process's GPU memory at C GiB (`torch.cuda.set_per_process_memory_fraction`): the script's
default `--memory auto` plans its flags for that budget from the base's config files (the Wan bases go to the script
as config-only folders, `gpu_common.write_config_base`, while the loader hook builds the weights), and the result
keeps the plan's line, the flags it left, and a before-load `MemoryPlanError` or an out-of-memory error as a row.
`--profile` records the second update of each phase with `torch.profiler` (`gpu_profile.py`: where the kernel time
goes). `--memory_table FILE ...` renders the family x cap table from such results.

    python benchmarks/gpu_train.py --model qwen --base_dir /tmp/qwen-base --output_dir /tmp/qwen-experts \\
        --max_train_steps 2 --fake_updates_per_step 5 --out train_qwen.json
    python benchmarks/gpu_train.py --model wan-a14b --output_dir /tmp/wan-experts --max_train_steps 1 \\
        --extra "--base_fp8 --offload_idle_transformers" --fp8_check --out train_wan.json
    python benchmarks/gpu_train.py --model wan-a14b --output_dir /tmp/w79 --fake_updates_per_step 1 --phases 0 \
        --cap_gib 79 --out train_wan_cap79_p0.json
    python benchmarks/gpu_train.py --model qwen --tiny   # CPU logic check, under a minute
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import pathlib
import shlex
import shutil
import statistics
import sys
import threading
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # GPU machines have no network; nothing here is downloaded

import gpu_common as gc_  # noqa: E402
import gpu_profile  # noqa: E402
import torch  # noqa: E402


NAME = "gpu_train"
SCRIPTS = {
    "qwen": "train_phased_dmd_qwen_image",
    "wan-a14b": "train_phased_dmd_wan22",
    "wan-i2v-a14b": "train_phased_dmd_wan22",
    "wan-ti2v-5b": "train_phased_dmd_wan22",
}
DEVICE_NAMES = {
    "qwen": "Qwen-Image",
    "wan-a14b": "Wan2.2 T2V-A14B",
    "wan-i2v-a14b": "Wan2.2 I2V-A14B",
    "wan-ti2v-5b": "Wan2.2 TI2V-5B",
}
PLAN_FLAGS = ("gradient_checkpointing", "offload_idle_transformers", "offload_activations", "base_fp8")
# Prompts of a realistic length (Qwen-Image: ~40-60 tokens after its template; Wan pads every prompt to 512).
PROMPTS = [
    "A red fox sitting in a snowy pine forest at dawn, soft golden light through the trees, breath visible in the "
    "cold air, photographed with a telephoto lens, shallow depth of field",
    "An old fishing harbour at dusk with wooden boats, lanterns reflecting on calm water, a lighthouse on the hill "
    "and gulls circling overhead, cinematic wide shot",
    "A close-up of a hand-written letter on a wooden desk beside a cup of tea and a brass fountain pen, morning "
    "sunlight from a window, warm tones, film grain",
    "A futuristic city street in the rain at night, neon signs in several languages, people with umbrellas, "
    "reflections on the wet asphalt, a tram passing by",
]


def load_script(name: str):
    path = gc_.REPO / "examples" / "phased_dmd" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Meter:
    """Forward hooks on the transformers: forwards with / without grad, backwards, and their model FLOPs."""

    def __init__(self):
        self.handles = []
        self.reset()

    def reset(self):
        self.counts = {"forward_no_grad": 0, "forward_grad": 0, "backward": 0}
        self.flops = {"forward": 0, "backward": 0}
        self.tokens = {}

    def attach(self, pipe):
        self.detach()
        self._cache = {}
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe, name, None)
            if model is not None:
                self.handles.append(model.register_forward_hook(self._hook, with_kwargs=True))
        return pipe

    def detach(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _shapes(self, module, kwargs, args):
        x = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs["encoder_hidden_states"]
        timestep = kwargs.get("timestep")
        if x.ndim == 3:  # Qwen-Image: packed 2x2 patches
            tokens = x.shape[1]
        else:
            pt, ph, pw = module.config.patch_size
            tokens = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
        per_token_time = timestep is not None and timestep.ndim == 2
        return x.shape[0], tokens, text.shape[1], per_token_time

    def _hook(self, module, args, kwargs, output):
        key = (id(module), *self._shapes(module, kwargs, args))
        if key not in self._cache:
            self._cache[key] = gc_.transformer_flops(module, *key[1:])
        linear, attention = self._cache[key]
        self.tokens[f"{key[2]} latent + {key[3]} text tokens, batch {key[1]}"] = True
        out = output[0] if isinstance(output, (tuple, list)) else output.sample
        self.flops["forward"] += linear + attention
        if out.requires_grad:
            self.counts["forward_grad"] += 1
            out.register_hook(lambda grad: self._backward(linear, attention))
        else:
            self.counts["forward_no_grad"] += 1

    def _backward(self, linear, attention):
        # through the frozen base: input gradients of every linear (1x) and of attention (dQ, dK, dV: 2x)
        self.counts["backward"] += 1
        self.flops["backward"] += linear + 2 * attention


class DevicePeak:
    """Polls the device's used memory (`total - free`, as nvidia-smi shows it) in a thread; keeps the maximum."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(self.interval)

    def __enter__(self):
        if torch.cuda.is_available():
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def script_argv(args, base: str, phase: int, prompts_file: pathlib.Path) -> list[str]:
    h, w, f = (gc_.TRAIN_SIZES_TINY if args.tiny else gc_.TRAIN_SIZES)[args.model]
    argv = [
        "--pretrained_model_name_or_path",
        base,
        "--prompts",
        str(prompts_file),
        "--output_dir",
        str(args.output_dir),
        *(["--train_phase", str(phase)] if phase is not None else []),
        "--max_train_steps",
        str(args.max_train_steps),
        "--fake_updates_per_step",
        str(args.fake_updates_per_step),
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
        "--cache_text_embeddings",
        "--checkpointing_steps",
        "1000000",
        "--checkpoints_total_limit",
        "1",
    ]
    argv += ["--resolution", str(h)] if f is None else ["--height", str(h), "--width", str(w), "--num_frames", str(f)]
    if args.model == "wan-i2v-a14b":
        argv += ["--image", str(prompts_file.parent / f"{prompts_file.stem}-first-frame.png")]
    if args.tiny:
        argv += ["--lora_rank", "4", "--max_sequence_length", "16"]
    return argv + shlex.split(args.extra)


class PlanLog(logging.Handler):
    """Keeps the script's one `Memory plan` log line."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        if record.getMessage().startswith("Memory plan"):
            self.lines.append(record.getMessage())


def run_script(args, script, loader, argv, meter: Meter) -> dict:
    """Run the script once; `{"error": ...}` (with `before_load`) where it stopped with an error, else `{}`; the
    memory plan's log line and the flags it left, and the profile of the second update with `--profile`."""
    from diffusers_pdmd.training.memory import MemoryPlanError

    handler, out, loaded = PlanLog(), {}, {}

    def load(script_args, dtype):
        loaded["flags"] = [f"--{n}" for n in PLAN_FLAGS if getattr(script_args, n, False)]
        loaded["uncheckpointed_blocks"] = getattr(script_args, "uncheckpointed_blocks", None)
        return loader(script_args, dtype)

    logging.getLogger("diffusers_pdmd.train").addHandler(handler)
    rank = int(argv[len(argv) - 1 - argv[::-1].index("--lora_rank") + 1]) if "--lora_rank" in argv else 64
    profiler = gpu_profile.UpdateProfiler(rank) if args.profile else None
    try:
        with profiler.around() if profiler else contextlib.nullcontext():
            script.main(argv, load_pipeline=load)
    except (MemoryPlanError, torch.OutOfMemoryError) as err:
        out["error"] = f"{type(err).__name__}: {err}"
        out["before_load"] = "flags" not in loaded
        print("error", out["error"], flush=True)
    finally:
        logging.getLogger("diffusers_pdmd.train").removeHandler(handler)
    out["memory_plan"] = handler.lines[-1] if handler.lines else None
    out["flags_after_plan"] = loaded.get("flags")
    if loaded.get("uncheckpointed_blocks"):  # blocks the plan (or the flags) left uncheckpointed
        out["uncheckpointed_blocks"] = loaded["uncheckpointed_blocks"]
    if profiler is not None and profiler.result is not None:
        out["profile"] = profiler.result
    return out


def run_phase(args, script, loader, base: str, phase: int, prompts_file, meter: Meter) -> dict:
    argv = script_argv(args, base, phase, prompts_file)
    meter.reset()
    gc_.free()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with DevicePeak() as dev_peak:
        meter.device_peak = dev_peak
        outcome = run_script(args, script, loader, argv, meter)
    wall = time.perf_counter() - t0
    if "error" in outcome:
        outcome.update(argv=argv, run_wall_s=round(wall, 1), peak_allocated_gib=gc_.mem()["peak_gib"])
        outcome["peak_device_gib"] = gc_.gib(dev_peak.peak)
        gc_.free()
        return outcome
    for ckpt in pathlib.Path(args.output_dir).glob("checkpoint-*"):  # ~10 GB each at full size; the experts stay
        shutil.rmtree(ckpt)
    history = json.loads((pathlib.Path(args.output_dir) / "logs" / "history.json").read_text())
    if phase is None:  # --one_run: every phase in one script call, summarised per phase
        out = {str(k): _one_run_phase(args, [r for r in history if int(r["phase"]) == k]) for k in args.phases}
        shared = {"argv": argv, "run_wall_s": round(wall, 1), "peak_allocated_gib": gc_.mem()["peak_gib"]}
        shared.update(peak_device_gib=gc_.gib(dev_peak.peak), **outcome)
        for row in out.values():
            row.update(shared)
        print("one run", json.dumps({k: {n: v for n, v in r.items() if n != "argv"} for k, r in out.items()}))
        return out
    rows = [r for r in history if int(r["phase"]) == phase]
    times = [r["step_seconds"] for r in rows]
    # the first update compiles and warms up; with --profile the second runs under torch.profiler: both are left out
    steady = times[2 if args.profile and len(times) > 2 else 1 :] or times
    per_update = statistics.median(steady)
    n = len(rows)
    flops = (meter.flops["forward"] + meter.flops["backward"]) / n
    out = {
        "argv": argv,
        "updates": n,
        "step_seconds": [round(t, 3) for t in times],
        "seconds_per_update": round(per_update, 3),
        "run_wall_s": round(wall, 1),
        "peak_allocated_gib": gc_.mem()["peak_gib"],
        "peak_device_gib": gc_.gib(dev_peak.peak),
        "forwards_per_update": {k: v / n for k, v in meter.counts.items()},
        "model_tflop_per_update": round(flops / 1e12, 2),
        "shapes": sorted(meter.tokens),
        "final_dmd_loss": rows[-1].get("dmd_loss"),
        "final_fake_loss": rows[-1].get("fake_loss"),
    }
    rate = args.matmul_tflops
    out["mfu"] = flops / per_update / (rate * 1e12) if rate == rate else float("nan")
    out.update(outcome)
    print(f"phase {phase}", json.dumps({k: v for k, v in out.items() if k != "argv"}), flush=True)
    return out


def _one_run_phase(args, rows: list) -> dict:
    """A phase of a `--one_run` call: its updates' times (the first of each phase compiles its own variants); the
    hooks' FLOPs are not split by phase, so no MFU."""
    times = [r["step_seconds"] for r in rows]
    steady = times[2 if args.profile and len(times) > 2 else 1 :] or times
    return {
        "updates": len(rows),
        "step_seconds": [round(t, 3) for t in times],
        "seconds_per_update": round(statistics.median(steady), 3) if steady else float("nan"),
        "forwards_per_update": None,
        "model_tflop_per_update": float("nan"),
        "mfu": float("nan"),
        "final_dmd_loss": rows[-1].get("dmd_loss") if rows else None,
        "final_fake_loss": rows[-1].get("fake_loss") if rows else None,
    }


def fp8_check(args) -> dict:
    """One teacher forward of a freshly built transformer: base stored in fp8 (compute bf16) against bf16."""
    from diffusers_pdmd.training import adapters as ad

    if args.tiny:
        model = gc_.build_train_pipeline(args.model, True).transformer.to(torch.bfloat16)
    else:  # only the (first) transformer, built on the device
        import diffusers

        config = {
            "qwen": gc_.QWEN_IMAGE_TRANSFORMER,
            "wan-a14b": gc_.WAN22_A14B_TRANSFORMER,
            "wan-ti2v-5b": gc_.WAN22_TI2V_5B_TRANSFORMER,
        }[args.model]
        cls = diffusers.QwenImageTransformer2DModel if args.model == "qwen" else diffusers.WanTransformer3DModel
        torch.manual_seed(0)
        with gc_.build_context():
            model = cls(**config).eval()
    h, w, f = (gc_.TRAIN_SIZES_TINY if args.tiny else gc_.TRAIN_SIZES)[args.model]
    g = torch.Generator(gc_.device()).manual_seed(0)
    cfg = model.config
    if args.model == "qwen":
        tokens, text_len = (h // 16) * (w // 16), 64
        kwargs = {
            "hidden_states": torch.randn(1, tokens, cfg.in_channels, generator=g, device=gc_.device()),
            "encoder_hidden_states": torch.randn(
                1, text_len, cfg.joint_attention_dim, generator=g, device=gc_.device()
            ),
            "encoder_hidden_states_mask": None,
            "timestep": torch.tensor([0.9], device=gc_.device()),
            "img_shapes": [[(1, h // 16, w // 16)]],
        }
    else:
        scale = 16 if args.model == "wan-ti2v-5b" else 8
        latent = (1, cfg.in_channels, (f - 1) // 4 + 1, h // scale, w // scale)
        kwargs = {
            "hidden_states": torch.randn(*latent, generator=g, device=gc_.device()),
            "encoder_hidden_states": torch.randn(
                1, 512 if not args.tiny else 16, cfg.text_dim, generator=g, device=gc_.device()
            ),
            "timestep": torch.tensor([900.0], device=gc_.device()),
        }
    kwargs = {
        k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in kwargs.items()
    }

    def forward():
        with torch.no_grad():
            return model(**kwargs, return_dict=False)[0].float()

    ref = forward()
    t_bf16 = gc_.time_ms(forward, reps=3, warmup=1)["ms"]
    mem_bf16 = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    ad.store_base_in_fp8(model)
    out = forward()
    t_fp8 = gc_.time_ms(forward, reps=3, warmup=1)["ms"]
    mem_fp8 = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    res = {
        "relative_error": float((out - ref).norm() / ref.norm()),
        "max_abs_error": float((out - ref).abs().max()),
        "forward_ms_bf16": round(t_bf16, 1),
        "forward_ms_fp8": round(t_fp8, 1),
        "allocated_gib_bf16": gc_.gib(mem_bf16),
        "allocated_gib_fp8": gc_.gib(mem_fp8),
    }
    model = ref = out = None
    gc_.free()
    print("fp8 check", json.dumps(res), flush=True)
    return res


def run(args) -> dict:
    res = {"env": {**gc_.environment(), "tiny": args.tiny}, "model": args.model, "extra": args.extra}
    res["ceilings"] = gc_.ceilings(args.tiny)
    args.matmul_tflops = res["ceilings"]["matmul_tflops"]
    print("ceilings", res["ceilings"], flush=True)
    out = pathlib.Path(args.output_dir)
    if out.exists() and args.fresh_output:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts_file = out.parent / f"{out.name}-prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    script = load_script(SCRIPTS[args.model])
    meter = Meter()
    family = gc_.TRAIN_FAMILIES[args.model]
    if args.model == "wan-i2v-a14b":  # the first frame of every sample (`--image`)
        from PIL import Image

        h, w, _ = (gc_.TRAIN_SIZES_TINY if args.tiny else gc_.TRAIN_SIZES)[args.model]
        pixels = torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(prompts_file.parent / f"{prompts_file.stem}-first-frame.png")

    if args.model == "qwen":
        base = pathlib.Path(args.base_dir)
        if not (base / "model_index.json").is_file():
            t0 = time.perf_counter()
            pipe = gc_.build_train_pipeline(args.model, args.tiny)
            res["build_s"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            pipe.save_pretrained(base, safe_serialization=True)
            res["save_s"] = round(time.perf_counter() - t0, 1)
            pipe = None
            gc_.free()
        from diffusers_pdmd.training.distill import load_base_pipeline

        def loader(script_args, dtype):  # the script's own loader, then the hooks
            return meter.attach(load_base_pipeline(script_args, dtype))

        base_name = str(base)
    else:
        state = {}

        def loader(script_args, dtype):
            state["pipe"] = None  # free the previous phase's pipeline (its adapters) before building a new one
            gc_.free()
            t0 = time.perf_counter()
            state["pipe"] = gc_.build_train_pipeline(args.model, args.tiny, in_cpu_memory=args.base_in_cpu_memory)
            res.setdefault("build_s", round(time.perf_counter() - t0, 1))
            # a user's run loads the base into CPU memory: the peaks count from here, not the bf16 build on the GPU
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            meter.device_peak.peak = 0
            return meter.attach(state["pipe"])

        # the script reads the base's config files before loading (the memory plan): a folder of them, no weights
        config_base = out.parent / f"{out.name}-config-base"
        if args.tiny:
            from diffusers_pdmd import tiny

            tiny.save_pipeline(family, config_base)
        else:
            gc_.write_config_base(family, config_base)
        base_name = str(config_base)

    if args.cap_gib is not None and torch.cuda.is_available():  # a smaller card: cap this process's allocator
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
    res["cap_gib"] = args.cap_gib
    res["phases"] = {}
    if args.one_run:  # the script's default: every phase in one call (`--phases` lists them for the summary)
        outcome = run_phase(args, script, loader, base_name, None, prompts_file, meter)
        res["phases"] = outcome if "error" not in outcome else {"all": outcome}
        res["one_run"] = True
        gc_.save_json(args.out, res)
    for phase in args.phases if not args.one_run else ():
        res["phases"][str(phase)] = run_phase(args, script, loader, base_name, phase, prompts_file, meter)
        gc_.save_json(args.out, res)  # a run cut short keeps the phases it finished
    meter.detach()
    loader = None
    gc_.free()
    if args.fp8_check:
        res["fp8_check"] = fp8_check(args)
    if (out / "phased_dmd_config.json").is_file():
        config = json.loads((out / "phased_dmd_config.json").read_text())
        res["experts"] = {"output_dir": str(out.resolve()), "phases": [e["phase"] for e in config["experts"]]}
    return res


def _phase_row(phase: str, r: dict) -> list:
    if "error" in r:
        where = "before loading" if r.get("before_load") else f"after {r['run_wall_s']:.0f} s"
        return [phase, 0, f"stopped {where}", "-", "-", "-", f"{r['peak_allocated_gib']}", f"{r['peak_device_gib']}"]
    fw = r["forwards_per_update"]
    return [
        phase,
        r["updates"],
        f"{r['seconds_per_update']:.2f}",
        f"{fw['forward_no_grad']:.0f} + {fw['forward_grad']:.0f} / {fw['backward']:.0f}" if fw else "one run",
        f"{r['model_tflop_per_update']:.0f}",
        f"{100 * r['mfu']:.1f}%",
        f"{r['peak_allocated_gib']}",
        f"{r['peak_device_gib']}",
    ]


def _plan_lines(res: dict) -> list[str]:
    """The memory plan of each phase (flags it left on, its log line) and the errors, as the script printed them."""
    lines = []
    for phase, r in res["phases"].items():
        if r.get("memory_plan"):
            lines.append(f"- phase {phase}: {r['memory_plan']}")
        if r.get("flags_after_plan") is not None:
            lines.append(f"  flags when the base loaded: `{' '.join(r['flags_after_plan']) or '(none)'}`")
        if "error" in r:
            lines.append(f"- phase {phase} stopped: `{r['error'][:600]}`")
    return ["", "Memory plan (`--memory auto`) and errors:", "", *lines] if lines else []


def _profile_lines(res: dict) -> list[str]:
    out = []
    for phase, r in res["phases"].items():
        if "profile" in r:
            head = f"Profile of one update (the second) of phase {phase}, `torch.profiler`, kernel time"
            if r.get("updates", 0) <= 2:  # the table's time per update is the profiled one
                head += (
                    ". The table above times this profiled update: the profiler's host overhead slows it, so its"
                    " time and MFU are not those of an unprofiled update"
                )
            out += ["", head + ":", ""]
            steps = r.get("step_seconds") or []
            out.append(gpu_profile.render(r["profile"], update_s=steps[1] if len(steps) > 1 else None))
    return out


def render(res: dict) -> str:
    env, model = res["env"], res["model"]
    rows = [_phase_row(phase, r) for phase, r in res["phases"].items()]
    size = "x".join(str(v) for v in gc_.TRAIN_SIZES[model] if v)
    first = next(iter(res["phases"].values()))
    cap = f", capped at {res['cap_gib']:g} GiB" if res.get("cap_gib") is not None else ""
    lines = [
        f"## Training: {DEVICE_NAMES[model]} {size}, the example script, one GPU{cap}"
        + (f", `{res['extra']}`" if res.get("extra") else ""),
        "",
        f"Device: **{env['device']}** ({gc_.env_line(env)}). Command: `{env['command']}`.",
        "",
        "Random-weight base with the published transformer config in bf16, built on the device"
        + (", saved and loaded by the script from disk" if model == "qwen" else ", handed to the script's loader")
        + f". Script flags: `{' '.join(first['argv'][4:])}` "
        + (
            "(one run training every phase, as the script does by default; its peaks are the run's)."
            if res.get("one_run")
            else "(one run per phase, `--train_phase k`)."
        ),
        "",
        gc_.md_table(
            [
                "phase",
                "updates",
                "s / generator update (+ fakes)",
                "forwards no-grad + grad / backwards",
                "model TFLOP / update",
                "MFU",
                "peak allocated GiB",
                "peak device GiB",
            ],
            rows,
        ),
        "",
        f"Seconds per update: median of the script's `step_seconds` after the first update (warm-up). MFU: model "
        f"FLOPs (analytic, forward + backward through the frozen base, checkpoint recompute not counted) against "
        f"the bf16 matmul rate measured in the same run ({res['ceilings']['matmul_tflops']:.0f} TFLOP/s). Peak "
        "device: `total - free` of `torch.cuda.mem_get_info`, polled (what nvidia-smi shows)"
        + (
            "; under the cap (`torch.cuda.set_per_process_memory_fraction`) the allocator may hold at most the cap."
            if cap
            else "."
        ),
    ]
    lines += _plan_lines(res) + _profile_lines(res)
    if res.get("note"):
        lines += ["", res["note"]]
    if "fp8_check" in res:
        c = res["fp8_check"]
        lines += [
            "",
            f"Base stored in fp8 (`--base_fp8`, layerwise casting, compute bf16), one teacher forward against bf16: "
            f"relative error {c['relative_error']:.4f} (max abs {c['max_abs_error']:.3g}), forward "
            f"{c['forward_ms_fp8']:.0f} ms vs {c['forward_ms_bf16']:.0f} ms, transformer "
            f"{c['allocated_gib_fp8']} GiB vs {c['allocated_gib_bf16']} GiB (random weights).",
        ]
    return "\n".join(lines)


def _argv_value(argv: list[str], flag: str):
    return argv[argv.index(flag) + 1] if flag in argv else None


def _memory_row(res: dict, phase: str, r: dict) -> list[str]:
    """One row of the memory table: family, card (and cap), phase, fake updates, flags, result, time, peaks."""
    env, argv = res["env"], r.get("argv") or []
    card = env["device"].replace("NVIDIA ", "")
    card += f", cap {res['cap_gib']:g} GiB" if res.get("cap_gib") is not None else ", no cap"
    fakes = _argv_value(argv, "--fake_updates_per_step") or "-"
    if "flags_after_plan" in r:
        flags = " ".join(r["flags_after_plan"] or []) or "-"
        flags += f" --uncheckpointed_blocks {r['uncheckpointed_blocks']}" if r.get("uncheckpointed_blocks") else ""
    else:  # recorded before `--memory auto` existed: the memory flags the script ran with
        flags = " ".join(a for a in argv if a.lstrip("-") in PLAN_FLAGS) + " (before `--memory auto`)"
    flags += f", and `{res['extra']}`" if res.get("extra") else ""  # flags passed by hand (`--extra`)
    head = [DEVICE_NAMES[res["model"]], card, phase, fakes, flags]
    if "error" in r:
        what = "stops before loading" if r.get("before_load") else "out of memory while training"
        return [*head, what, "-", "-", "-"]
    peaks = [f"{r['peak_allocated_gib']}", f"{r['peak_device_gib']}"]
    return [*head, "trains", f"{r['seconds_per_update']:.1f}", *peaks]


def render_memory_table(results: list[dict]) -> str:
    """One row per family x card (and cap) x phase from `--cap_gib` runs and uncapped ones: the flags the plan chose,
    time per update and peak memory, or where it stopped; in the order of the families, then the smallest budget."""
    order = list(DEVICE_NAMES)

    def key(res):  # family, budget, then fake updates and flags passed by hand
        budget = res["cap_gib"] if res.get("cap_gib") is not None else res["env"].get("gpu_memory_gib", 1e9)
        argv = next(iter(res["phases"].values())).get("argv") or []
        return (
            order.index(res["model"]),
            budget,
            int(_argv_value(argv, "--fake_updates_per_step") or 0),
            res.get("extra") or "",
        )

    rows = []
    for res in sorted(results, key=key):
        rows += [_memory_row(res, phase, r) for phase, r in sorted(res["phases"].items())]
    header = ["family", "card", "phase", "fake updates", "flags", "result", "s / update", "alloc GiB", "device GiB"]
    return "\n".join(
        [
            "## Training with default flags: the memory plan on each card (`--memory auto`)",
            "",
            "Each row: `benchmarks/gpu_train.py --model M [--cap_gib C]`, one script run per phase (the commands are"
            " in the sections `gpu_train_<model>[_cap<C>]`). A cap is `torch.cuda.set_per_process_memory_fraction`,"
            " standing in for a smaller card (79 GiB: 80 GB class, 44 GiB: 48 GB class); flags: those the script"
            " ran with once the plan had added its own (and any passed by hand). Random weights at the published"
            " configs; time per update: median after the first (compiling) update.",
            "",
            gc_.md_table(header, rows),
        ]
    )


def main(argv=None):
    parser = gc_.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SCRIPTS), default="qwen")
    parser.add_argument("--base_dir", default="/tmp/pdmd-qwen-base", help="Qwen-Image: where the base is saved")
    parser.add_argument("--output_dir", default="/tmp/pdmd-train-out", help="the script's --output_dir (kept)")
    parser.add_argument("--max_train_steps", type=int, default=2, help="generator updates per phase")
    parser.add_argument("--fake_updates_per_step", type=int, default=5)
    parser.add_argument("--phases", type=int, nargs="+", default=[0, 1], help="phases to run, one script call each")
    parser.add_argument("--extra", default="", help='more script flags, one string: --extra "--compile"')
    parser.add_argument("--fp8_check", action="store_true", help="teacher forward, base in fp8 vs bf16")
    parser.add_argument(
        "--base_in_cpu_memory",
        action="store_true",
        help="Wan: hand the script the base in CPU memory, as from_pretrained does (the script places it)",
    )
    parser.add_argument("--keep_output", dest="fresh_output", action="store_false", help="keep --output_dir")
    parser.add_argument("--section", default=None, help="doc section name (default gpu_train_<model>)")
    parser.add_argument(
        "--cap_gib",
        type=float,
        default=None,
        help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction) to stand in for a smaller "
        "card; the Wan base is then handed over in CPU memory",
    )
    parser.add_argument(
        "--one_run",
        action="store_true",
        help="run the script once over every phase (its default), not once per phase with --train_phase",
    )
    parser.add_argument(
        "--profile", action="store_true", help="torch.profiler on the second update of each phase: where the time goes"
    )
    parser.add_argument(
        "--memory_table",
        nargs="+",
        default=None,
        help="only render the family x cap table (section gpu_train_memory) from these result JSON files",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv[:-1]):  # `--extra "--compile"`: the value starts with dashes, argparse needs `=`
        if a == "--extra":
            argv[i : i + 2] = [f"--extra={argv[i + 1]}"]
            break
    args = parser.parse_args(argv)
    if args.from_json:  # re-render the doc section of a result that came back from the GPU machine
        res = gc_.load_json(args.from_json)
        section = args.section or res.get("section", f"{NAME}_{res['model']}")  # --section: a name of its own
        gc_.write_section(args.doc, section, render(res))
        print(render(res))
        return res
    if args.memory_table:
        markdown = render_memory_table([gc_.load_json(f) for f in args.memory_table])
        gc_.write_section(args.doc, f"{NAME}_memory", markdown)
        print(markdown)
        return markdown
    if args.profile and args.max_train_steps < 2:
        raise ValueError("`--profile` records the second update of a phase: pass `--max_train_steps 2` or more.")
    if args.cap_gib is not None:
        args.base_in_cpu_memory = True  # a user's from_pretrained leaves the base in CPU memory
    if args.tiny:
        args.base_dir = str(pathlib.Path(args.output_dir).parent / (pathlib.Path(args.output_dir).name + "-base"))
    res = run(args)
    cap = f"_cap{args.cap_gib:g}" if args.cap_gib is not None else ""
    res["section"] = args.section or f"{NAME}_{args.model}{cap}"
    gc_.finish(args, res["section"], res, render)
    return res


if __name__ == "__main__":
    main()
