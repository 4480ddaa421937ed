"""The memory plan (`--memory auto`, `training/memory.py`): sizes from config files, the estimate against the peaks
measured on GPUs, and the flags it picks for each family on an H200 (uncapped), an 80 GB-class and a 48 GB-class
budget, with injected memory figures (no GPU here).

The expected choices come from measured runs, not from the planner: docs/benchmarks/gpu.md,
benchmarks/results/train_*.json and issue 22's table (T2V-A14B with `--offload_idle_transformers` alone ran out of
memory under a 79 GiB cap; adding `--offload_activations` fitted, exact bf16).
"""

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffusers_pdmd.families import get_family
from diffusers_pdmd.training import memory
from diffusers_pdmd.training.distill import build_parser, check_speed_args, compile_wanted, make_plan, sizes


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_common  # noqa: E402


GIB = 2**30
# Budgets: an H200 (139.8 GiB) with the CUDA context taken; the 79 GiB and 44 GiB caps of issue 22
BUDGETS = {"h200": 139.0 * GIB, "80gb": 79.0 * GIB, "48gb": 44.0 * GIB}
SIZE_FLAGS = {
    "qwen-image": ["--resolution", "1024"],
    "wan2.2-t2v-a14b": ["--height", "480", "--width", "832", "--num_frames", "81"],
    "wan2.2-i2v-a14b": ["--height", "480", "--width", "832", "--num_frames", "81", "--image", "x.png"],
    "wan2.2-ti2v-5b": ["--height", "704", "--width", "1280", "--num_frames", "121"],
}
# the flags of the README commands (and of benchmarks/gpu_train.py)
README_FLAGS = ["--mixed_precision", "bf16", "--gradient_checkpointing", "--cache_text_embeddings"]


@pytest.fixture(scope="module")
def config_bases(tmp_path_factory):
    """Config-only folders of the published models (no weights), as the planner reads a real base."""
    root = tmp_path_factory.mktemp("configs")
    return {f: gpu_common.write_config_base(f, root / f) for f in SIZE_FLAGS}


def _args(base, family, *extra):
    return build_parser("t", video=family != "qwen-image").parse_args(
        ["--pretrained_model_name_or_path", str(base), "--prompts", "p", *SIZE_FLAGS[family], *README_FLAGS, *extra]
    )


def _accelerator(device="cuda", n=1, precision="bf16"):
    return SimpleNamespace(device=torch.device(device), num_processes=n, mixed_precision=precision)


def _plan(config_bases, family, budget, *extra):
    """`(args after the plan, plan)` of the README command for `family` with `budget` bytes free."""
    args = _args(config_bases[family], family, *extra)
    fam = get_family(family)
    phases = make_plan(args, fam)
    plan = memory.apply_memory_plan(args, fam, phases, sizes(args), 4, _accelerator(), budget_bytes=budget)
    return args, plan


# -- sizes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen-image", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b"])
def test_sizes_from_configs_match_the_built_models(family, tmp_path):
    """Counts read from the config files equal those of the real (tiny) modules: parameters, the LoRA parameters
    peft adds per rank, and the weights layerwise casting stores in fp8."""
    from diffusers_pdmd import tiny
    from diffusers_pdmd.training import adapters as ad

    base = tiny.save_pipeline(family, tmp_path / "base")
    configs = memory.read_base_configs(str(base))
    sz = memory.model_sizes(configs, ad.lora_targets(family))
    pipe = tiny.build_pipeline(family)
    for i, name in enumerate(get_family(family).transformer_names):
        model = getattr(pipe, name)
        assert sz.transformer_params[i] == sum(p.numel() for p in model.parameters())
        ad.add_lora(model, "a", 3, 3, ad.lora_targets(family))
        assert sz.lora_width[i] * 3 == sum(p.numel() for p in ad.adapter_parameters(model, "a"))
        model.delete_adapters("a")
        ad.store_base_in_fp8(model)
        assert sz.fp8_params[i] == sum(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn)
    assert sz.vae_params == sum(p.numel() for p in pipe.vae.parameters())
    assert sz.text_encoder_params == sum(p.numel() for p in pipe.text_encoder.parameters())


