"""Several processes on the CPU (gloo): diffusers' context parallelism, accelerate's FSDP2, sharded checkpoints.

Every multi-process result is compared with one process running the same samples. Ring attention and NCCL cannot
run here (ring needs a CUDA attention backend that returns the log-sum-exp); `benchmarks/gpu_multi.py` runs them.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_pdmd import tiny
from diffusers_pdmd.training import parallel


ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "examples" / "phased_dmd"
CONFIGS = SCRIPTS / "configs"
PROMPTS = ["a handwritten digit seven", "a red cat", "a blue house"]

# accelerate 1.15 turns FSDP off on CPU processes (MULTI_CPU); this sets what `accelerate launch --config_file` sets on
# GPUs: the FSDP plugin built from the shipped config's `fsdp_config`, and the FSDP distributed type.
FSDP_ON_CPU = textwrap.dedent(
    """
    import runpy, sys
    import yaml
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    config, script = sys.argv[1], sys.argv[2]
    fsdp = yaml.safe_load(open(config))["fsdp_config"]
    renamed = {"fsdp_offload_params": "cpu_offload", "fsdp_version": "fsdp_version"}
    kwargs = {renamed.get(k, k.removeprefix("fsdp_")): v for k, v in fsdp.items()}
    _init = Accelerator.__init__

    def init(self, *args, **kw):
        _init(self, *args, **kw)
        AcceleratorState._shared_state["fsdp_plugin"] = FullyShardedDataParallelPlugin(**kwargs)
        for state in (AcceleratorState, PartialState):
            state._shared_state["distributed_type"] = DistributedType.FSDP

    Accelerator.__init__ = init
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")
    """
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    folder = tiny.save_pipeline("wan2.2-t2v-a14b", root / "wan")  # A14B: two teacher transformers, 2 heads each
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "fsdp_on_cpu.py").write_text(FSDP_ON_CPU)
    return root, folder


def _args(root, folder, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(folder), "--prompts", str(root / "prompts.txt"),
        "--train_phase", "0", "--max_train_steps", "2", "--fake_updates_per_step", "2", "--checkpointing_steps", "1",
        "--max_sequence_length", "16", "--lora_rank", "4", "--lora_alpha", "4", "--learning_rate", "1e-3",
        "--height", "16", "--width", "16", "--num_frames", "5", "--output_dir", str(out), *extra,
    ]  # fmt: skip


def _env():
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH")
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        ACCELERATE_USE_CPU="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=src + (os.pathsep + path if path else ""),
    )


def _launch(port, *argv, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *argv]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _one_process(root, folder, out, *extra):
    cmd = [sys.executable, str(SCRIPTS / "train_phased_dmd_wan22.py"), *_args(root, folder, out, *extra)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]


def _history(out, step=2):
    return json.loads((out / f"checkpoint-{step}" / "training_state.json").read_text())["history"]


def _lora(out, name="phase_0"):
    return load_file(str(out / name / "pytorch_lora_weights.safetensors"))


def _assert_same_curve(reference, other):
    """Fake-score losses (hundreds, well conditioned) to 1e-3 relative; DMD losses, differences of two nearly equal
    predictions of ~1e-5 here, to 5%. Measured: 1e-5 and 0.2-3%."""
    assert len(reference) == len(other) == 2
    for a, b in zip(reference, other):
        assert b["fake_loss"] == pytest.approx(a["fake_loss"], rel=1e-3)
        assert b["dmd_loss"] == pytest.approx(a["dmd_loss"], rel=5e-2)


# ----------------------------------------------------------------------------------------------------------------
# Validation: clear errors before any weight moves
# ----------------------------------------------------------------------------------------------------------------


def test_bad_degrees_fail_clearly():
    with pytest.raises(ValueError, match=r"--context_parallel_degree.*\(3\).*divide.*\(2\).*\[1, 2\]"):
        parallel.check_degree(3, 2)
    with pytest.raises(ValueError, match="--context_parallel_degree.*positive"):
        parallel.check_degree(0, 2)
    qwen = tiny.build_components("qwen-image")["transformer"]  # 3 attention heads
    with pytest.raises(ValueError, match=r"\(2\) must divide the 3 attention heads.*\[1, 3\]"):
        parallel.check_transformer(qwen, 2)
    parallel.check_transformer(qwen, 3, tokens=9)
    with pytest.raises(ValueError, match="must divide the 8 image / video tokens"):
        parallel.check_transformer(qwen, 3, tokens=8)
    wan = tiny.build_components("wan2.2-t2v-a14b")["transformer"]
    with pytest.raises(ValueError, match="Ring attention needs an attention backend.*'native'"):
        parallel.enable_on(wan, parallel.Layout(2, 0, 2), mode="ring")


def test_script_rejects_a_degree_that_does_not_divide_the_processes(base, tmp_path):
    from diffusers_pdmd.training import distill

    root, folder = base
    script = SCRIPTS / "train_phased_dmd_wan22.py"
    spec = __import__("importlib.util").util.spec_from_file_location("wan_script", script)
    module = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ValueError, match="--context_parallel_degree` \\(2\\) must divide the number of processes"):
        module.main(_args(root, folder, tmp_path / "o", "--context_parallel_degree", "2"))
    assert not (tmp_path / "o" / "checkpoint-1").exists()
    assert (
        distill.build_parser("x", video=True)
        .parse_args(["--pretrained_model_name_or_path", "a", "--prompts", "b"])
        .context_parallel_degree
        == 1
    )


# ----------------------------------------------------------------------------------------------------------------
# Context parallelism itself: two processes against one, forward and backward, and sampling
# ----------------------------------------------------------------------------------------------------------------

CP_WORKER = textwrap.dedent(
    """
    import copy, json, sys
    import torch, torch.distributed as dist
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig
    from diffusers_pdmd import PhasedDMDScheduler, PhasedMoEPipeline, tiny
    from diffusers_pdmd.training import parallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (1, 1, world), mesh_dim_names=("dp", "ring", "ulysses"))
    layout = parallel.Layout(world, rank, world, mesh)
    result = {}

    def grads(model):
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])

    def compare(name, ref, inputs):
        cp = copy.deepcopy(ref)
        parallel.enable_on(cp, layout)
        a, b = ref(**inputs, return_dict=False)[0], cp(**inputs, return_dict=False)[0]
        (a.square().mean()).backward()
        (b.square().mean()).backward()
        g = grads(cp)
        dist.all_reduce(g)  # each process holds its tokens' part of the gradient
        result[name] = [(a - b).abs().max().item(), (grads(ref) - g).abs().max().item(), grads(ref).abs().max().item()]
        return cp

    g = torch.Generator().manual_seed(1)
    wan = tiny.build_components("wan2.2-t2v-a14b")["transformer"]
    x, text = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 8, 32, generator=g)
    wan_inputs = dict(hidden_states=x, timestep=torch.tensor([500.0, 900.0]), encoder_hidden_states=text)
    wan_cp = compare("wan", wan, wan_inputs)

    # DDP over a context-parallel group with parallel.py's communication hook: the summed gradient, not the mean.
    from torch.nn.parallel import DistributedDataParallel
    hooked = parallel.copy_model(wan_cp)
    hooked.zero_grad(set_to_none=True)
    parallel.enable_on(hooked, layout)
    ddp = DistributedDataParallel(hooked, find_unused_parameters=True)
    ddp.register_comm_hook(None, parallel._sum_over_group_hook(layout.dp_size))
    ddp(**wan_inputs, return_dict=False)[0].square().mean().backward()
    result["ddp_hook"] = [(grads(hooked) - grads(wan)).abs().max().item(), grads(wan).abs().max().item()]

    # Qwen-Image splits the text tokens too: 5 of them (one masked out) are padded to 6 by parallel.py.
    torch.manual_seed(0)
    qwen = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 4] = 0
    qwen_inputs = dict(hidden_states=torch.randn(2, 16, 16, generator=g), encoder_hidden_states=torch.randn(2, 5, 16,
        generator=g), encoder_hidden_states_mask=mask, timestep=torch.tensor([0.3, 0.8]), img_shapes=[[(1, 4, 4)]] * 2)
    compare("qwen", qwen, qwen_inputs)

    # A copy of a context-parallel model runs its own weights once re-enabled (a deep copy would run the original's).
    clone = parallel.copy_model(wan_cp)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(1.01)
    plain = copy.deepcopy(clone)
    parallel.enable_on(clone, layout)
    with torch.no_grad():
        result["copy"] = (clone(**wan_inputs, return_dict=False)[0] - plain(**wan_inputs, return_dict=False)[0]).abs().max().item()

    # Sampling: PhasedMoEPipeline with two LoRA experts, one process against two.
    components = tiny.build_components("wan2.2-t2v-a14b")
    for k, (slot, name) in enumerate((("transformer", "high"), ("transformer_2", "low"))):
        torch.manual_seed(k)
        components[slot].add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"],
            init_lora_weights=False), adapter_name=name)
    scheduler = PhasedDMDScheduler.from_config(components["scheduler"].config, phase_boundaries=[0.875],
        steps_per_phase=[1, 2])
    pipe = PhasedMoEPipeline(**{**components, "scheduler": scheduler},
        experts=[("transformer", "high"), ("transformer_2", "low")])
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red cat", height=16, width=16, num_frames=5, output_type="np", max_sequence_length=16)
    ref = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    parallel.enable_context_parallel(pipe)
    out = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    result["pipeline"] = [float(abs(ref - out).max()), float(abs(ref).max())]
    json.dump(result, open(sys.argv[1] + f".{rank}.json", "w"))
    """
)


def test_ulysses_attention_on_two_processes_matches_one(tmp_path):
    """Outputs and the summed gradients of a context-parallel group equal one process's; sampling too."""
    worker = tmp_path / "worker.py"
    worker.write_text(CP_WORKER)
    _launch(29641, str(worker), str(tmp_path / "result"), timeout=180)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"result.{rank}.json").read_text())
        for name in ("wan", "qwen"):
            out_diff, grad_diff, grad_scale = r[name]
            assert out_diff < 1e-5 and grad_diff < 1e-5 * max(grad_scale, 1.0), (name, r[name])
        assert r["copy"] < 1e-6
        assert r["ddp_hook"][0] < 1e-5 * max(r["ddp_hook"][1], 1.0), r["ddp_hook"]
        assert r["pipeline"][0] < 1e-4 and r["pipeline"][1] > 0.1


