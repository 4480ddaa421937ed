"""Where the time of one training update goes: `benchmarks/gpu_train.py --profile`.

The example script runs as usual; `torch.profiler` records only its second generator update (the first compiles),
started and stopped at the update's own synchronised clock reads (`distill._synchronized_clock`, read at the start
and the end of every update). Each CUDA kernel's time is charged to the operator that launched it and sorted
into categories:

- `optimizer`: inside `Optimizer.step` (fused AdamW, gradient clipping's norms are `other`);
- `attention`: scaled-dot-product / flash / cuDNN / efficient attention kernels;
- `LoRA side paths`: matmuls whose weight-side operand has a dimension equal to the LoRA rank (`x A^T`,
  `(x A^T) B^T`, the input gradients through both and `B`'s gradient), from the recorded input shapes; `A`'s
  gradient (`g^T x`, the rank on the other operand, as in a text-stream matmul over as many tokens as the rank)
  counts under `base matmuls`;
- `base matmuls`: the other matmuls (the frozen linears, forward and input gradients);
- `compiled (fused) kernels`: Triton kernels of the compiled blocks (norms, modulation, RoPE, activations, casts);
- `copies`, `other`: copies / dtype casts launched eagerly, the rest.

Orthogonally, `recompute` is the kernel time inside gradient checkpointing's recomputation (marked by wrapping
`torch.utils.checkpoint`'s recompute function in a `record_function`), and `launch gaps` is the update's wall time
(between the update's own synchronised clock reads, before the profiler stops and flushes) minus the time the GPU was
busy with at least one kernel (union of the kernel intervals; the GPU-side ranges of `record_function`s, user
annotations, are not kernels and are left out): host overhead, syncs, waits. `kernels` counts the update's kernel
launches.

Results recorded before 2026-12-06 (no `kernels` key) took the wall time after the profiler's stop and counted the
annotation ranges as busy: for them `render` takes the update's wall time from the script's clock and the kernel
time charged to operators as the busy time (an upper bound of the gaps).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


RECOMPUTE = "pdmd::recompute"
CATEGORIES = (
    "base matmuls",
    "LoRA side paths",
    "attention",
    "compiled (fused) kernels",
    "optimizer",
    "copies",
    "other",
)
_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_scaled_mm")
_ATTENTION = ("attention", "flash", "sdpa", "fmha", "cudnn_attn")
_COMPILED = ("CompiledFunction", "Torch-Compiled Region", "triton_", "CompiledFxGraph", "inductor")
_COPIES = ("aten::copy_", "aten::to", "aten::_to_copy", "Memcpy", "aten::clone", "aten::contiguous")


def categorize(chain: list[str], shapes, rank: int) -> str:
    """Category of an operator's own kernel time; `chain` is its name then its ancestors' names (innermost first),
    `shapes` its recorded input shapes."""
    if any(n.startswith("Optimizer.step") for n in chain):
        return "optimizer"
    name = chain[0]
    if any(k in name.lower() for k in _ATTENTION):
        return "attention"
    if name in _MATMUL:
        return "LoRA side paths" if rank in _weight_shape(name, shapes) else "base matmuls"
    if any(k in name for k in _COMPILED):
        return "compiled (fused) kernels"
    if name in _COPIES:
        return "copies"
    return "other"


def _weight_shape(name: str, shapes) -> list:
    """Shape of a matmul's weight-side operand: `linear(x, W)`, `mm(a, b)`, `addmm(bias, a, b)`, `bmm(a, b)`."""
    shapes = [s for s in shapes or [] if isinstance(s, list | tuple)]
    index = 2 if name == "aten::addmm" else 1
    return list(shapes[index]) if len(shapes) > index else []


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of `(start, end)` intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def _chain(event) -> list[str]:
    out = []
    while event is not None:
        out.append(event.name)
        event = event.cpu_parent
    return out