def test_full_size_counts_match_the_published_figures(config_bases):
    """docs/training.md: Qwen-Image 20.43 B parameters, rank-64 LoRA 424.7 M; A14B 2 x 14.29 B, 306.7 M per adapter
    per transformer; fp8 storage of one A14B transformer saved 13.1 GiB on the H100 (58.92 -> 45.81 GiB)."""
    from diffusers_pdmd.training import adapters as ad

    qwen = memory.model_sizes(memory.read_base_configs(str(config_bases["qwen-image"])), ad.lora_targets("qwen-image"))
    assert round(qwen.transformer_params[0] / 1e9, 2) == 20.43
    assert round(qwen.lora_width[0] * 64 / 1e6, 1) == 424.7
    wan = memory.model_sizes(memory.read_base_configs(str(config_bases["wan2.2-t2v-a14b"])), ad.lora_targets("wan"))
    assert [round(p / 1e9, 2) for p in wan.transformer_params] == [14.29, 14.29]
    assert round(wan.lora_width[0] * 64 / 1e6, 1) == 306.7
    assert abs(wan.fp8_params[0] / GIB - (58.92 - 45.81)) < 0.2
    # the text encoders (docs/benchmarks/gpu.md): Qwen2.5-VL-7B 8.29 B, UMT5-XXL encoder 5.68 B
    assert round(qwen.text_encoder_params / 1e9, 2) == 8.29
    assert round(wan.text_encoder_params / 1e9, 2) == 5.68


# -- the estimate against the measured peaks -------------------------------------------------------------------------


def _measured():
    """`(family, argv, phase, peak allocated GiB)` of every measured training run in benchmarks/results/."""
    out = []
    for path in sorted((ROOT / "benchmarks" / "results").glob("train_*.json")):
        res = json.loads(path.read_text())
        for phase, r in res["phases"].items():
            if "error" not in r:  # a run the plan stopped before loading has no peak (the next test has them)
                argv = r["argv"] + [f for f in r.get("flags_after_plan") or [] if f not in r["argv"]]  # the plan's
                if r.get("uncheckpointed_blocks") and "--uncheckpointed_blocks" not in argv:
                    argv += ["--uncheckpointed_blocks", str(r["uncheckpointed_blocks"])]
                out.append(
                    (path.name, gpu_common.TRAIN_FAMILIES[res["model"]], argv, int(phase), r["peak_allocated_gib"])
                )
    return out


@pytest.mark.parametrize("name,family,argv,phase,measured", _measured(), ids=lambda v: str(v)[:40])
def test_estimate_is_close_to_the_measured_peak(config_bases, name, family, argv, phase, measured):
    """Each measured run's peak allocated memory (GPU, the example scripts at full size) is within 2.5 GiB of the
    estimate, and never above the estimate plus the margin the plan keeps. Qwen-Image's estimate may be up to 5 GiB
    high: it counts `--max_sequence_length` (512) text rows in every block where the runs' prompts have under 32
    tokens (with 35 blocks uncheckpointed: 35 x 0.8 x 480 rows x 141 kB = 1.8 GiB), on top of the 2.4 GiB it is high
    with every block checkpointed."""
    argv = list(argv)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(config_bases[family])
    args = build_parser("t", video=family != "qwen-image").parse_args(argv)
    fam = get_family(family)
    sz = memory.family_sizes(memory.read_base_configs(args.pretrained_model_name_or_path), fam)
    work = memory.workload_from_args(args, fam, make_plan(args, fam), sizes(args), 4, "bf16", True)
    estimate = memory.phase_peak(sz, work, memory.given_flags(args), phase)["total"] / GIB
    assert -2.5 < estimate - measured < (5.0 if family == "qwen-image" else 2.5), (name, estimate, measured)
    assert measured * GIB <= estimate * GIB + memory.margin_bytes(estimate * GIB)


