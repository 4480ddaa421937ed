"""Sampling at full speed: no host synchronisation in the denoising loop, merged experts run bare `Linear`s,
`expert_swap_mode="auto"`, `release()` gives the base back, torch.compile does not recompile across swaps."""

import contextlib

import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from diffusers_pdmd import PhasedDMDScheduler, tiny
from diffusers_pdmd.pipelines import ExpertSwitcher, PhasedMoEPipeline
from diffusers_pdmd.pipelines import expert_swap as es


pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")

GIB = 2**30
QWEN = {"height": 32, "width": 32}
WAN = {"height": 16, "width": 16, "num_frames": 5}
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(module, name, seed, **config):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=4, target_modules=list(TARGETS), init_lora_weights=False, **config)
        module.add_adapter(config, adapter_name=name)


def qwen_pipe(experts, dtype=torch.float32, adapters=("a", "b"), **lora):
    components = tiny.build_components("qwen-image")
    for k, name in enumerate(adapters):
        add_lora(components["transformer"], name, seed=k, **lora)
    scheduler = PhasedDMDScheduler.from_config(
        components["scheduler"].config,
        phase_boundaries=[0.7, 0.4][: len(experts) - 1],
        steps_per_phase=[1] * len(experts),
    )
    pipe = PhasedMoEPipeline(**{**components, "scheduler": scheduler}, experts=experts).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_pipe():
    components = tiny.build_components("wan2.2-t2v-a14b")
    add_lora(components["transformer"], "high", seed=1)
    add_lora(components["transformer_2"], "low", seed=2)
    scheduler = PhasedDMDScheduler.from_config(
        components["scheduler"].config, phase_boundaries=[0.87], steps_per_phase=[1, 1]
    )
    pipe = PhasedMoEPipeline(
        **{**components, "scheduler": scheduler}, experts=[("transformer", "high"), ("transformer_2", "low")]
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, seed=0, **kwargs):
    size = QWEN if pipe.config.family == "qwen-image" else WAN
    out = pipe("a cat", generator=torch.Generator().manual_seed(seed), output_type="latent", **size, **kwargs)
    return (out.images if pipe.config.family == "qwen-image" else out.frames).float()


def snapshot(pipe):
    """Every parameter of the transformers (base weights and LoRA factors), by name, cloned."""
    return {
        (slot, name): p.detach().clone()
        for slot in ("transformer", "transformer_2")
        if getattr(pipe, slot, None) is not None
        for name, p in getattr(pipe, slot).named_parameters()
    }


def tuner_layers(module):
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


# ------------------------------------------------------------------------------------------- no host sync


class _HostReads(TorchDispatchMode):
    """Records every read of a tensor value by the host (`.item()`, `float(t)`, `bool(t)`, `.tolist()`)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


class _HostCopies(TorchFunctionMode):
    """Records `.cpu()` / `.numpy()` / `.tolist()` / `.item()` on tensors (all tensors live on the CPU here, so the
    copy itself would not show as a device-to-host transfer)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("cpu", "numpy", "tolist", "item"):
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["auto", "delta", "adapter"])
def test_denoising_loop_never_reads_a_tensor_on_the_host(monkeypatch, mode):
    """Inside the denoising loop (the progress bar's `with` block) nothing reads a tensor value on the host or
    copies one there: the phases and sigmas come from the CPU schedule made before the loop."""
    pipe = qwen_pipe([("transformer", "a"), ("transformer", None), ("transformer", "b")])
    pipe.expert_swap_mode = mode
    reads, copies = _HostReads(), _HostCopies()
    progress_bar = PhasedMoEPipeline.progress_bar

    @contextlib.contextmanager
    def watched(self, *args, **kwargs):
        with progress_bar(self, *args, **kwargs) as bar, reads, copies:
            yield bar

    monkeypatch.setattr(PhasedMoEPipeline, "progress_bar", watched)
    call(pipe)
    call(pipe)  # the second call swaps back to the first expert inside the loop
    assert pipe.expert_switcher.num_swaps == 2
    assert reads.reads == 0
    assert copies.calls == []


