"""The authors' recipe (`--recipe`, issue 21) wired into the trainer: each part on the tiny families.

Each test fails without its part's wiring: the flags resolve into the run and its records, the diversity loss
changes phase 0's expert, random exit trains step `j`, the margin keeps `t` in its bounds, IDA pulls the fake score.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_pdmd import tiny
from diffusers_pdmd.training import data, steps
from diffusers_pdmd.training import recipe as rc
from diffusers_pdmd.training.cli import build_parser


ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "examples" / "phased_dmd"
REQUIRED = ["--pretrained_model_name_or_path", "m", "--prompts", "p"]


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    out = {family: tiny.save_pipeline(family, root / family) for family in ("qwen-image", "wan2.2-t2v-a14b")}
    prompts = root / "prompts.txt"
    prompts.write_text("a red cat\na blue house\n")
    out["prompts"] = prompts
    return out


def _train(bases, out, *extra, family="qwen-image", steps_=1):
    size = (
        ["--resolution", "32"] if family == "qwen-image" else ["--height", "16", "--width", "16", "--num_frames", "5"]
    )
    script = "train_phased_dmd_qwen_image" if family == "qwen-image" else "train_phased_dmd_wan22"
    # a short teacher grid keeps the diversity loss's Euler solve cheap on the CPU
    _load_script(script).main(
        [
            "--pretrained_model_name_or_path",
            str(bases[family]),
            "--prompts",
            str(bases["prompts"]),
            "--output_dir",
            str(out),
            "--max_train_steps",
            str(steps_),
            "--max_sequence_length",
            "16",
            "--fake_updates_per_step",
            "1",
            "--lora_rank",
            "4",
            "--lora_alpha",
            "4",
            "--learning_rate",
            "1e-3",
            "--diversity_teacher_steps",
            "8",
            *size,
            *extra,
        ]
    )
    return out


def _weights(folder):
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


# -- part 7: the preset, resolved once and recorded ---------------------------------------------------------------


def test_recipe_flags_resolve_with_explicit_flags_winning():
    paper = vars(build_parser("t").parse_args(REQUIRED))
    assert paper == vars(build_parser("t").parse_args([*REQUIRED, "--recipe", "paper"]))
    assert (paper["diversity_weight"], paper["ida_decay"], paper["random_exit"], paper["shift"]) == (0.0, 1, 0, None)
    assert (paper["negative_prompt"], paper["phase_order"], paper["steps_per_phase"]) == ("", "sequential", [2, 2])

    q = build_parser("t").parse_args([*REQUIRED, "--recipe", "lightx2v"])
    assert (q.diversity_weight, q.ida_decay, q.random_exit, q.phase_order) == (0.05, 0.97, True, "alternate")
    assert (q.t_margin, q.t_lowest, q.t_highest, q.negative_prompt, q.shift) == (0.02, 0.02, 0.98, " ", None)
    assert not hasattr(q, "guidance_scale_2")  # a flag of the two-transformer script only

    w = build_parser("t", video=True).parse_args([*REQUIRED, "--recipe", "lightx2v"])
    assert (w.shift, w.guidance_scale_2, w.negative_prompt) == (7.0, 4.0, rc.WAN_NEGATIVE_PROMPT)

    given = [*REQUIRED, "--recipe", "lightx2v", "--phase_order", "sequential", "--ida_decay", "1", "--no_random_exit"]
    e = build_parser("t").parse_args([*given, "--negative_prompt", "", "--guidance_scale", "3"])
    assert (e.phase_order, e.ida_decay, e.random_exit, e.negative_prompt, e.guidance_scale) == (
        "sequential",
        1.0,
        False,
        "",
        3.0,
    )
    assert e.diversity_weight == 0.05  # the rest of the preset stays


def test_lightx2v_runs_the_qwen_image_script_and_records_the_recipe(bases, tmp_path):
    out = _train(bases, tmp_path / "q", "--recipe", "lightx2v")
    recipe = json.loads((out / "training_summary.json").read_text())["recipe"]
    assert recipe["recipe"] == "lightx2v" and recipe["diversity_weight"] == 0.05 and recipe["ida_decay"] == 0.97
    assert recipe["phase_order"] == "alternate" and recipe["negative_prompt"] == rc.QWEN_IMAGE_NEGATIVE_PROMPT
    assert (
        "## Training recipe" in (out / "README.md").read_text()
        and "`ida_decay`: `0.97`" in (out / "README.md").read_text()
    )


def test_lightx2v_runs_the_wan_script_with_its_shift_in_the_experts_scheduler(bases, tmp_path):
    out = _train(bases, tmp_path / "w", "--recipe", "lightx2v", family="wan2.2-t2v-a14b")
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["shift"] == 7.0 and sched["use_dynamic_shifting"] is False
    recipe = json.loads((out / "training_summary.json").read_text())["recipe"]
    assert recipe["shift"] == 7.0 and recipe["guidance_scale_2"] == 4.0
    assert recipe["negative_prompt"] == rc.WAN_NEGATIVE_PROMPT
    from diffusers_pdmd import PhasedDMDScheduler

    s = PhasedDMDScheduler.from_pretrained(str(out / "scheduler"))
    s.set_timesteps()
    assert float(s.sigmas[1]) == pytest.approx(rc.shift_time(0.75, 7.0), abs=1e-6)  # 0.9545: their second sigma


def test_parts_the_trainer_cannot_use_fail_clearly(bases, tmp_path):
    with pytest.raises(ValueError, match="`--real_data` needs one training size"):
        _train(bases, tmp_path / "r", "--real_data", str(tmp_path), "--resolutions", "32x32", "64x64")
    with pytest.raises(ValueError, match="`--random_exit`.*`--method dmd`"):
        _train(bases, tmp_path / "d", "--method", "dmd", "--random_exit")


# -- part 1: the diversity loss ------------------------------------------------------------------------------------


def test_diversity_loss_trains_phase_0_from_the_teacher_anchor(bases, tmp_path, monkeypatch):
    calls = []
    loss = rc.diversity_loss

    def spy(student, z, x_a, sigma_a, weight):
        calls.append((sigma_a, weight))
        return loss(student, z, x_a, sigma_a, weight)

    monkeypatch.setattr(rc, "diversity_loss", spy)
    plain = _train(bases, tmp_path / "plain", "--train_phase", "0")
    assert not calls
    div = _train(bases, tmp_path / "div", "--train_phase", "0", "--diversity_weight", "0.5")
    assert len(calls) == 1 and calls[0][1] == 0.5  # phase 0 only, once per micro-batch
    # the anchor is the teacher grid's step nearest the student's second sigma
    assert 0.875 < calls[0][0] < 1.0
    a, b = _weights(plain / "phase_0"), _weights(div / "phase_0")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the same draws, one more gradient


# -- part 3: random exit ---------------------------------------------------------------------------------------------


def test_random_exit_trains_a_drawn_step_of_the_phase(bases, tmp_path, monkeypatch):
    exits = []
    backsimulate_exit = rc.backsimulate_exit

    def spy(z, sigmas, experts, phase, j, grad=True):
        exits.append((phase, j))
        return backsimulate_exit(z, sigmas, experts, phase, j, grad=grad)

    monkeypatch.setattr(rc, "backsimulate_exit", spy)
    _train(bases, tmp_path / "plain", steps_=2)
    assert not exits
    _train(bases, tmp_path / "exit", "--random_exit", steps_=6)
    assert len(exits) == 12 and {j for _, j in exits} == {0, 1}  # both steps of each 2-step phase
    exits.clear()
    _train(bases, tmp_path / "exit_div", "--random_exit", "--diversity_weight", "0.05", steps_=4)
    assert {j for p, j in exits if p == 0} == {1}  # the diversity loss trains phase 0's first step


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_random_exit_and_diversity_resume_bit_exact(bases, tmp_path, precision):
    """Also under bf16 mixed precision, where the adapters are stored in bf16 and trained in float32: the resumed
    run's live phases get the checkpoint's float32 weights unrounded."""
    from accelerate.state import AcceleratorState

    flags = ["--recipe", "lightx2v", "--checkpointing_steps", "1", "--seed", "3", "--mixed_precision", precision]
    AcceleratorState._reset_state(reset_partial_state=True)  # one process, runs of different precisions
    ref = _train(bases, tmp_path / "ref", *flags, steps_=2)
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(ref / "checkpoint-2", cut / "checkpoint-2")
    AcceleratorState._reset_state(reset_partial_state=True)
    _train(bases, cut, *flags, "--resume_from_checkpoint", "latest", steps_=2)
    AcceleratorState._reset_state(reset_partial_state=True)
    for phase in (0, 1):
        a, b = _weights(ref / f"phase_{phase}"), _weights(cut / f"phase_{phase}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- part 4: the margin above s --------------------------------------------------------------------------------------


def test_margin_keeps_t_in_its_bounds(bases, tmp_path, monkeypatch):
    drawn = []
    sample_t = data.sample_t

    def spy(s, n, gen, **kw):
        t = sample_t(s, n, gen, **kw)
        drawn.append((float(s), kw["shift"], t))
        return t

    monkeypatch.setattr(data, "sample_t", spy)
    _train(bases, tmp_path / "m", "--t_margin", "0.05", "--t_lowest", "0.3", "--t_highest", "0.97", steps_=2)
    assert len(drawn) == 8  # fake and generator updates alike
    for s, shift, t in drawn:
        lo, hi = rc.margin_t_bounds(s, shift, 0.05, 0.3, 0.97)
        assert bool((t >= lo - 1e-6).all()) and bool((t <= hi + 1e-6).all())
        assert float(t.max()) < 0.9999  # without the margin the top of (s, 1] is reachable


# -- part 2: IDA -----------------------------------------------------------------------------------------------------


def _merged(layer, name):
    return layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight


def test_ida_pulls_the_lora_fake_toward_the_generator(bases, tmp_path, monkeypatch):
    gaps = []
    pull = steps.ida_pull

    def spy(d, phase, decay):
        from diffusers_pdmd.training.adapters import tuner_layers

        layers = [m for m in tuner_layers(d.models[d.expert_base[phase]]) if f"fake_{phase}" in m.lora_A]
        before = [(_merged(m, f"fake_{phase}") - _merged(m, f"phase_{phase}")).norm() for m in layers]
        pull(d, phase, decay)
        after = [(_merged(m, f"fake_{phase}") - _merged(m, f"phase_{phase}")).norm() for m in layers]
        gaps.append((sum(before), sum(after)))

    monkeypatch.setattr(steps, "ida_pull", spy)
    _train(bases, tmp_path / "plain", steps_=1)
    assert not gaps
    _train(bases, tmp_path / "ida", "--ida_decay", "0.5", steps_=2)
    assert len(gaps) == 4
    assert all(after < before for before, after in gaps)


def test_ida_pulls_a_full_fake_toward_base_plus_expert(bases, tmp_path, monkeypatch):
    calls = []
    full = rc.ida_full_from_lora

    def spy(w_f, w, b_g, a_g, decay, scale):
        calls.append(b_g is not None)
        target = w + (scale * b_g @ a_g if b_g is not None else 0)
        gap = (w_f - target).norm()
        full(w_f, w, b_g, a_g, decay, scale)
        assert (w_f - target).norm() <= gap * decay + 1e-6

    monkeypatch.setattr(rc, "ida_full_from_lora", spy)
    _train(bases, tmp_path / "f", "--fake_full_finetune", "--ida_decay", "0.9", "--train_phase", "0")
    assert calls and any(calls)