def test_runs_measured_under_a_cap_get_the_same_plan_again(config_bases):
    """Every run of benchmarks/results/ made under a cap (`gpu_train.py --cap_gib`): the plan at that budget adds the
    flags it added on the GPU, or stops before loading where it stopped there (T2V-A14B and I2V-A14B phase 1 at 44 GiB,
    H100)."""
    seen = 0
    for path in sorted((ROOT / "benchmarks" / "results").glob("train_*.json")):
        res = json.loads(path.read_text())
        if res.get("cap_gib") is None:
            continue
        for phase, r in res["phases"].items():
            family, seen = gpu_common.TRAIN_FAMILIES[res["model"]], seen + 1
            # the budget the plan read there, from its log line or its error
            budget = float(re.search(r"([0-9.]+) GiB available", r.get("memory_plan") or r["error"]).group(1)) * GIB
            if r.get("before_load"):
                with pytest.raises(memory.MemoryPlanError):
                    _plan(config_bases, family, budget, "--train_phase", phase)
                continue
            args, _ = _plan(config_bases, family, budget, "--train_phase", phase)
            flags = [f"--{n}" for n in memory.PLAN_FLAGS if getattr(args, n)]
            assert flags == r["flags_after_plan"], (path.name, phase)
    assert seen >= 5


def test_runs_that_kept_blocks_get_the_same_count_again(config_bases):
    """Every run of benchmarks/results/ whose plan left blocks uncheckpointed (Qwen-Image 35 of 60 on an H100,
    I2V-A14B phase 0 3 of 40 under a 79 GiB cap, TI2V-5B 3 of 30 under 44 GiB): the plan at the budget it read
    there keeps as many again."""
    seen = 0
    for path in sorted((ROOT / "benchmarks" / "results").glob("train_*.json")):
        res = json.loads(path.read_text())
        for phase, r in res["phases"].items():
            if not r.get("uncheckpointed_blocks"):
                continue
            seen += 1
            budget = float(re.search(r"([0-9.]+) GiB available", r["memory_plan"]).group(1)) * GIB
            args, _ = _plan(config_bases, gpu_common.TRAIN_FAMILIES[res["model"]], budget, "--train_phase", phase)
            assert args.uncheckpointed_blocks == r["uncheckpointed_blocks"], (path.name, phase)
    assert seen >= 4


def test_estimate_explains_the_issue_22_runs(config_bases):
    """T2V-A14B under a 79 GiB cap: `--offload_idle_transformers` alone ran out of memory at 75.3 GiB allocated with
    864 MiB more asked; with `--offload_activations` too it peaked at 74.9 GiB allocated. I2V-A14B defaults: 97.0 GiB
    on the device uncapped."""
    one = ("--train_phase", "1")  # benchmarks/gpu_train.py runs one phase per call; phase 1 is the larger
    one += ("--uncheckpointed_blocks", "0")  # those runs checkpointed every block
    _, plan = _plan(config_bases, "wan2.2-t2v-a14b", BUDGETS["h200"], *one, "--offload_idle_transformers")
    assert plan.peak_bytes > (75.3 + 0.84) * GIB  # the OOM: it needed more than that
    _, plan = _plan(
        config_bases, "wan2.2-t2v-a14b", BUDGETS["h200"], *one, "--offload_idle_transformers", "--offload_activations"
    )
    assert abs(plan.peak_bytes / GIB - 74.9) < 2.5 and plan.need_bytes <= 79 * GIB
    _, plan = _plan(config_bases, "wan2.2-i2v-a14b", BUDGETS["h200"], "--uncheckpointed_blocks", "0")
    assert plan.need_bytes <= 97.0 * GIB and plan.added == []


