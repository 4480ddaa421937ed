"""The speed and memory options of the example scripts keep the numbers honest (tiny models, CPU).

Each option either gives the reference path's losses to a stated tolerance, or (`--fake_reuse_samples`, which
changes the algorithm) does what its documentation says and nothing else. `benchmarks/gpu_train.py --tiny` runs
whole, and its forward counts match the method's own arithmetic.
"""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_pdmd import tiny


ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "examples" / "phased_dmd"
BENCH = ROOT / "benchmarks"
# prompts of different lengths: the batch of prompts is padded, and the negative prompt ("") is shorter still
PROMPTS = ["a red cat", "a blue house on a hill at night with many small lit windows", "seven"]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    out = {f: tiny.save_pipeline(f, root / f) for f in ("qwen-image", "wan2.2-t2v-a14b")}
    out["prompts"] = root / "prompts.txt"
    out["prompts"].write_text("\n".join(PROMPTS) + "\n")
    return out


def _run(bases, family, out, *extra, steps=1, fakes=1):
    name = "train_phased_dmd_qwen_image" if family == "qwen-image" else "train_phased_dmd_wan22"
    script = _load(SCRIPTS / f"{name}.py", name)
    size = (
        ["--resolution", "32"] if family == "qwen-image" else ["--height", "16", "--width", "16", "--num_frames", "5"]
    )
    argv = [
        "--pretrained_model_name_or_path",
        str(bases[family]),
        "--prompts",
        str(bases["prompts"]),
        "--output_dir",
        str(out),
        "--max_train_steps",
        str(steps),
        "--fake_updates_per_step",
        str(fakes),
        "--max_sequence_length",
        "32",
        "--lora_rank",
        "4",
        "--lora_alpha",
        "4",
        "--learning_rate",
        "1e-3",
        "--train_batch_size",
        "2",
        "--checkpointing_steps",
        "100",
        *size,
        *extra,
    ]
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # runs in one process with different precisions
    script.main(argv)
    return json.loads((Path(out) / "logs" / "history.json").read_text())


def _losses(history):
    return torch.tensor([[h["dmd_loss"], h["fake_loss"]] for h in history], dtype=torch.float64)


def test_batched_cfg_equals_sequential(bases, tmp_path, monkeypatch):
    """Wan2.2 pads every prompt to one length: the teacher's cond + uncond passes run as one batch by default and
    give the sequential passes' losses (fp32: 1e-5 relative)."""
    from diffusers_pdmd.training import roles

    seen = []
    batchable = roles.cfg_batchable
    monkeypatch.setattr(roles, "cfg_batchable", lambda c, n: seen.append(batchable(c, n)) or seen[-1])
    ref = _run(bases, "wan2.2-t2v-a14b", tmp_path / "seq", "--sequential_cfg", steps=2)
    assert seen == []  # --sequential_cfg never asks
    new = _run(bases, "wan2.2-t2v-a14b", tmp_path / "bat", steps=2)
    assert seen and all(seen)
    torch.testing.assert_close(_losses(new), _losses(ref), rtol=1e-5, atol=1e-8)


def test_trim_padding_keeps_the_velocities():
    """A batch cut to its longest prompt gives the velocities of the set-wide padded, masked batch; at batch 1 (and
    for equal lengths) the mask is dropped, as diffusers' pipelines pass it."""
    from diffusers_pdmd.families import get_family
    from diffusers_pdmd.training.distill import select_cond, trim_padding

    pipe = tiny.build_pipeline("qwen-image")
    family = get_family(pipe)
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(3, 9, 16, generator=g)
    mask = torch.tensor([[1] * 4 + [0] * 5, [1] * 6 + [0] * 3, [1] * 9])  # the set is padded to 9 tokens
    cond = {"prompt_embeds": embeds * mask[..., None], "prompt_embeds_mask": mask}
    x = torch.randn(2, 16, 16, generator=g)
    sigma = torch.tensor([0.7, 0.4])
    index = torch.tensor([0, 1])  # a batch whose longest prompt has 6 tokens
    padded = dict(select_cond(cond, index, 3), **family.size_cond(32, 32, batch_size=2))
    trimmed = trim_padding(padded)
    assert trimmed["prompt_embeds"].shape == (2, 6, 16) and trimmed["prompt_embeds_mask"].shape == (2, 6)
    one = trim_padding(select_cond(cond, torch.tensor([1]), 3))
    assert one["prompt_embeds"].shape == (1, 6, 16) and one["prompt_embeds_mask"] is None
    assert trim_padding({"prompt_embeds": embeds, "prompt_embeds_mask": None})["prompt_embeds"] is embeds
    with torch.no_grad():
        ref = family.velocity(pipe.transformer, x, sigma, padded)
        out = family.velocity(pipe.transformer, x, sigma, trimmed)
        single = family.velocity(pipe.transformer, x[1:], sigma[1:], dict(one, **family.size_cond(32, 32)))
        unmasked = family.velocity(pipe.transformer, x, sigma, dict(padded, prompt_embeds_mask=None))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single, ref[1:], rtol=1e-5, atol=1e-6)
    assert (unmasked - ref).abs().max() > 1e-3  # the padding matters: the check can fail


