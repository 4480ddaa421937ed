"""Several GPUs: the example training scripts on 1 GPU against 2 / 4 GPUs (DDP, FSDP2, context parallelism).

Every run is the public path: `accelerate launch [--config_file examples/phased_dmd/configs/fsdp2_lora.yaml]
examples/phased_dmd/train_phased_dmd_<family>.py ...` with the same seed; a thin observer (this file, `--_worker`)
records the wall time and the peak GPU memory of each generator update (at `Accelerator.log`, once per step).

Modes (`--modes`), each against one GPU seeing the same samples:

- `ddp`: N data-parallel replicas, batch `--batch` each; reference: 1 GPU with batch N x `--batch`;
- `fsdp2`: the same with the weights, gradients and optimizer states sharded (`fsdp2_lora.yaml`);
- `cp`: DDP with `--context_parallel_degree N`: every GPU runs the same samples, each on 1/N of the tokens (diffusers'
  Ulysses attention); reference: 1 GPU with batch `--batch`;
- `fsdp2-cp`: both (sharded weights, split tokens).

Reported per run: the largest relative deviation of the fake-score and DMD losses from the reference over the steps
(tolerance: 2% and 10% in bf16; the CPU tests, in float32, see 1e-5 and 3%), peak memory per GPU (the largest over
the GPUs), median step time (first step excluded) and samples per second per GPU, also as a fraction of one GPU's.
`NCCL_NVLS_ENABLE=0` (NCCL's NVLink multicast off) is set for every launch.

    # Qwen-Image at half width (60 blocks, 12 heads, 5.5B), 1024x1024: random weights saved first (no network)
    python benchmarks/gpu_multi.py --family qwen-image --make_base /tmp/qwen-half
    NCCL_NVLS_ENABLE=0 python benchmarks/gpu_multi.py --family qwen-image --model /tmp/qwen-half \\
        --resolution 1024 --gpus 2 4 --modes fsdp2 cp fsdp2-cp --steps 3 --out benchmarks/results/multi_qwen.json
    # Wan2.2 A14B at full size (2 x 14.3B), 480x832x81 (32,760 tokens)
    python benchmarks/gpu_multi.py --family wan --make_base /tmp/wan-a14b
    NCCL_NVLS_ENABLE=0 python benchmarks/gpu_multi.py --family wan --model /tmp/wan-a14b \\
        --height 480 --width 832 --num_frames 81 --gpus 2 --modes cp --steps 2 --fake_updates 1 \\
        --out benchmarks/results/multi_wan_x2_cp.json   # then other modes / GPUs with --references_from that JSON
    # CPU logic check: tiny Wan2.2 A14B, 2 gloo processes, every mode (not a measurement)
    python benchmarks/gpu_multi.py --tiny
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "examples" / "phased_dmd"
CONFIGS = SCRIPTS / "configs"
NAME = "gpu_multi"
MODES = ("ddp", "fsdp2", "cp", "fsdp2-cp")
TOLERANCE = {"fake_loss": 0.02, "dmd_loss": 0.10}


# ----------------------------------------------------------------------------------------------------------------
# Worker: runs one example script in this process and records each step's time and peak memory
# ----------------------------------------------------------------------------------------------------------------


def _fsdp_on_cpu(config: str) -> None:
    """accelerate 1.15 turns FSDP off on CPU processes: set what `accelerate launch --config_file` sets on GPUs."""
    import yaml
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    fsdp = yaml.safe_load(open(config))["fsdp_config"]
    renamed = {"fsdp_offload_params": "cpu_offload", "fsdp_version": "fsdp_version"}
    kwargs = {renamed.get(k, k.removeprefix("fsdp_")): v for k, v in fsdp.items()}
    init = Accelerator.__init__

    def patched(self, *args, **kw):
        init(self, *args, **kw)
        AcceleratorState._shared_state["fsdp_plugin"] = FullyShardedDataParallelPlugin(**kwargs)
        for state in (AcceleratorState, PartialState):
            state._shared_state["distributed_type"] = DistributedType.FSDP

    Accelerator.__init__ = patched


def worker(argv: list[str]) -> None:
    import runpy

    import torch
    from accelerate import Accelerator

    out, fsdp_config, script, args = argv[0], argv[1], argv[2], argv[3:]
    if fsdp_config != "-":
        _fsdp_on_cpu(fsdp_config)
    marks, memory = [], []
    log = Accelerator.log

    def observed(self, values, step=None, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            memory.append(torch.cuda.max_memory_allocated() / 2**30)
        marks.append(time.perf_counter())
        return log(self, values, step=step, **kw)

    Accelerator.log = observed
    start = time.perf_counter()
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
    rank = int(os.environ.get("RANK", 0))
    times = [b - a for a, b in zip([start, *marks], marks)]
    Path(f"{out}.{rank}.json").write_text(json.dumps({"step_s": times, "peak_gib": max(memory, default=None)}))


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def launch(mode: str | None, n: int, tiny: bool, port: int, script: Path, args: list[str], out: str) -> list[str]:
    fsdp = mode is not None and mode.startswith("fsdp2")
    config = str(CONFIGS / "fsdp2_lora.yaml")
    me = str(Path(__file__).resolve())
    if tiny:  # gloo processes
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port)]
        return [*head, me, "--_worker", out, config if fsdp else "-", str(script), *args]
    accel = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--main_process_port"]
    accel += [str(port)]
    if fsdp:
        accel += ["--config_file", config]
    elif n > 1:
        accel += ["--multi_gpu", "--mixed_precision", "bf16"]
    else:
        accel += ["--mixed_precision", "bf16"]
    return [*accel, me, "--_worker", out, "-", str(script), *args]


def script_args(a, out_dir: Path, batch: int, degree: int) -> tuple[Path, list[str]]:
    common = [
        "--pretrained_model_name_or_path", a.model, "--prompts", a.prompts, "--seed", "0",
        "--max_train_steps", str(a.steps), "--checkpointing_steps", str(a.steps), "--train_phase", "0",
        "--fake_updates_per_step", str(a.fake_updates), "--train_batch_size", str(batch),
        "--context_parallel_degree", str(degree), "--output_dir", str(out_dir),
    ]  # fmt: skip
    if a.tiny:
        common += ["--max_sequence_length", "16", "--lora_rank", "4", "--lora_alpha", "4", "--learning_rate", "1e-3"]
    else:
        common += ["--mixed_precision", "bf16", "--gradient_checkpointing", "--cache_text_embeddings"]
    if a.family == "qwen-image":
        return SCRIPTS / "train_phased_dmd_qwen_image.py", [*common, "--resolution", str(a.resolution)]
    size = ["--height", str(a.height), "--width", str(a.width), "--num_frames", str(a.num_frames)]
    return SCRIPTS / "train_phased_dmd_wan22.py", [*common, *size]


def run_one(a, mode: str | None, n: int, batch: int, degree: int, work: Path, port: int) -> dict:
    tag = f"{mode or 'one'}-{n}-b{batch}"
    out_dir, record = work / tag, str(work / f"{tag}.obs")
    script, args = script_args(a, out_dir, batch, degree)
    cmd = launch(mode, n, a.tiny, port, script, args, record)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")
    if a.tiny:
        env.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    print(f"[{tag}]", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"mode": mode, "gpus": n, "error": (proc.stdout + proc.stderr)[-4000:]}
    state = json.loads((out_dir / f"checkpoint-{a.steps}" / "training_state.json").read_text())
    ranks = [json.loads(Path(f"{record}.{r}.json").read_text()) for r in range(n)]
    steps = ranks[0]["step_s"][1:] or ranks[0]["step_s"]
    step_s = statistics.median(steps)
    peaks = [r["peak_gib"] for r in ranks if r["peak_gib"] is not None]
    samples = batch * n // degree
    return {
        "mode": mode or "1 GPU",
        "gpus": n,
        "context_parallel_degree": degree,
        "batch_per_gpu": batch,
        "samples_per_step": samples,
        "history": state["history"],
        "step_s": step_s,
        "samples_per_s_per_gpu": samples / step_s / n,
        "peak_gib_per_gpu": max(peaks) if peaks else None,
        "wall_s": time.perf_counter() - t0,
        "command": " ".join(cmd),
    }


# Published transformer configs (Qwen-Image at half width: 12 heads instead of 24), random weights, with the tiny
# text encoder and tokenizer of `diffusers_pdmd.tiny` (the GPU machines have no network; prompts are encoded once,
# `--cache_text_embeddings`) and small VAEs with the real latent layout (Qwen: 16 channels, factor 8; Wan: 16, 8x4).
FULL = {
    "qwen-image": {
        "transformer_kwargs": {"in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
                               "num_attention_heads": 12, "axes_dims_rope": (16, 56, 56)},
        "vae_kwargs": {"z_dim": 16, "dim_mult": [1, 2, 4, 4], "temperal_downsample": [False, True, True]},
    },
    "wan": {
        "transformer_kwargs": {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824,
                               "num_layers": 40, "rope_max_seq_len": 1024},
    },
}  # fmt: skip


def make_base(family: str, folder: str) -> None:
    """Save a random-weight pipeline with the full-size transformer(s) of `family` in bf16 (Wan A14B: ~57 GB)."""
    import torch

    from diffusers_pdmd import tiny

    name = "qwen-image" if family == "qwen-image" else "wan2.2-t2v-a14b"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # Wan A14B in float32 would not fit one GPU
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: minutes
            pipe = tiny.build_pipeline(name, **FULL[family])
    finally:
        torch.set_default_dtype(default)
    pipe.save_pretrained(folder, safe_serialization=True)
    print("saved", folder, sum(p.numel() for p in pipe.transformer.parameters()) / 1e9, "B parameters per transformer")


def deviation(ref: list[dict], other: list[dict], key: str) -> float:
    return max(abs(b[key] - a[key]) / max(abs(a[key]), 1e-12) for a, b in zip(ref, other))


def run(a) -> dict:
    import gpu_common as gc_

    work = Path(a.work_dir or tempfile.mkdtemp(prefix="gpu_multi-"))
    if a.tiny:
        from diffusers_pdmd import tiny

        a.family, a.model = "wan", str(tiny.save_pipeline("wan2.2-t2v-a14b", work / "tiny-wan"))
        a.height = a.width = 16
        a.num_frames, a.gpus, a.steps, a.fake_updates = 5, [2], 2, 2
        prompts = work / "prompts.txt"
        prompts.write_text("a handwritten digit seven\na red cat\na blue house\n")
        a.prompts = str(prompts)
    port, refs, rows = 29650, {}, []
    if a.references_from:  # one-GPU runs of an earlier invocation (same model, size and steps), keyed by batch
        refs = {int(k): v for k, v in json.loads(Path(a.references_from).read_text())["references"].items()}
    for n in a.gpus:
        for mode in a.modes:
            degree = n if mode.endswith("cp") else 1
            ref_batch = a.batch * n // degree
            if ref_batch not in refs:
                refs[ref_batch] = run_one(a, None, 1, ref_batch, 1, work, port)
                port += 1
            row = run_one(a, mode, n, a.batch, degree, work, port)
            port += 1
            ref = refs[ref_batch]
            if "error" not in row and "error" not in ref:
                for key in TOLERANCE:
                    row[f"max_rel_dev_{key}"] = deviation(ref["history"], row["history"], key)
                row["within_tolerance"] = all(row[f"max_rel_dev_{k}"] <= t for k, t in TOLERANCE.items())
                row["throughput_vs_1gpu"] = row["samples_per_s_per_gpu"] / ref["samples_per_s_per_gpu"]
            rows.append(row)
    env = gc_.environment()
    env["tiny"] = a.tiny
    env["nccl_nvls_enable"] = "0"
    return {"env": env, "args": dict(vars(a)), "references": refs, "runs": rows}


def render(results: dict) -> str:
    import gpu_common as gc_

    a = results["args"]
    size = (
        f"{a['resolution']}x{a['resolution']}"
        if a["family"] == "qwen-image"
        else (f"{a['height']}x{a['width']}x{a['num_frames']}")
    )
    lines = [
        "## Several GPUs: measured",
        "",
        f"{a['model']} at {size}, phase 0, {a['steps']} generator updates x {a['fake_updates']} fake updates, "
        f"batch {a['batch']} per GPU, seed 0. {gc_.env_line(results['env'])}; NCCL_NVLS_ENABLE=0.",
        "",
    ]
    rows = []
    for r in [*results["references"].values(), *results["runs"]]:
        if "error" in r:
            rows.append([r["mode"], r["gpus"], "failed", "", "", "", "", "", "", ""])
            continue
        rows.append([
            r["mode"], r["gpus"], r["context_parallel_degree"], r["samples_per_step"],
            r["peak_gib_per_gpu"] if r["peak_gib_per_gpu"] is not None else "-", r["step_s"],
            r["samples_per_s_per_gpu"], r.get("throughput_vs_1gpu", "-"),
            r.get("max_rel_dev_fake_loss", "-"), r.get("max_rel_dev_dmd_loss", "-"),
        ])  # fmt: skip
    header = ["mode", "GPUs", "CP degree", "samples/step", "peak GiB/GPU", "step s", "samples/s/GPU",
              "vs 1 GPU", "max rel. dev. fake loss", "max rel. dev. DMD loss"]  # fmt: skip
    lines.append(gc_.md_table(header, rows))
    lines += ["", f"Tolerances: fake-score loss {TOLERANCE['fake_loss']:.0%}, DMD loss {TOLERANCE['dmd_loss']:.0%}."]
    return "\n".join(lines)


def main(argv=None):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_common as gc_

    parser = gc_.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen-image", choices=["qwen-image", "wan"])
    parser.add_argument("--model", default="Qwen/Qwen-Image")
    parser.add_argument("--prompts", default=str(ROOT / "benchmarks" / "prompts.txt"))
    parser.add_argument("--gpus", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--modes", nargs="+", default=["fsdp2", "cp"], choices=MODES)
    parser.add_argument("--batch", type=int, default=1, help="batch per GPU (per context-parallel group with cp)")
    parser.add_argument("--steps", type=int, default=3, help="generator updates")
    parser.add_argument("--fake_updates", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num_frames", type=int, default=81)
    parser.add_argument("--work_dir", default=None, help="where the runs write (default: a temporary folder)")
    parser.add_argument("--references_from", default=None, help="reuse the one-GPU runs of this results JSON")
    parser.add_argument("--make_base", default=None, help="only save a random-weight full-size base to this folder")
    a = parser.parse_args(argv)
    if a.make_base:
        return make_base(a.family, a.make_base)
    if a.tiny:
        a.modes = list(MODES)
    if gc_.maybe_from_json(a, NAME, render):
        return
    results = run(a)
    gc_.finish(a, NAME, results, render)
    failed = [r for r in results["runs"] if "error" in r or not r.get("within_tolerance", False)]
    for r in failed:
        print(f"[{r['mode']} x{r['gpus']}]", r.get("error", "outside the tolerance"), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_worker":
        worker(sys.argv[2:])
    else:
        sys.exit(main())