# -- the choice per family and card -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(SIZE_FLAGS))
def test_uncapped_h200_keeps_the_defaults(config_bases, family):
    """Every family trained with default flags on the H200 (A14B peaked at 96.9 / 97.0 GiB on the device)."""
    args, plan = _plan(config_bases, family, BUDGETS["h200"])
    assert plan.added == []
    assert not (args.base_fp8 or args.offload_activations or args.offload_idle_transformers)


@pytest.mark.parametrize("phase", ["0", "1"])
def test_80gb_card_one_phase_per_run(config_bases, phase):
    """As measured (one phase per run, `--train_phase k`): Qwen-Image (55.3 GiB on an H100) and TI2V-5B (33.0 GiB)
    fit an 80 GB card as they are. A14B phase 0 calls only `transformer`: with the other one in CPU memory it holds
    the default run's 84.0 GiB less one bf16 transformer (26.6 GiB), and stays compiled. Phase 1 calls both: it
    needs an exact bf16 flag set with offloaded activations (measured: fits at 77.2 GiB on the device), never fp8
    storage and never `--offload_idle_transformers` alone (measured: out of memory)."""
    for family in ("qwen-image", "wan2.2-ti2v-5b"):
        assert _plan(config_bases, family, BUDGETS["80gb"], "--train_phase", phase)[1].added == []
    for family in ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"):
        args, plan = _plan(config_bases, family, BUDGETS["80gb"], "--train_phase", phase)
        assert not args.base_fp8, plan.line()
        if phase == "0":
            assert plan.added == ["--offload_idle_transformers"] and compile_wanted(args, _accelerator())
            continue
        assert args.offload_activations
        assert plan.flags != memory.Flags(gradient_checkpointing=True, offload_idle_transformers=True)
        assert not compile_wanted(args, _accelerator())  # this flag set runs eagerly (as measured)


def test_80gb_card_all_phases_in_one_run(config_bases):
    """Training both A14B phases in one run (the scripts' default, sequential) holds in phase 1 what a
    `--train_phase 1` run holds: phase 0's fake-score adapters are deleted and its expert is back in bf16 when phase
    0 ends (`Distiller.end_phase`; they were 2.3 + 0.6 GiB in fp32). So the plan picks the exact bf16 flags of the
    phase-1 run, with the same estimated peak, never fp8 storage; the single-transformer families are as before."""
    for family in ("qwen-image", "wan2.2-ti2v-5b"):
        assert _plan(config_bases, family, BUDGETS["80gb"])[1].added == []
    for family in ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"):
        args, plan = _plan(config_bases, family, BUDGETS["80gb"])
        alone_args, alone = _plan(config_bases, family, BUDGETS["80gb"], "--train_phase", "1")
        assert not args.base_fp8 and args.offload_activations, plan.line()
        assert plan.flags == alone.flags and plan.added == alone.added
        assert plan.peak_bytes == alone.peak_bytes


def test_48gb_card(config_bases):
    """Qwen-Image's bf16 base alone is 38.1 GiB (20.43 B parameters) and its measured trainable state ~12 GiB more:
    only fp8 storage fits 44 GiB. TI2V-5B (26.4 GiB allocated) fits as it is. A14B's two transformers in fp8 are
    ~26 GiB, and its phase 1 measured 57.9 GiB allocated with them: nothing fits, and the error says so before
    loading, naming the memory needed and the flag sets tried."""
    args, plan = _plan(config_bases, "qwen-image", BUDGETS["48gb"])
    assert plan.added == ["--base_fp8"] and args.base_fp8
    assert _plan(config_bases, "wan2.2-ti2v-5b", BUDGETS["48gb"])[1].added == []
    for family in ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"):
        with pytest.raises(memory.MemoryPlanError, match=r"at least \d+ GiB") as err:
            _plan(config_bases, family, BUDGETS["48gb"])
        text = str(err.value)
        assert "--offload_activations --base_fp8" in text and "Tried:" in text and "44.0 GiB" in text