def test_qwen_cfg_runs_two_unpadded_passes(bases, tmp_path, monkeypatch):
    """Qwen-Image's prompt and negative prompt differ in length: two passes, neither padded nor masked."""
    from diffusers_pdmd.training import distill

    calls = []
    velocity = distill.Distiller._call

    def spy(self, model, switch_name, adapter, x, t, cond):
        if adapter is None:
            calls.append((x.shape[0], cond.get("prompt_embeds_mask")))
        return velocity(self, model, switch_name, adapter, x, t, cond)

    monkeypatch.setattr(distill.Distiller, "_call", spy)
    _run(bases, "qwen-image", tmp_path / "q", "--train_batch_size", "1", "--train_phase", "0")
    assert len(calls) == 2 and all(b == 1 and m is None for b, m in calls)


def test_compile_default():
    """Compiled by default on one CUDA process only; the two flags force it either way and contradict each other."""
    from types import SimpleNamespace

    from diffusers_pdmd.training.distill import build_parser, check_speed_args, compile_wanted

    def args(*extra):
        return build_parser("t").parse_args(["--pretrained_model_name_or_path", "x", "--prompts", "p", *extra])

    def acc(kind, n=1):
        return SimpleNamespace(device=torch.device(kind), num_processes=n)

    assert compile_wanted(args(), acc("cuda")) and not compile_wanted(args(), acc("cuda", 2))
    assert not compile_wanted(args(), acc("cpu")) and compile_wanted(args("--compile"), acc("cpu"))
    assert not compile_wanted(args("--no_compile"), acc("cuda"))
    for flag in ("--base_fp8", "--offload_activations"):  # not by default with these
        assert not compile_wanted(args(flag, "--mixed_precision", "bf16"), acc("cuda"))
    with pytest.raises(ValueError, match="--no_compile"):
        check_speed_args(args("--compile", "--no_compile"))
    with pytest.raises(ValueError, match="--base_fp8"):
        check_speed_args(args("--compile", "--base_fp8", "--mixed_precision", "bf16", "--gradient_checkpointing"))


def test_cat_cond_masks_the_padding():
    """Qwen-Image velocities of a batch padded by `cat_cond` equal the unpadded ones; without the mask they do not."""
    from diffusers_pdmd.families import get_family
    from diffusers_pdmd.training.distill import cat_cond

    pipe = tiny.build_pipeline("qwen-image")
    family = get_family(pipe)
    model = pipe.transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 16, generator=g)
    sigma = torch.tensor([0.7])
    size = family.size_cond(32, 32, batch_size=1)
    cond = {"prompt_embeds": torch.randn(1, 7, 16, generator=g), "prompt_embeds_mask": None, **size}
    neg = {"prompt_embeds": torch.randn(1, 3, 16, generator=g), "prompt_embeds_mask": None, **size}
    with torch.no_grad():
        v, v_neg = family.velocity(model, x, sigma, cond), family.velocity(model, x, sigma, neg)
        both = cat_cond(cond, neg, 1)
        assert (
            both["prompt_embeds"].shape == (2, 7, 16) and both["prompt_embeds_mask"].tolist()[1] == [1] * 3 + [0] * 4
        )
        out = family.velocity(model, torch.cat([x, x]), torch.cat([sigma, sigma]), both)
        unmasked = family.velocity(
            model, torch.cat([x, x]), torch.cat([sigma, sigma]), dict(both, prompt_embeds_mask=None)
        )
    torch.testing.assert_close(out[0:1], v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1:2], v_neg, rtol=1e-5, atol=1e-6)
    assert (unmasked[1:2] - v_neg).abs().max() > 1e-3  # the check can fail: zero padding alone changes the result


