"""The example scripts as a new user meets them: finished runs, resumes with other flags, busy output folders,
TensorBoard, Ctrl-C, bad flags before any model loads, corrupt files, several resolutions (tiny models, CPU)."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file
from test_train_phased_dmd import SCRIPTS, _common, _load_script, bases  # noqa: F401  (bases is a fixture)

from diffusers_pdmd.training import distill


QWEN = "train_phased_dmd_qwen_image"


def _main(bases, out, *extra, family="qwen-image"):  # noqa: F811
    script = _load_script(QWEN if family == "qwen-image" else "train_phased_dmd_wan22")
    return script.main(_common(bases, family, out, *extra))


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the base pipeline starts loading."""
    from diffusers import DiffusionPipeline

    def refuse(*a, **k):
        raise AssertionError("the base model was loaded before the flags were checked")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def finished_run(bases, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("runs") / "done"
    _main(bases, out, "--checkpointing_steps", "1", "--fake_updates_per_step", "1")
    return out


def test_finished_run_resumed_exits_saying_so(bases, finished_run, no_model_load, caplog):  # noqa: F811
    caplog.set_level(logging.INFO)
    before = sorted(p.name for p in finished_run.iterdir())
    _main(bases, finished_run, "--resume_from_checkpoint", "latest", "--fake_updates_per_step", "1")
    assert "is finished" in caplog.text
    assert sorted(p.name for p in finished_run.iterdir()) == before


def test_resume_with_other_run_flags_is_refused_naming_each(bases, finished_run, no_model_load):  # noqa: F811
    extra = ["--resume_from_checkpoint", "latest", "--fake_updates_per_step", "1"]
    with pytest.raises(ValueError) as e:
        _main(
            bases, finished_run, *extra, "--steps_per_phase", "3", "1", "--max_train_steps", "10", "--lora_rank", "8"
        )
    for flag in ("--steps_per_phase", "--max_train_steps", "--lora_rank"):
        assert flag in str(e.value)
    assert "--method" not in str(e.value)
    with pytest.raises(ValueError, match=r"(?s)--method.*--phase_boundaries.*--steps_per_phase"):
        _main(bases, finished_run, *extra, "--method", "sgts")
    assert json.loads((finished_run / "phased_dmd_config.json").read_text())["method"] == "phased_dmd"


def test_resume_with_other_learning_rate_is_logged(bases, finished_run, no_model_load, caplog):  # noqa: F811
    caplog.set_level(logging.INFO)
    _main(
        bases,
        finished_run,
        "--resume_from_checkpoint",
        "latest",
        "--fake_updates_per_step",
        "1",
        "--learning_rate",
        "2e-3",
    )
    assert "--learning_rate 0.002 (the checkpoint had 0.001)" in caplog.text


def test_fresh_run_refuses_a_used_output_dir_unless_overwrite(bases, tmp_path):  # noqa: F811
    out = tmp_path / "o"
    _main(bases, out, "--checkpointing_steps", "1", "--max_train_steps", "2", "--fake_updates_per_step", "1")
    assert (out / "checkpoint-4").is_dir()
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        _main(bases, out, "--max_train_steps", "1", "--fake_updates_per_step", "1")
    assert (out / "checkpoint-4").is_dir()
    _main(bases, out, "--max_train_steps", "1", "--fake_updates_per_step", "1", "--overwrite_output_dir")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # none of the earlier run is left
    assert json.loads((out / "training_summary.json").read_text())["generator_updates"] == 2


def test_report_to_tensorboard(bases, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    _main(bases, out, "--max_train_steps", "1", "--fake_updates_per_step", "1", "--report_to", "tensorboard")
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, sorted(str(p) for p in out.rglob("*"))
    assert sum(p.stat().st_size for p in events) > 0


def _ctrl_c_as_in_a_terminal():
    """In the child before it runs Python: SIGINT delivered and at its default action, as a shell gives it (a test
    worker may have it ignored or blocked, and a child inherits both; Python then never sees Ctrl-C)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def python_ctrl_c():
    """Python's own SIGINT handler in this process for the test (a test worker may have changed it), restored after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(bases, tmp_path):  # noqa: F811
    out = tmp_path / "int"
    args = _common(bases, "qwen-image", out, "--max_train_steps", "200", "--checkpointing_steps", "1")
    cmd = [sys.executable, str(SCRIPTS / f"{QWEN}.py"), *args]
    proc = subprocess.Popen(
        cmd,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )
    deadline = time.time() + 300
    while not (out / "checkpoint-1").is_dir():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-2000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-2000:]
    lines = [line for line in output.splitlines() if line.startswith("Interrupted at global step")]
    assert len(lines) == 1, output[-2000:]
    assert "last checkpoint " + str(out / "checkpoint-") in lines[0]
    assert lines[0].endswith("--resume_from_checkpoint latest") and f"{QWEN}.py" in lines[0]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--phase_boundaries", "1.2"], "--phase_boundaries"),
        (["--phase_boundaries", "0.9", "0.5"], "--steps_per_phase"),
        (["--steps_per_phase", "2", "2", "2"], "--steps_per_phase"),
        (["--method", "sgts", "--phase_boundaries", "0.9", "0.5"], "--phase_boundaries"),
        (["--resolution", "36"], "--resolution"),
        (["--resolutions", "32x32", "32x36"], "--resolutions"),
        (["--resolutions", "32"], "--resolutions"),
        (["--prompts", "no/such/prompts.txt"], "--prompts"),
        (["--logit_std", "0"], "--logit_std"),
    ],
)
def test_bad_flags_fail_before_any_model_loads(bases, tmp_path, no_model_load, extra, match):  # noqa: F811
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=match):
        _main(bases, out, *extra)
    assert not out.exists()  # and no empty output folder is left behind