# ----------------------------------------------------------------------------------------------------------------
# Training: the loss curve of one process; sharded checkpoints that resume bit-identically
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(base):
    """One process with batch 1 (what one context-parallel group sees) or 2 (what two replicas see), run once."""
    root, folder = base
    done = {}

    def get(batch, *extra):
        key = (batch, *extra)
        if key not in done:
            done[key] = root / f"one-b{batch}{'-full' if extra else ''}"
            _one_process(root, folder, done[key], "--train_batch_size", str(batch), *extra)
        return done[key]

    return get


def test_context_parallel_training_follows_one_process(base, reference, tmp_path):
    """DDP with --context_parallel_degree 2: both processes share each sample; the curve is one process's."""
    root, folder = base
    out = tmp_path / "cp"
    script = str(SCRIPTS / "train_phased_dmd_wan22.py")
    _launch(29642, script, *_args(root, folder, out, "--train_batch_size", "1", "--context_parallel_degree", "2"))
    _assert_same_curve(_history(reference(1)), _history(out))


FULL_FAKE = ("--fake_full_finetune", "--fake_learning_rate", "1e-4")


@pytest.mark.benchmark  # ~95 s on 2 cores each (three launches): run with `pytest -m benchmark`
@pytest.mark.parametrize("config, extra", [("fsdp2_lora.yaml", ()), ("fsdp2_full_fake.yaml", FULL_FAKE)])
def test_fsdp2_shards_train_like_one_process_and_resume_bit_identically(base, reference, tmp_path, config, extra):
    """FSDP2 (a shipped config) over 2 processes with batch 1 follows 1 process with batch 2; a run resumed from its
    sharded checkpoint-1 ends exactly where the uninterrupted one does (weights, optimizer states, losses)."""
    root, folder = base
    driver, config = str(root / "fsdp_on_cpu.py"), str(CONFIGS / config)
    script = str(SCRIPTS / "train_phased_dmd_wan22.py")
    full, cut = tmp_path / "full", tmp_path / "cut"
    _launch(29643, driver, config, script, *_args(root, folder, full, "--train_batch_size", "1", *extra))
    _assert_same_curve(_history(reference(2, *extra)), _history(full))

    cut.mkdir()
    shutil.copytree(full / "checkpoint-1", cut / "checkpoint-1")
    resume = ("--train_batch_size", "1", "--resume_from_checkpoint", "latest", *extra)
    _launch(29644, driver, config, script, *_args(root, folder, cut, *resume))
    assert _history(cut) == _history(full)
    for name in ("phase_0", "phase_1"):
        a, b = _lora(full, name), _lora(cut, name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    names = ["fake_full.transformer", "fake_full.transformer_2"] if extra else ["fake_0.transformer"]
    for name in names:
        a = load_file(str(full / "checkpoint-2" / f"{name}.safetensors"))
        b = load_file(str(cut / "checkpoint-2" / f"{name}.safetensors"))
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fake_a, fake_b = (
        load_file(str(full / "checkpoint-2" / "optimizers.safetensors")),
        load_file(str(cut / "checkpoint-2" / "optimizers.safetensors")),
    )
    assert fake_a.keys() == fake_b.keys() and all(torch.equal(fake_a[k], fake_b[k]) for k in fake_a)