def test_the_watch_sees_a_host_read():
    """The watch of the test above does catch the reads it is for."""
    reads, copies = _HostReads(), _HostCopies()
    t = torch.tensor([0.5, 0.25])
    with reads, copies:
        float(t[0]), t[1].item(), t.cpu()
    assert reads.reads == 2 and copies.calls == ["item", "cpu"]


# ------------------------------------------------------------------------------------------- merged = bare Linear


@pytest.mark.parametrize("mode", ["resident", "delta"])
def test_merged_layers_run_their_base_linear_until_release(mode):
    pipe = qwen_pipe([("transformer", "a"), ("transformer", "b")])
    pipe.expert_swap_mode = mode
    wrappers = tuner_layers(pipe.transformer)
    call(pipe)
    assert tuner_layers(pipe.transformer) == []  # no peft wrapper left in the forward path
    linears = [m for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert {id(w.get_base_layer()) for w in wrappers} <= {id(m) for m in linears}
    pipe.release_experts()
    assert tuner_layers(pipe.transformer) == wrappers  # the same wrappers, in the same slots


# ------------------------------------------------------------------------------------------- release


MIXES = {
    "all_lora": [("transformer", "a"), ("transformer", "b")],
    "lora_base_lora": [("transformer", "a"), ("transformer", None), ("transformer", "b")],
    "base_lora": [("transformer", None), ("transformer", "b")],
}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("mode", ["resident", "delta", "adapter", "peft", "auto"])
def test_release_restores_the_base_and_the_adapters(mode, mix):
    """After calls in any mode and a release, every base weight and LoRA factor is what it was (bitwise; delta in
    fp32 within the rounding of the walk back), and an adapter-mode call gives what it gives on a fresh pipeline."""
    pipe = qwen_pipe(MIXES[mix])
    before = snapshot(pipe)
    pipe.expert_swap_mode = "adapter"
    want = call(pipe)
    pipe.expert_swap_mode = mode
    pipe._swap_memory = (100 * GIB, 100 * GIB)  # "auto": the copies fit, resident
    merged = call(pipe)
    call(pipe, seed=1)
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=1e-5)
    pipe.release_experts()
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        if mode == "delta":
            torch.testing.assert_close(after[key], value, atol=1e-6, rtol=0)
        else:
            assert torch.equal(after[key], value), key
    pipe.expert_swap_mode = "adapter"
    tol = 1e-5 if mode == "delta" else 0
    torch.testing.assert_close(call(pipe), want, atol=tol, rtol=tol)


def test_release_after_resident_with_every_phase_a_lora_is_bitwise_in_bf16():
    """The case that stayed merged before: every phase a LoRA expert, resident mode, bf16 weights."""
    pipe = qwen_pipe(MIXES["all_lora"], dtype=torch.bfloat16)
    before = snapshot(pipe)
    pipe.expert_swap_mode = "resident"
    call(pipe)
    pipe.release_experts()
    for key, value in snapshot(pipe).items():
        assert torch.equal(value, before[key]), key


def test_release_after_delta_in_bf16_is_within_the_documented_rounding():
    """Delta walks back along the same fp32 products: each weight ends within four bf16 roundings (`eps * |x|`) of
    the largest value it took on the way (`|W| + |s_a B_a A_a| + |s_b B_b A_b|` bounds them)."""
    pipe = qwen_pipe(MIXES["lora_base_lora"], dtype=torch.bfloat16)
    layers = tuner_layers(pipe.transformer)
    base = [m.get_base_layer().weight.detach().float().clone() for m in layers]
    scale = [
        w.abs() + sum((m.lora_B[n].weight.float() @ m.lora_A[n].weight.float()).abs() * m.scaling[n] for n in "ab")
        for m, w in zip(layers, base)
    ]
    pipe.expert_swap_mode = "delta"
    for seed in range(3):
        call(pipe, seed=seed)
    pipe.release_experts()
    eps = torch.finfo(torch.bfloat16).eps
    for m, w, bound in zip(layers, base, scale):
        error = (m.get_base_layer().weight.float() - w).abs()
        assert (error <= 4 * eps * bound).all()  # measured: at most 2.5
    assert max((m.get_base_layer().weight.float() - w).abs().max() for m, w in zip(layers, base)) > 0  # it rounds