@pytest.mark.parametrize("extra, match", [(["--num_frames", "6"], "--num_frames"), (["--height", "20"], "--height")])
def test_bad_video_sizes_fail_before_any_model_loads(bases, tmp_path, no_model_load, extra, match):  # noqa: F811
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=match):
        _main(bases, out, *extra, family="wan2.2-t2v-a14b")
    assert not out.exists()


@pytest.mark.parametrize(
    "family, extra, match",
    [
        ("wan2.2-i2v-a14b", [], "`--image`.*required"),
        ("wan2.2-i2v-a14b", ["--image", "missing.png"], "`--image` 'missing.png' is not a file"),
        ("wan2.2-ti2v-5b", ["--image", "missing.png"], "`--image` 'missing.png' is not a file"),
        ("wan2.2-i2v-a14b", ["--image", "IMAGE", "--height", "20"], "--height"),
        ("wan2.2-i2v-a14b", ["--image", "NOT_AN_IMAGE"], "`--image` .* is not an image"),
    ],
)
def test_image_to_video_inputs_fail_before_any_model_loads(
    bases,  # noqa: F811
    tmp_path,
    no_model_load,
    family,
    extra,
    match,
):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "frame.png")
    (tmp_path / "notes.png").write_text("not an image")
    paths = {"IMAGE": str(tmp_path / "frame.png"), "NOT_AN_IMAGE": str(tmp_path / "notes.png")}
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=match):
        _main(bases, out, *[paths.get(a, a) for a in extra], family=family)
    assert not out.exists()


def test_finished_i2v_a14b_run_resumed_exits_before_loading(bases, tmp_path, monkeypatch, caplog):  # noqa: F811
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 40, 90)).save(tmp_path / "frame.png")
    out, extra = tmp_path / "done", ["--image", str(tmp_path / "frame.png"), "--fake_updates_per_step", "1"]
    _main(bases, out, *extra, "--max_train_steps", "1", "--checkpointing_steps", "1", family="wan2.2-i2v-a14b")
    experts = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    from diffusers import DiffusionPipeline

    def refuse(*a, **k):
        raise AssertionError("the base model was loaded to resume a finished run")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)
    caplog.set_level(logging.INFO)
    _main(bases, out, *extra, "--max_train_steps", "1", "--resume_from_checkpoint", "latest", family="wan2.2-i2v-a14b")
    assert "is finished" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == experts  # the experts not rewritten


def test_i2v_a14b_family_is_read_from_the_config_files(bases):  # noqa: F811
    from types import SimpleNamespace

    from diffusers_pdmd.training import runs

    args = SimpleNamespace(pretrained_model_name_or_path=str(bases["wan2.2-i2v-a14b"]), revision=None)
    family = runs.probe_family(args)
    assert family.name == "wan2.2-i2v-a14b" and family.image_concat and family.boundary_ratio == 0.9


def test_failed_run_leaves_no_empty_output_dir(bases, tmp_path, monkeypatch):  # noqa: F811
    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(distill.Distiller, "start_phase", boom)
    out = tmp_path / "fail" / "deeper"
    with pytest.raises(RuntimeError, match="out of memory"):
        _main(bases, out, "--report_to", "none")
    assert not out.exists()


def test_corrupt_or_mismatched_checkpoint_file_is_named(bases, tmp_path):  # noqa: F811
    out = tmp_path / "c"
    _main(bases, out, "--checkpointing_steps", "1", "--max_train_steps", "1", "--fake_updates_per_step", "1")
    path = out / "checkpoint-2" / "phase_0.safetensors"
    good = {k: v.clone() for k, v in load_file(str(path)).items()}
    path.write_bytes(b"\xff" * 64)
    extra = ["--max_train_steps", "1", "--fake_updates_per_step", "1", "--resume_from_checkpoint", "checkpoint-2"]
    (out / "training_summary.json").unlink()  # not finished: the checkpoint is read
    with pytest.raises(ValueError, match=re.escape(str(path))):
        _main(bases, out, *extra)
    save_file({k: v[..., :2].contiguous() if "lora_A" in k else v for k, v in good.items()}, str(path))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        _main(bases, out, *extra)