def test_leftover_memory_keeps_block_activations(config_bases):
    """Under `--gradient_checkpointing` the memory the chosen flags leave keeps the last blocks' activations
    (`--uncheckpointed_blocks`). Qwen-Image at 1024x1024 (4096 image + 512 text rows, W = 24 x 3072 + 6 x 12288 bytes
    of working set per row): a kept block is estimated at 0.8 W a row instead of its 2 x 3072-byte input (measured on
    an H100: 0.41 GiB per kept block, `train_qwen_kept_p*.json`); the plan counts it at W while filling and keeps the
    most that leave the margin (3 GiB + 1%) free. On the H200 all 60 fit; with offloaded activations (A14B phase 1,
    80 GB) none are kept."""
    rows, width, step = 4096 + 512, 24 * 3072 + 6 * 12288, 2 * 3072
    block, fill = rows * (0.8 * width - step), rows * (width - step)
    assert abs(block / GIB - 0.41) < 0.1  # the measured cost per block
    _, twenty = _plan(config_bases, "qwen-image", BUDGETS["80gb"], "--uncheckpointed_blocks", "20")  # as given
    args, thirty = _plan(config_bases, "qwen-image", BUDGETS["80gb"], "--uncheckpointed_blocks", "30")
    assert args.uncheckpointed_blocks == 30 and thirty.peak_bytes - twenty.peak_bytes == pytest.approx(10 * block)
    args, plan = _plan(config_bases, "qwen-image", BUDGETS["80gb"])
    n = args.uncheckpointed_blocks
    assert 30 < n < 60 and plan.flags.uncheckpointed_blocks == n and f"--uncheckpointed_blocks {n}" in plan.line()
    assert plan.peak_bytes == pytest.approx(thirty.peak_bytes + (n - 30) * block)
    checkpointed = thirty.peak_bytes - 30 * block  # the phase's estimate with no block kept

    def fits(peak):
        return peak + 3 * GIB + 0.01 * peak <= BUDGETS["80gb"]

    assert fits(checkpointed + n * fill) and not fits(checkpointed + (n + 1) * fill)
    assert _plan(config_bases, "qwen-image", BUDGETS["h200"])[0].uncheckpointed_blocks == 60
    # under --base_fp8 a kept block's matmuls save bf16 copies of its weights (layerwise casting, checked below):
    # the plan keeps none there, and counts the copies of blocks kept by the flag (Qwen-Image: 20.4 B / 60 blocks)
    args, _ = _plan(config_bases, "qwen-image", BUDGETS["48gb"])
    assert args.base_fp8 and args.uncheckpointed_blocks == 0
    _, fp8_4 = _plan(config_bases, "qwen-image", BUDGETS["h200"], "--base_fp8", "--uncheckpointed_blocks", "4")
    _, fp8_6 = _plan(config_bases, "qwen-image", BUDGETS["h200"], "--base_fp8", "--uncheckpointed_blocks", "6")
    copies = fp8_6.peak_bytes - fp8_4.peak_bytes - 2 * block  # two more blocks' bf16 weights
    assert 2 * 2 * 0.3e9 < copies < 2 * 2 * 20.43e9 / 60
    args, _ = _plan(config_bases, "wan2.2-t2v-a14b", BUDGETS["80gb"], "--train_phase", "1")
    assert args.offload_activations and args.uncheckpointed_blocks == 0
    args = _args(config_bases["qwen-image"], "qwen-image", "--memory", "off")
    assert memory.apply_memory_plan(args, get_family("qwen-image"), None, None, 4, _accelerator()) is None
    assert args.uncheckpointed_blocks is None  # the Distiller checkpoints every block
    with pytest.raises(ValueError, match="--uncheckpointed_blocks"):
        check_speed_args(_args(config_bases["qwen-image"], "qwen-image", "--uncheckpointed_blocks", "-1"))


def test_flags_the_user_passed_stay_on(config_bases):
    args, plan = _plan(config_bases, "qwen-image", BUDGETS["h200"], "--offload_activations")
    assert args.offload_activations and plan.added == []
    args, plan = _plan(config_bases, "qwen-image", BUDGETS["h200"], "--base_fp8")
    assert args.base_fp8