def test_release_restores_both_a14b_transformers():
    pipe = wan_pipe()
    before = snapshot(pipe)
    for mode in ("resident", "delta", "auto"):
        pipe.expert_swap_mode = mode
        call(pipe)
    pipe.release_experts()
    for key, value in snapshot(pipe).items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)
    assert tuner_layers(pipe.transformer) and tuner_layers(pipe.transformer_2)


def test_to_and_save_release_merged_experts(tmp_path):
    pipe = qwen_pipe(MIXES["all_lora"])
    before = snapshot(pipe)
    want = call(pipe)
    pipe.to("cpu")  # moving the modules gives the base back first; the next call merges again
    assert pipe._switcher is None and tuner_layers(pipe.transformer)
    torch.testing.assert_close(call(pipe), want, atol=0, rtol=0)
    pipe.save_pretrained(tmp_path / "experts", experts_only=True, base_model="tiny")
    for key, value in snapshot(pipe).items():
        assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------------------------------- auto


def test_auto_picks_resident_when_the_copies_fit_else_delta():
    pipe = qwen_pipe(MIXES["all_lora"])
    experts = [(pipe.transformer, "a"), (pipe.transformer, "b")]
    per_copy = sum(
        m.get_base_layer().weight.nbytes for m in tuner_layers(pipe.transformer) if isinstance(m, torch.nn.Module)
    )
    # Two LoRA experts on one module, no base phase: one copy beyond the base's own storage.
    assert es.resident_extra_bytes(experts) == per_copy
    with_base = [(pipe.transformer, "a"), (pipe.transformer, None), (pipe.transformer, "b")]
    assert es.resident_extra_bytes(with_base) == 2 * per_copy
    total = 100 * GIB
    margin = int(es.RESIDENT_MARGIN_FRACTION * total)
    assert es.choose_swap_mode(experts, per_copy + margin, total)[0] == "resident"
    assert es.choose_swap_mode(experts, per_copy + margin - 1, total)[0] == "resident+delta"
    assert es.choose_swap_mode(experts, margin, total)[0] == "delta"
    switcher = ExpertSwitcher(experts, mode="auto", memory=(margin, total))
    assert switcher.mode == "delta" and "do not fit" in switcher.mode_reason
    switcher.release()


def test_auto_splits_layers_between_resident_copies_and_deltas_when_part_fits():
    """Half the copies fit: the first layers get resident copies, the others in-place deltas; the outputs are the
    unfused adapters', and release gives the base back (bitwise for the resident layers)."""
    pipe = qwen_pipe(MIXES["lora_base_lora"])
    before = snapshot(pipe)
    weights = {id(m): m.get_base_layer().weight.detach().clone() for m in tuner_layers(pipe.transformer)}
    pipe.expert_swap_mode = "adapter"
    want = [call(pipe, seed=s) for s in range(2)]
    experts = [(pipe.transformer, "a"), (pipe.transformer, None), (pipe.transformer, "b")]
    need = es.resident_extra_bytes(experts)
    total = 100 * GIB
    pipe._swap_memory = (need // 2 + int(es.RESIDENT_MARGIN_FRACTION * total), total)
    pipe.expert_swap_mode = "auto"
    got = [call(pipe, seed=s) for s in range(2)]
    switcher = pipe.expert_switcher
    assert switcher.mode == "resident+delta" and "part of the merged copies fit" in switcher.mode_reason
    (engine,) = switcher._merged.values()
    resident, delta = engine.engines
    assert len(resident.layers) > 0 and len(delta.layers) > 0
    assert resident.extra_bytes() <= need // 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    pipe.release_experts()
    for key, value in snapshot(pipe).items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)
    for layer in resident.layers:
        assert torch.equal(layer.get_base_layer().weight, weights[id(layer)])