def test_corrupt_expert_of_an_earlier_phase_is_named(bases, tmp_path):  # noqa: F811
    out = tmp_path / "e"
    _main(bases, out, "--max_train_steps", "1", "--fake_updates_per_step", "1", "--checkpointing_steps", "100")
    for p in out.glob("checkpoint-*"):
        shutil.rmtree(p)
    bad = out / "phase_0" / "pytorch_lora_weights.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=re.escape(str(out / "phase_0"))):
        _main(bases, out, "--max_train_steps", "1", "--fake_updates_per_step", "1", "--train_phase", "1")


@pytest.mark.parametrize(
    "family, buckets, expected",
    [
        ("qwen-image", ["32x32", "16x48"], {(32, 32, None), (16, 48, None)}),
        ("wan2.2-t2v-a14b", ["5x16x16", "9x16x32"], {(16, 16, 5), (16, 32, 9)}),
    ],
)
def test_resolutions_one_bucket_per_batch(bases, tmp_path, monkeypatch, family, buckets, expected):  # noqa: F811
    seen = []
    real = distill.Distiller.schedule

    def schedule(self, h, w, f=None):
        seen.append((h, w, f))
        return real(self, h, w, f)

    monkeypatch.setattr(distill.Distiller, "schedule", schedule)
    out = tmp_path / "mr"
    _main(
        bases, out, "--max_train_steps", "3", "--fake_updates_per_step", "1", "--resolutions", *buckets, family=family
    )
    drawn = seen[1:]  # the first call is the Distiller's default schedule
    assert set(drawn) == expected
    assert len(drawn) == 2 * 3 * 2  # (1 fake + 1 generator batch) x 3 steps x 2 phases
    assert (out / "phased_dmd_config.json").is_file()


@pytest.mark.parametrize("family", ["qwen-image", "wan2.2-t2v-a14b"])
def test_t_is_drawn_on_the_teachers_own_shift(bases, tmp_path, family):  # noqa: F811
    """`--timestep_sampling shifted` (default) uses Wan's flow shift and Qwen-Image's exp(mu) of the training size."""
    import math

    from accelerate import Accelerator
    from diffusers import DiffusionPipeline

    from diffusers_pdmd.families import get_family

    script = _load_script(QWEN if family == "qwen-image" else "train_phased_dmd_wan22")
    args = script.parse_args(_common(bases, family, tmp_path / "s"))
    assert args.timestep_sampling == "shifted" and args.fake_weighting == "paper" and args.adam_beta1 == 0.0
    pipe = DiffusionPipeline.from_pretrained(str(bases[family]))
    config = pipe.scheduler.config
    fam = get_family(pipe)
    d = distill.Distiller(args, Accelerator(cpu=True), fam, pipe, distill.make_plan(args, fam))
    if (
        family == "qwen-image"
    ):  # QwenImagePipeline: mu from the image sequence length (32 x 32 px -> 16 x 16 latents / 2x2)
        seq = (32 // fam.vae_scale_factor // 2) ** 2
        m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        expected = math.exp(seq * m + config.base_shift - m * config.base_image_seq_len)
    else:
        expected = config.flow_shift
    assert d.time_shift == pytest.approx(expected)
    assert expected != pytest.approx(1.0)


def test_ctrl_c_swallowed_by_a_finalizer_still_ends_the_run(
    bases,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
    python_ctrl_c,
):
    """Python prints and drops a KeyboardInterrupt raised inside a finalizer (`__del__`, a GC callback); the run must
    still stop at its next update, with the usual resume line and exit code 130."""
    from diffusers_pdmd.training import steps

    real_update = steps.generator_update
    calls = {"n": 0}

    def update_then_swallowed_ctrl_c(*args, **kwargs):
        out = real_update(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            try:  # what a finalizer running at that moment does with the exception
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
            except KeyboardInterrupt:
                pass
        return out

    monkeypatch.setattr(distill, "generator_update", update_then_swallowed_ctrl_c)
    out = tmp_path / "int"
    with pytest.raises(SystemExit) as e:
        _main(bases, out, "--max_train_steps", "20", "--checkpointing_steps", "1")
    assert e.value.code == 130
    assert calls["n"] == 2  # stopped at the update after the Ctrl-C
    assert "Interrupted at global step 2; last checkpoint " in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