def test_gradient_checkpointing_is_added_where_needed(config_bases):
    """Without `--gradient_checkpointing` every block keeps its activations: Qwen-Image's 60 blocks at 4096 tokens
    do not fit 79 GiB beside the 38 GiB base; the plan turns it on (exact) before any offloading or fp8."""
    args = build_parser("t").parse_args(
        ["--pretrained_model_name_or_path", str(config_bases["qwen-image"]), "--prompts", "p", "--mixed_precision"]
        + ["bf16", "--cache_text_embeddings"]
    )
    fam = get_family("qwen-image")
    plan = memory.apply_memory_plan(args, fam, make_plan(args, fam), sizes(args), 4, _accelerator(), 79 * GIB)
    assert plan.added == ["--gradient_checkpointing"] and args.gradient_checkpointing


def test_candidates_pass_the_scripts_flag_checks(config_bases):
    """Every flag set the plan may choose is one the scripts accept, and its compile rule is the scripts'."""
    for family in SIZE_FLAGS:
        args = _args(config_bases[family], family)
        fam = get_family(family)
        work = memory.workload_from_args(args, fam, make_plan(args, fam), sizes(args), 4, "bf16", True)
        n = len(fam.transformer_names)
        for flags in memory.candidates(memory.given_flags(args), work, "bf16", n):
            for name in memory.PLAN_FLAGS:
                setattr(args, name, getattr(flags, name))
            check_speed_args(args)
            assert flags.compiled(True) == compile_wanted(args, _accelerator())


def test_no_plan_where_it_cannot_be_made(config_bases):
    """`--memory off`, several processes and a CPU without a budget leave the flags as they are."""
    for extra, acc in ((["--memory", "off"], _accelerator()), ([], _accelerator(n=2)), ([], _accelerator("cpu"))):
        args = _args(config_bases["wan2.2-t2v-a14b"], "wan2.2-t2v-a14b", *extra)
        fam = get_family("wan2.2-t2v-a14b")
        budget = 44 * GIB if acc.device.type == "cuda" else None
        assert memory.apply_memory_plan(args, fam, make_plan(args, fam), sizes(args), 4, acc, budget) is None
        assert not args.offload_activations


def test_device_budget_reads_the_per_process_cap(monkeypatch):
    """Under `torch.cuda.set_per_process_memory_fraction` the budget is the cap less what the process holds."""
    fraction = {"value": 0.5}

    def get_fraction(device=None):  # as torch's: an index-less torch.device("cuda") (accelerate's) is refused
        if torch.device(device).index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        return fraction["value"]

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (130 * GIB, 140 * GIB))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", get_fraction)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 1 * GIB)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert memory.device_budget(torch.device("cuda")) == 69 * GIB
    assert memory.device_budget("cuda:0") == 69 * GIB
    fraction["value"] = 1.0
    assert memory.device_budget("cuda") == 130 * GIB


def test_memory_budget_flag_is_checked(config_bases):
    args = _args(config_bases["qwen-image"], "qwen-image", "--memory_budget_gib", "0")
    fam = get_family("qwen-image")
    with pytest.raises(ValueError, match="--memory_budget_gib"):
        memory.apply_memory_plan(args, fam, make_plan(args, fam), sizes(args), 4, _accelerator())


@pytest.mark.parametrize("family", list(SIZE_FLAGS))
def test_family_is_read_before_loading(config_bases, family):
    """The plan needs the family from the config files: every family, I2V-A14B's `WanImageToVideoPipeline` too."""
    from diffusers_pdmd.training.runs import probe_family

    probed = probe_family(SimpleNamespace(pretrained_model_name_or_path=str(config_bases[family]), revision=None))
    assert probed is not None and probed.name == family