def profile_table(events, rank: int, wall_us: float, on_gpu: bool) -> dict:
    """Milliseconds per category, recompute, busy and gap time of the recorded `events` (`prof.events()`).

    On a CPU (`on_gpu=False`, the `--tiny` logic check) operators' own CPU time stands in for kernel time.
    """
    from torch.autograd import DeviceType

    per, recompute, kernels = defaultdict(float), 0.0, []
    for e in events:
        if e.device_type != DeviceType.CPU:
            if not getattr(e, "is_user_annotation", False):  # a record_function's GPU-side range is no kernel
                kernels.append((e.time_range.start, e.time_range.end))
            continue
        t = e.self_device_time_total if on_gpu else e.self_cpu_time_total
        if t <= 0:
            continue
        chain = _chain(e)
        per[categorize(chain, e.input_shapes, rank)] += t
        if RECOMPUTE in chain:
            recompute += t
    busy = busy_time(kernels) if on_gpu else sum(per.values())
    return {
        "wall_ms": wall_us / 1e3,
        "busy_ms": busy / 1e3,
        "launch_gaps_ms": max(wall_us - busy, 0.0) / 1e3,
        "kernels": len(kernels),
        "recompute_ms": recompute / 1e3,
        "categories_ms": {c: per.get(c, 0.0) / 1e3 for c in CATEGORIES},
    }


@contextlib.contextmanager
def mark_recompute():
    """Wrap gradient checkpointing's recomputation (non-reentrant `torch.utils.checkpoint`) in a `record_function`."""
    import torch.utils.checkpoint as cp

    original = cp._CheckpointFrame.__init__

    def init(self, recompute_fn, *args, **kwargs):
        def marked(*a, **k):
            with torch.profiler.record_function(RECOMPUTE):
                return recompute_fn(*a, **k)

        original(self, marked, *args, **kwargs)

    cp._CheckpointFrame.__init__ = init
    try:
        yield
    finally:
        cp._CheckpointFrame.__init__ = original


class UpdateProfiler:
    """Records the second generator update of a script run: patches `distill._synchronized_clock` (read at the
    start and the end of each update) to start the profiler when the second update starts and stop it when it ends
    (the device synchronised: all its kernels are in)."""

    def __init__(self, rank: int):
        self.rank, self.calls, self.result = rank, 0, None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True)

    @contextlib.contextmanager
    def around(self):
        from diffusers_pdmd.training import distill

        clock = distill._synchronized_clock

        def patched(device):
            now = clock(device)
            self.calls += 1
            if self.calls == 3:  # the second update starts (the first compiled): record it
                self.prof.start()
                self.started = time.perf_counter()
            elif self.calls == 4:  # it ended, the device synchronised: its wall time, before the profiler's flush
                wall_us = (time.perf_counter() - self.started) * 1e6
                self.prof.stop()
                self.result = profile_table(self.prof.events(), self.rank, wall_us, torch.cuda.is_available())
            return now

        distill._synchronized_clock = patched
        try:
            with mark_recompute():
                yield self
        finally:
            distill._synchronized_clock = clock


def render(p: dict, update_s: float | None = None) -> str:
    """The profile as a markdown table (share of the update's wall time). `update_s`: the profiled update's wall time
    from the script's clock, used for results recorded before the accounting fix (module docstring)."""
    if "kernels" not in p:  # recorded before the fix: wall after the profiler's flush, annotation ranges as busy
        wall = 1e3 * update_s if update_s else p["wall_ms"]
        gaps = max(wall - sum(p["categories_ms"].values()), 0.0)
        gap_name = "the rest: GPU idle (launch gaps, syncs), at most"
    else:
        wall, gaps, gap_name = p["wall_ms"], p["launch_gaps_ms"], "launch gaps (GPU idle)"
    rows = [(c, ms) for c, ms in p["categories_ms"].items()]
    rows += [("of which: recompute (checkpointing)", p["recompute_ms"]), (gap_name, gaps)]
    lines = ["| where | ms | share of the update |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.0f} | {100 * ms / wall:.1f}% |" for name, ms in rows]
    lines.append(f"| **update wall time (profiled)** | {wall:.0f} | 100% |")
    if "kernels" in p:
        lines.append(f"\n{p['kernels']} kernels in the update.")
    return "\n".join(lines)
