"""`--memory auto` in the example scripts: the plan is made from the base's config files and applied (or refused)
before the base pipeline loads. The base here is a config-only folder of the published Wan2.2 T2V-A14B (no weights);
the scripts' `load_pipeline` hook records whether loading was reached and with which flags."""

import importlib.util
import logging
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_common  # noqa: E402


class _Loaded(Exception):
    """Raised by the hook: loading was reached (the test stops the run there)."""


def _script():
    path = ROOT / "examples" / "phased_dmd" / "train_phased_dmd_wan22.py"
    spec = importlib.util.spec_from_file_location("train_phased_dmd_wan22", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(tmp_path, seen: list, *extra):
    """Run the script; `seen` receives the parsed flags the loading hook was called with."""
    base = gpu_common.write_config_base("wan2.2-t2v-a14b", tmp_path / "base")
    (tmp_path / "prompts.txt").write_text("a red fox in the snow\n")

    def load_pipeline(args, dtype):
        seen.append(args)
        raise _Loaded

    argv = ["--pretrained_model_name_or_path", str(base), "--prompts", str(tmp_path / "prompts.txt")]
    argv += ["--output_dir", str(tmp_path / "out"), "--mixed_precision", "bf16", "--gradient_checkpointing"]
    argv += ["--cache_text_embeddings", *extra]
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    _script().main(argv, load_pipeline=load_pipeline)


def test_nothing_fits_raises_before_loading(tmp_path, caplog):
    from diffusers_pdmd.training.memory import MemoryPlanError

    seen = []
    with pytest.raises(MemoryPlanError, match=r"card with at least \d+ GiB free") as err:
        _main(tmp_path, seen, "--memory_budget_gib", "44")
    assert seen == [] and "Tried:" in str(err.value)
    assert not (tmp_path / "out").exists()  # a run that failed before writing anything leaves no folder


def test_plan_is_applied_before_loading(tmp_path, caplog):
    """A14B phase 1 in 79 GiB: the hook sees `--offload_activations` turned on, and the plan was logged once."""
    caplog.set_level(logging.INFO, logger="diffusers_pdmd.train")
    seen = []
    with pytest.raises(_Loaded):
        _main(tmp_path, seen, "--memory_budget_gib", "79", "--train_phase", "1")
    assert seen[0].offload_activations and not seen[0].base_fp8
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Memory plan")]
    assert len(lines) == 1 and "--offload_activations" in lines[0]


def test_memory_off_keeps_the_flags(tmp_path):
    seen = []
    with pytest.raises(_Loaded):
        _main(tmp_path, seen, "--memory_budget_gib", "44", "--memory", "off")
    assert not (seen[0].offload_activations or seen[0].base_fp8 or seen[0].offload_idle_transformers)


def _gpu_train(tmp_path, *argv):
    bench = importlib.util.spec_from_file_location("gpu_train", ROOT / "benchmarks" / "gpu_train.py")
    module = importlib.util.module_from_spec(bench)
    bench.loader.exec_module(module)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    common = ["--tiny", "--output_dir", str(tmp_path / "out"), "--out", str(tmp_path / "r.json")]
    return module, module.main([*common, "--doc", str(tmp_path / "gpu.md"), *argv])


def test_gpu_train_records_the_error_before_loading(tmp_path):
    """`benchmarks/gpu_train.py` keeps a run that the plan stops (here: a 0.5 GiB budget) as a result row; the memory
    table names the flags passed by hand beside the plan's."""
    module, res = _gpu_train(
        tmp_path, "--model", "wan-ti2v-5b", "--phases", "0", "--extra", "--memory_budget_gib 0.5", "--cap_gib", "44"
    )
    r = res["phases"]["0"]
    assert r["before_load"] and r["error"].startswith("MemoryPlanError") and r["flags_after_plan"] is None
    assert res["cap_gib"] == 44 and res["section"] == "gpu_train_wan-ti2v-5b_cap44"
    table = module.render_memory_table([res])
    assert "stops before loading" in table and "`--memory_budget_gib 0.5`" in table  # the flags passed by hand too


def test_gpu_train_profiles_one_update_of_i2v(tmp_path):
    """`--profile` (I2V-A14B, tiny, CPU: operator CPU time stands in for kernel time): every category is there, the
    rank-4 LoRA matmuls and the checkpoint recompute are found, and the parts do not exceed the update."""
    _, res = _gpu_train(tmp_path, "--model", "wan-i2v-a14b", "--phases", "0", "--profile", "--max_train_steps", "2")
    p = res["phases"]["0"]["profile"]
    assert p["categories_ms"]["LoRA side paths"] > 0 and p["recompute_ms"] > 0
    assert sum(p["categories_ms"].values()) <= p["wall_ms"] * 1.01
    assert res["phases"]["0"]["flags_after_plan"] == ["--gradient_checkpointing"]


def test_profile_categories_and_busy_time():
    import gpu_profile as gp

    assert gp.busy_time([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4
    lora = gp.categorize(["aten::mm"], [[4096, 3072], [3072, 64]], 64)
    text = gp.categorize(["aten::mm"], [[64, 3072], [3072, 3072]], 64)  # 64 text tokens through a base linear
    bias = gp.categorize(["aten::addmm"], [[3072], [4096, 64], [64, 3072]], 64)
    assert (lora, text, bias) == ("LoRA side paths", "base matmuls", "LoRA side paths")
    assert gp.categorize(["aten::mm", "Optimizer.step#AdamW.step"], [], 64) == "optimizer"
    assert gp.categorize(["aten::_flash_attention_backward"], [], 64) == "attention"


def test_profile_counts_kernels_not_the_gpu_ranges_of_annotations():
    """The GPU-side range of a `record_function` (a user annotation, spanning the gaps between its kernels) is no
    kernel: busy time is the union of the kernels alone, and the gaps are the wall time minus it."""
    from types import SimpleNamespace as NS

    import gpu_profile as gp
    from torch.autograd import DeviceType

    def gpu(start, end, annotation=False):
        return NS(device_type=DeviceType.CUDA, time_range=NS(start=start, end=end), is_user_annotation=annotation)

    op = NS(device_type=DeviceType.CPU, name="aten::mm", cpu_parent=None, input_shapes=[[8, 8], [8, 8]])
    op.self_device_time_total = 30.0
    events = [op, gpu(0, 10), gpu(50, 70), gpu(0, 100, annotation=True)]
    p = gp.profile_table(events, rank=4, wall_us=200.0, on_gpu=True)
    assert p["busy_ms"] == 30 / 1e3 and p["launch_gaps_ms"] == 170 / 1e3 and p["kernels"] == 2
    assert p["categories_ms"]["base matmuls"] == 30 / 1e3
    table = gp.render(p)
    assert "| launch gaps (GPU idle) | 0 | 85.0% |" in table and "2 kernels" in table


def test_profile_recorded_before_the_fix_renders_from_the_update_clock():
    """Results without `kernels` (wall after the profiler's flush, annotation ranges as busy): the update's wall time
    comes from the script's clock and the rest is the wall time minus the kernel time charged to operators."""
    import gpu_profile as gp

    old = {"wall_ms": 16000.0, "busy_ms": 11000.0, "launch_gaps_ms": 5000.0, "recompute_ms": 100.0}
    old["categories_ms"] = dict.fromkeys(gp.CATEGORIES, 0.0) | {"base matmuls": 6000.0, "attention": 1500.0}
    table = gp.render(old, update_s=10.0)
    assert "| the rest: GPU idle (launch gaps, syncs), at most | 2500 | 25.0% |" in table
    assert "| **update wall time (profiled)** | 10000 | 100% |" in table