@pytest.mark.parametrize("bounds", [[], ["0.95", "0.5"], ["0.8"]])
def test_phase_transformers_agree_with_the_distiller(bounds):
    """The transformers each phase calls, from the boundaries alone, are those the trainer finds from its schedule
    (tiny T2V-A14B, switch at 0.875)."""
    from accelerate import Accelerator

    from diffusers_pdmd import tiny
    from diffusers_pdmd.training.distill import Distiller

    steps = ["1"] * (len(bounds) + 1)
    extra = ["--phase_boundaries", *bounds] if bounds else ["--steps_per_phase", "2", "2"]
    argv = ["--pretrained_model_name_or_path", "x", "--prompts", "p", "--lora_rank", "2", "--height", "16"]
    argv += ["--width", "16", "--num_frames", "5", *extra] + (["--steps_per_phase", *steps] if bounds else [])
    args = build_parser("t", video=True).parse_args(argv)
    pipe = tiny.build_pipeline("wan2.2-t2v-a14b")
    family = get_family(pipe)
    plan = make_plan(args, family)
    d = Distiller(args, Accelerator(cpu=True), family, pipe, plan)
    expert_base, uses = memory.phase_transformers(family, plan.boundaries, plan.num_phases)
    names = list(family.transformer_names)
    assert [names[i] for i in expert_base] == d.expert_base
    assert [{names[i] for i in u} for u in uses] == [d.transformers_used(k) for k in range(plan.num_phases)]


@pytest.mark.parametrize(
    "family,size", [("qwen-image", (64, 96, None)), ("wan2.2-t2v-a14b", (32, 48, 9)), ("wan2.2-ti2v-5b", (64, 32, 9))]
)
def test_latent_tokens_match_the_latents(family, size):
    """Tokens per sample equal the transformer's patches of the family's own latent shape."""
    from diffusers_pdmd import tiny

    components = tiny.build_components(family)
    fam = get_family(components)
    shape = fam.latent_shape(components, 1, *size)
    if size[2] is None:
        expected = shape[1]  # packed 2x2 patches
    else:
        pt, ph, pw = components["transformer"].config.patch_size
        expected = (shape[2] // pt) * (shape[3] // ph) * (shape[4] // pw)
    assert memory.latent_tokens(fam, *size) == expected


def test_fake_on_real_adds_its_adapters_and_optimizer(config_bases):
    """`--real_data` adds one LoRA fake score per trained phase on the transformer (fake-on-real): in phase 0 of a
    sequential Qwen-Image run its own adapter in fp32 (4 B) with AdamW's two fp32 moments (8 B), and phase 1's,
    made at the start and not yet trained, in bf16 (2 B); `W x r` LoRA parameters each."""
    fam = get_family("qwen-image")
    peaks = []
    for extra in ((), ("--real_data", "/some/folder")):
        args = _args(config_bases["qwen-image"], "qwen-image", *extra)
        sz = memory.family_sizes(memory.read_base_configs(args.pretrained_model_name_or_path), fam)
        work = memory.workload_from_args(args, fam, make_plan(args, fam), sizes(args), 4, "bf16", True)
        peaks.append(memory.phase_peak(sz, work, memory.given_flags(args), 0))
    lora = sz.lora_width[0] * args.lora_rank  # the fake score's rank is the experts' by default
    assert peaks[1]["total"] - peaks[0]["total"] == pytest.approx(lora * (4 + 8 + 2))
    assert peaks[1]["optimizer"] - peaks[0]["optimizer"] == pytest.approx(8 * lora)


def test_layerwise_casting_saves_bf16_weights_for_backward():
    """Why `--base_fp8` counts bf16 weight copies for blocks that are not recomputed: diffusers' layerwise casting
    casts each weight to bf16 for its matmul, and the matmul saves that copy for backward while the parameter goes
    back to fp8."""
    from diffusers.hooks import apply_layerwise_casting

    layer = torch.nn.Linear(64, 64).to(torch.bfloat16).requires_grad_(False)
    apply_layerwise_casting(layer, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert any(t.shape == (64, 64) and t.dtype == torch.bfloat16 for t in saved)