def test_lora_without_input_upcast_equals_upcast_under_bf16(bases, tmp_path):
    """LoRA in bf16 from fp32 master weights (default) = peft's input upcast: autocast computes the same matmuls."""
    ref = _run(bases, "qwen-image", tmp_path / "up", "--mixed_precision", "bf16", "--upcast_lora_inputs", steps=2)
    new = _run(bases, "qwen-image", tmp_path / "bf", "--mixed_precision", "bf16", steps=2)
    torch.testing.assert_close(_losses(new), _losses(ref), rtol=1e-6, atol=0)
    for phase in (0, 1):  # and the same trained experts
        a = load_file(str(tmp_path / "up" / f"phase_{phase}" / "pytorch_lora_weights.safetensors"))
        b = load_file(str(tmp_path / "bf" / f"phase_{phase}" / "pytorch_lora_weights.safetensors"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=0)


def test_keep_input_dtype_stops_the_fp32_copy():
    """With the cast off, a bf16 input reaches the fp32 LoRA weights as bf16 (autocast casts the weights)."""
    from diffusers_pdmd.training import adapters as ad

    model = tiny.build_pipeline("qwen-image").transformer.to(torch.bfloat16)
    ad.add_lora(model, "e", 4, 4, ad.lora_targets("qwen-image"))
    ad.set_trainable(model, ["e"])
    layer = ad.tuner_layers(model)[0]
    seen = []
    layer.lora_A["e"].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x = torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
        ad.keep_input_dtype([layer])
        layer(x)
    assert seen == [torch.float32, torch.bfloat16]


def test_attention_backend_math_equals_default(bases, tmp_path):
    ref = _run(bases, "qwen-image", tmp_path / "a")
    new = _run(bases, "qwen-image", tmp_path / "b", "--attention_backend", "_native_math")
    torch.testing.assert_close(_losses(new), _losses(ref), rtol=1e-5, atol=1e-8)


def test_fused_adamw_equals_foreach():
    """The optimizer the script builds on CUDA (fused) makes the same update as the default one (CPU kernels)."""
    torch.manual_seed(0)
    params = [torch.randn(64, 8, requires_grad=True), torch.randn(8, requires_grad=True)]
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    a = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    b = torch.optim.AdamW(copies, lr=1e-3, weight_decay=1e-2, fused=True)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, grad in zip(params, copies, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_base_fp8_keeps_lora_and_stays_close(bases, tmp_path):
    """fp8 storage of the base (bf16 compute): LoRA weights untouched and trained, losses near the bf16 ones."""
    ref = _run(bases, "wan2.2-t2v-a14b", tmp_path / "bf16", "--mixed_precision", "bf16")
    new = _run(bases, "wan2.2-t2v-a14b", tmp_path / "fp8", "--mixed_precision", "bf16", "--base_fp8")
    new, ref = _losses(new), _losses(ref)
    # the fake-score loss (score matching against the data) moves by fp8 rounding: ~0.1% here
    torch.testing.assert_close(new[:, 1], ref[:, 1], rtol=1e-2, atol=0)
    # the DMD loss is the small difference of two scores at the start (both on the fp8 base): same order only
    ratio = new[:, 0] / ref[:, 0]
    assert ((ratio > 0.5) & (ratio < 2)).all(), ratio
    for phase in (0, 1):
        sd = load_file(str(tmp_path / "fp8" / f"phase_{phase}" / "pytorch_lora_weights.safetensors"))
        assert all(v.dtype in (torch.float32, torch.bfloat16) for v in sd.values())
        assert max(v.abs().max().item() for k, v in sd.items() if "lora_B" in k) > 0  # gradients reached them


def test_store_base_in_fp8_teacher_error():
    """One teacher forward with the base in fp8 is within a few percent of bf16, and the linears are fp8."""
    from diffusers_pdmd.training import adapters as ad

    model = tiny.build_pipeline("wan2.2-t2v-a14b").transformer.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    kwargs = {
        "hidden_states": torch.randn(1, 16, 3, 8, 8, generator=g).to(torch.bfloat16),
        "encoder_hidden_states": torch.randn(1, 9, 32, generator=g).to(torch.bfloat16),
        "timestep": torch.tensor([900.0]),
        "return_dict": False,
    }
    with torch.no_grad():
        ref = model(**kwargs)[0].float()
        ad.store_base_in_fp8(model)
        ad.store_base_in_fp8(model)  # idempotent
        out = model(**kwargs)[0].float()
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05, rel


def test_transformers_used_per_phase(bases, tmp_path):
    """A14B phase 0 (sigma >= 0.875) never calls transformer_2; phase 1 needs both (its t spans (s, 1])."""
    from accelerate import Accelerator

    from diffusers_pdmd.families import get_family
    from diffusers_pdmd.training.distill import Distiller, build_parser, make_plan

    args = build_parser("t", video=True).parse_args(
        [
            "--pretrained_model_name_or_path",
            "x",
            "--prompts",
            "p",
            "--lora_rank",
            "4",
            "--height",
            "16",
            "--width",
            "16",
            "--num_frames",
            "5",
            "--offload_idle_transformers",
        ]
    )
    pipe = tiny.build_pipeline("wan2.2-t2v-a14b")
    family = get_family(pipe)
    d = Distiller(args, Accelerator(cpu=True), family, pipe, make_plan(args, family))
    assert d.transformers_used(0) == {"transformer"}
    assert d.transformers_used(1) == {"transformer", "transformer_2"}


def test_offload_idle_transformers_same_losses(bases, tmp_path):
    ref = _run(bases, "wan2.2-t2v-a14b", tmp_path / "a")
    new = _run(bases, "wan2.2-t2v-a14b", tmp_path / "b", "--offload_idle_transformers")
    torch.testing.assert_close(_losses(new), _losses(ref), rtol=1e-6, atol=0)


def test_fake_reuse_samples_back_simulates_once_per_n_updates(bases, tmp_path, monkeypatch):
    """Algorithm-changing (opt-in): with N = 2 two fake updates share one back-simulated batch."""
    from diffusers_pdmd.training import steps

    calls = {"n": 0}
    real = steps.generator_sample

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(steps, "generator_sample", counted)
    _run(bases, "qwen-image", tmp_path / "a", steps=1, fakes=4)
    fresh = calls["n"]
    calls["n"] = 0
    hist = _run(bases, "qwen-image", tmp_path / "b", "--fake_reuse_samples", "2", steps=1, fakes=4)
    # per phase: 4 fake updates + 1 generator update; sharing: 2 fake back-simulations + 1
    assert (fresh, calls["n"]) == (2 * 5, 2 * 3)
    assert all(torch.isfinite(_losses(hist)).all() for _ in [0])


def test_train_phase_1_loads_the_phase_0_expert(bases, tmp_path):
    """`--train_phase 1` after a phase-0 run into the same folder trains on the trained phase-0 expert."""
    out = tmp_path / "o"
    _run(bases, "qwen-image", out, "--train_phase", "0")
    first = load_file(str(out / "phase_0" / "pytorch_lora_weights.safetensors"))
    _run(bases, "qwen-image", out, "--train_phase", "1", "--overwrite_output_dir")  # drops phase 0's checkpoint
    again = load_file(str(out / "phase_0" / "pytorch_lora_weights.safetensors"))
    assert max(v.abs().max().item() for k, v in first.items() if "lora_B" in k) > 0
    for key in first:
        torch.testing.assert_close(again[key], first[key], rtol=0, atol=0)
    config = json.loads((out / "phased_dmd_config.json").read_text())
    assert [e["phase"] for e in config["experts"]] == [0, 1]


def test_flops_formula_matches_the_counter():
    """The analytic FLOPs of `gpu_common` equal torch's FlopCounterMode on the tiny models (math attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(BENCH))
    import gpu_common

    for family in ("qwen-image", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b"):
        model = tiny.build_pipeline(family).transformer
        b, text = 2, 9
        if family == "qwen-image":
            tokens = 16
            kwargs = {
                "hidden_states": torch.randn(b, tokens, 16),
                "encoder_hidden_states": torch.randn(b, text, 16),
                "encoder_hidden_states_mask": None,
                "timestep": torch.ones(b),
                "img_shapes": [[(1, 4, 4)]] * b,
            }
            per_token = False
        else:
            tokens = 3 * 4 * 4
            per_token = family.endswith("5b")
            kwargs = {
                "hidden_states": torch.randn(b, model.config.in_channels, 3, 8, 8),
                "encoder_hidden_states": torch.randn(b, text, model.config.text_dim),
                "timestep": torch.full((b, tokens) if per_token else (b,), 500.0),
            }
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            model(**kwargs, return_dict=False)
        assert gpu_common.transformer_forward_flops(model, b, tokens, text, per_token) == counter.get_total_flops()


def test_gpu_train_tiny_runs_and_counts(tmp_path):
    """`benchmarks/gpu_train.py --tiny`: both phases through the script, forwards as the method counts them."""
    sys.path.insert(0, str(BENCH))
    bench = _load(BENCH / "gpu_train.py", "gpu_train")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path / "experts"
    res = bench.main(
        [
            "--tiny",
            "--model",
            "qwen",
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            "--fake_updates_per_step",
            "2",
            "--out",
            str(tmp_path / "r.json"),
            "--doc",
            str(tmp_path / "gpu.md"),
        ]
    )
    steps = [2, 2]  # the script's default --steps_per_phase
    fakes = 2
    for phase in (0, 1):
        r = res["phases"][str(phase)]
        n = sum(steps[: phase + 1])  # expert forwards of one back-simulation to the end of the phase
        # fake update: n without grad + the fake score with grad; generator: n - 1 without grad + 1 with grad,
        # the teacher (cond and uncond: two passes, Qwen-Image's prompt and negative prompt differ in length) and
        # the fake score without grad
        assert r["forwards_per_update"] == {
            "forward_no_grad": fakes * n + (n - 1) + 3,
            "forward_grad": fakes + 1,
            "backward": fakes + 1,
        }
        assert r["updates"] == 2 and len(r["step_seconds"]) == 2 and r["seconds_per_update"] > 0
    assert res["experts"]["phases"] == [0, 1]
    assert json.loads((tmp_path / "r.json").read_text())["model"] == "qwen"


def test_offload_activations_same_losses(bases, tmp_path):
    """Saved tensors go to CPU memory and come back unchanged (a copy): the same losses."""
    ref = _run(bases, "qwen-image", tmp_path / "a", "--gradient_checkpointing")
    new = _run(bases, "qwen-image", tmp_path / "b", "--gradient_checkpointing", "--offload_activations")
    torch.testing.assert_close(_losses(new), _losses(ref), rtol=1e-6, atol=0)


def test_speed_flags_are_checked_before_loading(bases, tmp_path):
    from diffusers_pdmd.training.distill import build_parser, check_speed_args

    def args(*extra):
        return build_parser("t").parse_args(["--pretrained_model_name_or_path", "x", "--prompts", "p", *extra])

    for extra, match in [
        (("--fake_reuse_samples", "0"), "--fake_reuse_samples"),
        (("--base_fp8",), "--mixed_precision bf16"),
        (("--offload_idle_transformers", "--phase_order", "alternate"), "--phase_order sequential"),
        (("--attention_backend", "flashy"), "--attention_backend"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_speed_args(args(*extra))
    check_speed_args(args("--base_fp8", "--mixed_precision", "bf16", "--attention_backend", "_native_cudnn"))


def test_compiled_blocks_equal_eager(bases, tmp_path, monkeypatch):
    """`--compile` captures every block with dynamo (its `eager` backend: no code generation, which takes minutes on
    the CPU) and guards on the active adapter and grad mode: a missed adapter switch (the teacher run with an expert
    on, a fake score with the generator's adapter, a checkpoint recompute with the wrong adapter) would change the
    losses."""
    backend = "eager"
    from diffusers.models.modeling_utils import ModelMixin

    compile_blocks = ModelMixin.compile_repeated_blocks
    monkeypatch.setattr(
        ModelMixin, "compile_repeated_blocks", lambda self, **kw: compile_blocks(self, **kw, backend=backend)
    )
    ref = _run(bases, "qwen-image", tmp_path / "eager", "--no_compile", "--gradient_checkpointing", steps=2, fakes=2)
    torch._dynamo.reset()
    new = _run(bases, "qwen-image", tmp_path / "comp", "--compile", "--gradient_checkpointing", steps=2, fakes=2)
    torch._dynamo.reset()
    torch.testing.assert_close(_losses(new), _losses(ref), rtol=1e-5, atol=1e-8)


def _watch_phase_1(monkeypatch, seen, phase_0_watch=False):
    """Record, at the first generator update of phase 1 (after a `gc.collect()`), what each transformer holds: its
    adapters, the phase-0 expert's tensors and dtypes, the live optimizers' parameters and the adapters' bytes.
    With `phase_0_watch`, weak references to phase 0's fake-score parameters and optimizers, taken in phase 0."""
    import gc
    import weakref

    from diffusers_pdmd.training import adapters as ad
    from diffusers_pdmd.training import distill

    update = distill.generator_update

    def watching(d, batches, recipe, state, phase, step):
        if phase == 0 and phase_0_watch and "phase_0" not in seen:
            params = [p for m in d.models.values() for p in ad.adapter_parameters(m, "fake_0")]
            opts = state.opts[0]
            seen["phase_0"] = [weakref.ref(x) for x in (*params, opts.gen, opts.fake, opts)]
        if phase == 1 and "adapters" not in seen:
            gc.collect()
            seen["adapters"] = {n: sorted(getattr(m, "peft_config", {})) for n, m in d.models.items()}
            seen["fake_0_params"] = sum(len(ad.adapter_parameters(m, "fake_0")) for m in d.models.values())
            expert = d.models[d.expert_base[0]]
            seen["expert_0"] = ad.adapter_state_dict(expert, "phase_0")
            seen["expert_0_grad"] = {p.requires_grad for p in d.expert_params(0)}
            seen["opt_params"] = {id(p) for o in state.opts.values() for g in o.fake.param_groups for p in g["params"]}
            seen["opt_phases"] = sorted(state.opts)
            seen["adapter_bytes"] = sum(
                p.numel() * p.element_size()
                for m in d.models.values()
                for n, p in m.named_parameters()
                if "lora_" in n
            )
            seen["alive"] = [r() is not None for r in seen.get("phase_0", [])]
        return update(d, batches, recipe, state, phase, step)

    monkeypatch.setattr(distill, "generator_update", watching)


def test_sequential_run_frees_the_finished_phase(bases, tmp_path, monkeypatch):
    """issue 22: both A14B phases in one run (sequential, bf16) hold in phase 1 what a `--train_phase 1` run after a
    phase-0 run holds: no phase-0 fake score on any transformer, no optimizer or other reference keeping its
    parameters, and the phase-0 expert frozen in bf16, equal to the one a phase-1 run loads from the file this run
    wrote. Alternate
    order keeps every phase's fake score and optimizers."""
    bf16 = ("--mixed_precision", "bf16")
    one, alone, alternate = {}, {}, {}
    _watch_phase_1(monkeypatch, one, phase_0_watch=True)
    _run(bases, "wan2.2-t2v-a14b", tmp_path / "one", *bf16, steps=2)
    assert one["adapters"] == {"transformer": ["fake_1", "phase_0"], "transformer_2": ["fake_1", "phase_1"]}
    assert one["fake_0_params"] == 0 and not any(one["alive"])  # parameters, optimizers: all released
    assert one["opt_phases"] == [1] and one["expert_0_grad"] == {False}
    assert {v.dtype for v in one["expert_0"].values()} == {torch.bfloat16}

    # a `--train_phase 1` run on the experts this run wrote (a `--train_phase 0` run of its own trains another
    # phase-0 expert: the fake scores it makes draw other random numbers)
    shutil.copytree(tmp_path / "one", tmp_path / "split")
    _watch_phase_1(monkeypatch, alone)
    _run(bases, "wan2.2-t2v-a14b", tmp_path / "split", *bf16, "--train_phase", "1", "--overwrite_output_dir", steps=2)
    assert one["adapters"] == alone["adapters"] and one["adapter_bytes"] == alone["adapter_bytes"]
    assert one["expert_0"].keys() == alone["expert_0"].keys()
    for key, value in alone["expert_0"].items():
        assert one["expert_0"][key].dtype == value.dtype
        torch.testing.assert_close(one["expert_0"][key], value, rtol=0, atol=0)
    print(f"adapter bytes in phase 1: {one['adapter_bytes']}")

    _watch_phase_1(monkeypatch, alternate)
    _run(bases, "wan2.2-t2v-a14b", tmp_path / "alt", *bf16, "--phase_order", "alternate", steps=2)
    assert alternate["adapters"] == {
        "transformer": ["fake_0", "fake_1", "phase_0"],
        "transformer_2": ["fake_0", "fake_1", "phase_1"],
    }
    assert alternate["opt_phases"] == [0, 1] and alternate["expert_0_grad"] == {True}


def test_updates_read_back_one_value_per_loss_and_no_conditioning(bases, tmp_path, monkeypatch):
    """Host reads of the per-update code (each a device sync on CUDA, where the GPU then idles until the host
    launches again): per loss one finiteness check (`check_finite`) and one read of its logged values (`tolist`);
    none while drawing a batch (the padding cut reads a CPU copy of the cached mask, made once)."""
    import collections

    counts = collections.Counter()
    watched = ("training/steps.py", "training/losses.py", "training/data.py", "training/simulate.py")

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, **k):
            frame = sys._getframe(1)
            site = next((w for w in watched if frame.f_code.co_filename.endswith(w)), None)
            if site is not None:
                counts[(site, name)] += 1
            return original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    for name in ("item", "tolist", "cpu", "__bool__"):
        wrap(name)
    _run(bases, "qwen-image", tmp_path / "out", "--cache_text_embeddings", steps=1, fakes=2)
    losses = 2 * (2 + 1)  # two phases, each 2 fake updates and 1 generator update
    assert counts[("training/losses.py", "tolist")] == losses
    assert counts[("training/losses.py", "item")] == 0
    assert counts[("training/steps.py", "__bool__")] == losses  # check_finite
    assert counts[("training/data.py", "cpu")] <= 1  # the cached mask, once
    assert counts[("training/data.py", "item")] == 0


@pytest.mark.parametrize("family", ["qwen-image", "wan2.2-t2v-a14b"])
def test_uncheckpointed_blocks_are_not_recomputed(family):
    """`--uncheckpointed_blocks n`: the last n blocks run once, the others twice (forward and the recompute in
    backward); the gradients are those of checkpointing every block, and of no checkpointing at all."""
    from diffusers_pdmd.families import get_family
    from diffusers_pdmd.training import adapters as ad
    from diffusers_pdmd.training.roles import checkpointing_func

    pipe = tiny.build_pipeline(family)
    fam = get_family(pipe)
    model = pipe.transformer.float()
    ad.add_lora(model, "a", 4, 4, ad.lora_targets(family))
    model.requires_grad_(False)
    model.set_adapter("a")
    for p in ad.adapter_parameters(model, "a"):
        p.requires_grad_(True)
        p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))  # B != 0: gradients reach every block
    blocks = [m for m in model.modules() if type(m).__name__ in model._repeated_blocks]
    calls = [0] * len(blocks)
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    g = torch.Generator().manual_seed(0)
    if family == "qwen-image":
        x = torch.randn(1, 16, 16, generator=g)
        cond = {"prompt_embeds": torch.randn(1, 7, 16, generator=g), "prompt_embeds_mask": None}
        cond.update(fam.size_cond(32, 32, batch_size=1))
    else:
        x = torch.randn(1, model.config.in_channels, 2, 4, 4, generator=g)
        cond = {"prompt_embeds": torch.randn(1, 7, model.config.text_dim, generator=g)}
    grads = {}
    for n in (None, 0, 1, len(blocks)):
        calls[:] = [0] * len(blocks)
        if n is None:
            model.disable_gradient_checkpointing()
        else:
            model.enable_gradient_checkpointing(checkpointing_func(model, n))
        model.zero_grad(set_to_none=True)
        fam.velocity(model, x, torch.tensor([0.6]), cond).square().mean().backward()
        # (the last block's text stream feeds nothing: its adapters get no gradient)
        grads[n] = [torch.zeros(0) if p.grad is None else p.grad.clone() for p in ad.adapter_parameters(model, "a")]
        kept = len(blocks) if n is None else n
        assert calls == [2] * (len(blocks) - kept) + [1] * kept, (n, calls)
    for n in (0, 1, len(blocks)):
        for a, b in zip(grads[n], grads[None]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert len(blocks) >= 2 and any(g.abs().max() > 0 for g in grads[None])