def test_auto_is_the_default_resolves_once_and_logs_once(monkeypatch):
    pipe = qwen_pipe(MIXES["all_lora"])
    assert pipe.expert_swap_mode == "auto"
    messages = []
    monkeypatch.setattr("diffusers_pdmd.pipelines.pipeline_phased_moe.logger.info", messages.append)
    pipe._swap_memory = (0, 100 * GIB)  # no free memory: delta
    call(pipe)
    call(pipe)
    assert pipe.expert_switcher.mode == "delta"
    assert len(messages) == 1 and "'delta'" in messages[0]
    pipe.release_experts()
    pipe._swap_memory = (100 * GIB, 100 * GIB)
    call(pipe)
    assert pipe.expert_switcher.mode == "resident" and len(messages) == 2


def test_auto_keeps_unfused_adapters_where_merging_is_impossible():
    pipe = qwen_pipe(MIXES["all_lora"], use_dora=True)  # DoRA: no plain B @ A delta
    experts = [(pipe.transformer, "a"), (pipe.transformer, "b")]
    assert es.choose_swap_mode(experts, 100 * GIB, 100 * GIB)[0] == "adapter"

    pipe = qwen_pipe(MIXES["all_lora"])
    experts = [(pipe.transformer, "a"), (pipe.transformer, "b")]
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    mode, reason = es.choose_swap_mode(experts, 100 * GIB, 100 * GIB)
    assert mode == "adapter" and "cannot take a merged weight" in reason
    call(pipe)  # and the pipeline runs with the fp8-stored base
    assert pipe.expert_switcher.mode == "adapter"

    pipe = qwen_pipe(MIXES["all_lora"])
    experts = [(pipe.transformer, "a"), (pipe.transformer, "b")]
    pipe.transformer.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    assert es.choose_swap_mode(experts, 100 * GIB, 100 * GIB)[0] == "adapter"


# ------------------------------------------------------------------------------------------- torch.compile


def _frames_compiled():
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


@pytest.mark.parametrize(("mode", "kind"), [("resident", "regional"), ("delta", "regional"), ("resident", "full")])
def test_swaps_do_not_recompile(mode, kind):
    """After a warm-up call, further calls, each swapping experts (pointer flips or in-place deltas), compile
    nothing new, and give what the uncompiled pipeline gives."""
    torch._dynamo.reset()
    pipe = qwen_pipe(MIXES["lora_base_lora"])
    pipe.expert_swap_mode = mode
    want = [call(pipe, seed=s) for s in range(3)]
    if kind == "regional":
        pipe.transformer.compile_repeated_blocks(backend="eager")
    else:
        pipe.transformer.compile(backend="eager")
    first = call(pipe, seed=0)
    warm = _frames_compiled()
    assert warm > 0  # it did compile
    again = [call(pipe, seed=s) for s in (1, 2)]
    assert _frames_compiled() == warm
    assert pipe.expert_switcher.num_swaps == 2
    for got, expected in zip([first, *again], want):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_auto_falls_back_to_delta_when_the_resident_copies_run_out_of_memory(monkeypatch):
    """The free-memory figure was optimistic: the resident copies fail half-way, the base weights already turned
    into copies are put back, and "auto" merges with in-place deltas instead."""
    from diffusers_pdmd.pipelines import lora_delta

    pipe = qwen_pipe(MIXES["all_lora"])
    before = snapshot(pipe)
    want = call(pipe)  # resident (conftest: 64 GiB free)
    pipe.release_experts()
    made, scaled = [], lora_delta._scaled_factors

    def scarce(layer, adapter, sign, dtype):
        made.append(adapter)
        if len(made) == 6:  # two adapters per layer: out of memory at the third layer (once)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return scaled(layer, adapter, sign, dtype)

    monkeypatch.setattr(lora_delta, "_scaled_factors", scarce)
    with pytest.raises(torch.OutOfMemoryError):
        ExpertSwitcher([(pipe.transformer, "a"), (pipe.transformer, "b")], mode="resident")
    for key, value in snapshot(pipe).items():
        assert torch.equal(value, before[key]), key
    made.clear()
    got = call(pipe)
    assert pipe.expert_switcher.mode == "delta" and "ran out of memory" in pipe.expert_switcher.mode_reason
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
