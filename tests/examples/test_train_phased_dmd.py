"""The example scripts end to end on tiny random pipelines (CPU, offline)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_pdmd import tiny


ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "examples" / "phased_dmd"
PROMPTS = ["a handwritten digit seven", "a red cat", "a blue house"]


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    out = {family: tiny.save_pipeline(family, root / family) for family in tiny.FAMILIES}
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out["prompts"] = prompts
    return out


def _common(bases, family, out, *extra):
    args = [
        "--pretrained_model_name_or_path",
        str(bases[family]),
        "--prompts",
        str(bases["prompts"]),
        "--max_train_steps",
        "2",
        "--output_dir",
        str(out),
        "--max_sequence_length",
        "16",
        "--fake_updates_per_step",
        "2",
        "--lora_rank",
        "4",
        "--lora_alpha",
        "4",
        "--learning_rate",
        "1e-3",
    ]
    if family == "qwen-image":
        args += ["--resolution", "32"]
    else:
        args += [
            "--height",
            "32" if family == "wan2.2-ti2v-5b" else "16",
            "--width",
            "32" if family == "wan2.2-ti2v-5b" else "16",
            "--num_frames",
            "5",
        ]
    return args + list(extra)


def _lora_b_max(folder):
    sd = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    return max(v.abs().max().item() for k, v in sd.items() if "lora_B" in k)


def _sample(out, family):
    from diffusers_pdmd import PhasedMoEPipeline

    pipe = PhasedMoEPipeline.from_pretrained(str(out))
    g = torch.Generator().manual_seed(0)
    if family == "qwen-image":
        images = pipe(
            prompt="a red cat", height=32, width=32, generator=g, output_type="np", max_sequence_length=16
        ).images
        assert images.shape == (1, 32, 32, 3)
        return images
    size = 32 if family == "wan2.2-ti2v-5b" else 16
    frames = pipe(
        prompt="a red cat",
        height=size,
        width=size,
        num_frames=5,
        generator=g,
        output_type="np",
        max_sequence_length=16,
    ).frames
    assert frames.shape[:2] == (1, 5) and frames.shape[-1] == 3
    return frames


EXPECTED_STEPS = {"phased_dmd": ([0.875], [2, 2]), "dmd": ([], [1]), "sgts": ([], [4])}


@pytest.mark.parametrize("family", [f for f in tiny.FAMILIES if f != "wan2.2-i2v-a14b"])  # i2v: its own test below
@pytest.mark.parametrize("method", ["phased_dmd", "dmd", "sgts"])
def test_each_method_trains_loads_and_samples(bases, tmp_path, family, method):
    script = _load_script("train_phased_dmd_qwen_image" if family == "qwen-image" else "train_phased_dmd_wan22")
    out = tmp_path / "out"
    script.main(_common(bases, family, out, "--method", method, "--checkpointing_steps", "100"))

    config = json.loads((out / "phased_dmd_config.json").read_text())
    boundaries, steps = EXPECTED_STEPS[method]
    assert config["method"] == method and config["family"] == family
    assert config["phase_boundaries"] == boundaries and config["steps_per_phase"] == steps
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "PhasedDMDScheduler" and sched["stochastic_sampling"] == (method == "sgts")
    for e in config["experts"]:  # two generator updates moved every expert away from the teacher (B = 0)
        assert _lora_b_max(out / e["path"]) > 0
    if family == "wan2.2-t2v-a14b" and method == "phased_dmd":
        assert [e["base_transformer"] for e in config["experts"]] == ["transformer", "transformer_2"]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["generator_updates"] == 2 * len(steps)
    history = json.loads((out / "logs" / "history.json").read_text())
    for k in range(len(steps)):  # named for what they are: the mean of the phase's last (here: 2) updates
        dmd = [h["dmd_loss"] for h in history if h["phase"] == k]
        assert summary[f"phase_{k}_dmd_loss_mean_last_2"] == pytest.approx(sum(dmd) / 2)
    assert not any("final" in key for key in summary)
    # The experts also in ComfyUI's layout, named as the export names them.
    two_files = family == "wan2.2-t2v-a14b" and method == "phased_dmd"
    names = ["high_noise_model", "low_noise_model"] if two_files else [f"phase_{k}" for k in range(len(steps))]
    assert sorted(p.name for p in (out / "comfyui").glob("*.safetensors")) == [f"{n}.safetensors" for n in names]
    assert (out / "README.md").is_file() and "## ComfyUI" in (out / "README.md").read_text()
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.rglob("*"))
    _sample(out, family)


def test_acceptance_command_and_validation_grid(bases, tmp_path):
    out = tmp_path / "o"
    cmd = [
        sys.executable,
        str(SCRIPTS / "train_phased_dmd_qwen_image.py"),
        "--pretrained_model_name_or_path",
        str(bases["qwen-image"]),
        "--prompts",
        str(bases["prompts"]),
        "--phase_boundaries",
        "0.875",
        "--steps_per_phase",
        "2",
        "2",
        "--max_train_steps",
        "2",
        "--resolution",
        "32",
        "--output_dir",
        str(out),
        "--validation_prompts",
        "a red cat",
        "a blue house",
        "--validation_steps",
        "1",
        "--validation_seeds",
        "3",
    ]
    done = subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert (out / "validation_grid.png").is_file() and (out / "validation" / "step-2.png").is_file()
    for path in (out / "validation" / "step-2.png", out / "validation_grid.png"):  # the log says where they are
        assert f"Validation samples (one row per seed [0, 1, 2], one column per prompt): {path}" in done.stderr
    card = (out / "README.md").read_text()  # the run's prompt and size in the card's snippet
    assert 'pipe("a red cat", height=32, width=32,' in card
    assert "validation over 3 seeds: val/pixel_diversity" in done.stdout + done.stderr
    images = _sample(out, "qwen-image")
    assert np.isfinite(images).all()


def _run(args, log):
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / "train_phased_dmd_qwen_image.py"), *args],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("kill_after", [2, 3, 4])  # mid phase 0, exactly at the phase boundary, mid phase 1
def test_kill_and_resume_reaches_the_uninterrupted_state(bases, tmp_path, kill_after):
    args = _common(bases, "qwen-image", tmp_path / "x", "--max_train_steps", "3", "--checkpointing_steps", "1")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    with open(tmp_path / "ref.log", "w") as log:
        assert _run([*args, "--output_dir", str(ref)], log).wait(timeout=300) == 0

    with open(tmp_path / "cut.log", "w") as log:
        proc = _run([*args, "--output_dir", str(cut)], log)
        deadline = time.time() + 300
        while not (cut / f"checkpoint-{kill_after}").is_dir():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "cut.log").read_text()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (cut / "phased_dmd_config.json").exists()  # it really stopped mid-run
    with open(tmp_path / "resume.log", "w") as log:
        assert _run([*args, "--output_dir", str(cut), "--resume_from_checkpoint", "latest"], log).wait(300) == 0
    assert "Resumed from" in (tmp_path / "resume.log").read_text()

    for phase in (0, 1):
        a = load_file(str(ref / f"phase_{phase}" / "pytorch_lora_weights.safetensors"))
        b = load_file(str(cut / f"phase_{phase}" / "pytorch_lora_weights.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    s_ref = json.loads((ref / "training_summary.json").read_text())
    s_cut = json.loads((cut / "training_summary.json").read_text())
    assert s_ref == s_cut


def test_nan_loss_stops_and_keeps_last_checkpoint(bases, tmp_path, monkeypatch):
    from diffusers_pdmd.training import distill, steps

    calls = {"n": 0}
    real = steps.dmd_loss

    def poisoned(*a, **k):
        loss, logs = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), logs

    monkeypatch.setattr(steps, "dmd_loss", poisoned)
    script = _load_script("train_phased_dmd_qwen_image")
    out = tmp_path / "nan"
    with pytest.raises(distill.TrainingDivergedError, match=r"(?s)phase 1, step 0.*checkpoint-2"):
        script.main(_common(bases, "qwen-image", out, "--checkpointing_steps", "1"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "phased_dmd_config.json").exists()


def test_push_to_hub_builds_repo_and_card_without_leaking_token(bases, tmp_path, monkeypatch, capfd, caplog):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: RepoUrl(f"https://huggingface.co/{repo_id}"))

    def fake_upload(self, folder_path, repo_id, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        uploads.append((repo_id, files, kwargs))
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "upload_folder", fake_upload)
    secret = "hf_SECRETSECRETSECRET123"
    script = _load_script("train_phased_dmd_qwen_image")
    out = tmp_path / "push"
    script.main(
        _common(
            bases,
            "qwen-image",
            out,
            "--push_to_hub",
            "--hub_model_id",
            "me/digits-phased",
            "--hub_token",
            secret,
            "--validation_prompts",
            "a red cat",
        )
    )
    ((repo_id, files, kwargs),) = uploads
    assert repo_id == "me/digits-phased"
    card = (out / "README.md").read_text()
    assert str(bases["qwen-image"].resolve()) in card or "base_model" in card
    assert 'PhasedMoEPipeline.from_pretrained("me/digits-phased"' in card and 'pipe("a red cat"' in card
    assert "phased_dmd_config.json" in files and "phase_0/pytorch_lora_weights.safetensors" in files
    ignored = kwargs.get("ignore_patterns") or []
    assert any("checkpoint" in p for p in ignored) or not any(f.startswith("checkpoint") for f in files)
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err + caplog.text


def test_moe_teacher_routes_by_t(bases, tmp_path):
    """A low-noise-phase DMD query takes the high-noise teacher above the boundary and the low-noise one below."""
    from diffusers import DiffusionPipeline

    from diffusers_pdmd.families import get_family
    from diffusers_pdmd.training import distill

    script = _load_script("train_phased_dmd_wan22")
    args = script.parse_args(_common(bases, "wan2.2-t2v-a14b", tmp_path / "r", "--guidance_scale_2", "2.0"))
    from accelerate import Accelerator

    pipe = DiffusionPipeline.from_pretrained(str(bases["wan2.2-t2v-a14b"]))
    family = get_family(pipe)
    d = distill.Distiller(args, Accelerator(cpu=True), family, pipe, distill.make_plan(args, family))
    seen = {"transformer": [], "transformer_2": []}
    for name in seen:
        d.models[name].register_forward_pre_hook(
            lambda m, a, kw, name=name: seen[name].append(kw["timestep"].tolist()), with_kwargs=True
        )
    cond = family.encode_prompt(d.components, ["a red cat", "a red cat", "a red cat"], "cpu", max_sequence_length=16)
    neg = family.encode_prompt(d.components, [""], "cpu", max_sequence_length=16)
    x = torch.randn(3, *family.latent_shape(d.components, 1, 16, 16, 5)[1:])
    t = torch.tensor([0.95, 0.3, 0.9])  # phase 1 (s = 0) draws t from (0, 1]: both sides of 0.875
    d.teacher(cond, neg)(x, t)
    high = [v for call in seen["transformer"] for v in call]
    low = [v for call in seen["transformer_2"] for v in call]
    assert sorted(set(high)) == pytest.approx([900.0, 950.0]) and sorted(set(low)) == pytest.approx([300.0])
    # conditional + negative (CFG) in one forward of twice the batch
    assert [len(c) for c in seen["transformer"]] == [4] and [len(c) for c in seen["transformer_2"]] == [2]
    # the fake score of phase 1 routes the same way
    for v in seen.values():
        v.clear()
    d.fake(1, cond)(x, t)
    assert sorted({v for c in seen["transformer"] for v in c}) == pytest.approx([900.0, 950.0])
    assert sorted({v for c in seen["transformer_2"] for v in c}) == pytest.approx([300.0])
    # and the phase-1 generator expert lives on the low-noise transformer
    assert d.expert_base == ["transformer", "transformer_2"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--method", "ddim"], None),
        (["--steps_per_phase", "2", "2", "2"], "steps_per_phase"),
        (["--train_phase", "5"], "train_phase"),
        (["--phase_boundaries", "0.9", "0.95", "--steps_per_phase", "1", "1", "1"], "phase_boundaries"),
        (["--fake_full_finetune", "--phase_order", "alternate"], "fake_full_finetune"),
        (["--max_train_steps", "0"], "max_train_steps"),
    ],
)
def test_bad_flags_fail_clearly(bases, tmp_path, extra, match):
    script = _load_script("train_phased_dmd_qwen_image")
    if match is None:  # argparse choices
        with pytest.raises(SystemExit):
            script.main(_common(bases, "qwen-image", tmp_path / "bad", *extra))
        return
    with pytest.raises(ValueError, match=match):
        script.main(_common(bases, "qwen-image", tmp_path / "bad", *extra))
    assert not (tmp_path / "bad" / "phased_dmd_config.json").exists()


def test_two_processes_give_the_loss_curve_of_one(bases, tmp_path):
    """DDP over 2 CPU processes with batch 1 each equals 1 process with batch 2 (same global samples).

    Measured: fake-score losses agree to 1e-4 relative, DMD losses (which are differences of two nearly equal
    predictions, about 1e-5 in the first phase) to 2%.
    """
    args = _common(bases, "qwen-image", tmp_path / "x", "--max_train_steps", "3")
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    script = str(SCRIPTS / "train_phased_dmd_qwen_image.py")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, script, *args, "--train_batch_size", "2", "--output_dir", str(one)],
        env=env,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            script,
            *args,
            "--train_batch_size",
            "1",
            "--output_dir",
            str(two),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    h1 = json.loads((one / "checkpoint-6" / "training_state.json").read_text())["history"]
    h2 = json.loads((two / "checkpoint-6" / "training_state.json").read_text())["history"]
    assert len(h1) == len(h2) == 6
    for a, b in zip(h1, h2):
        assert b["fake_loss"] == pytest.approx(a["fake_loss"], rel=1e-3)
        assert b["dmd_loss"] == pytest.approx(a["dmd_loss"], rel=0.1)


def test_i2v_a14b_trains_with_image_and_records_a_portable_base(bases, tmp_path):
    from PIL import Image

    from diffusers_pdmd import PhasedMoEPipeline

    script = _load_script("train_phased_dmd_wan22")
    image = tmp_path / "first_frame.png"
    Image.new("RGB", (16, 16), (200, 40, 90)).save(image)
    with pytest.raises(ValueError, match="--image"):
        script.main(_common(bases, "wan2.2-i2v-a14b", tmp_path / "no-image"))
    out = tmp_path / "out"
    extra = ["--image", str(image), "--base_model_id", "org/wan-i2v", "--validation_prompts", "a red cat"]
    script.main(_common(bases, "wan2.2-i2v-a14b", out, *extra, "--validation_steps", "100"))
    config = json.loads((out / "phased_dmd_config.json").read_text())
    assert config["family"] == "wan2.2-i2v-a14b" and config["phase_boundaries"] == [0.9]
    assert [e["base_transformer"] for e in config["experts"]] == ["transformer", "transformer_2"]
    assert config["base_model"] == "org/wan-i2v"  # not the local path: the folder loads elsewhere
    assert (out / "validation_grid.png").is_file()
    pipe = PhasedMoEPipeline.from_pretrained(str(bases["wan2.2-i2v-a14b"]), experts=str(out))
    frames = pipe(
        prompt_embeds=torch.randn(1, 4, 32),
        image=Image.open(image),
        height=16,
        width=16,
        num_frames=5,
        output_type="np",
    ).frames
    assert np.isfinite(frames).all()


def test_phase_1_run_continues_from_the_function_phase_0_wrote(bases, tmp_path, monkeypatch):
    """issue 20 item 5: with rank 4, alpha 2 (scale 1/2) the phase-0 file carries the scale in its weights (metadata:
    scaling 1). A `--train_phase 1` run reads it into its own adapter as the trained tensors (B = file B / scale,
    exact for a power of two) whatever `--lora_alpha` it runs with, and writes the same file back bit for bit."""
    from safetensors import safe_open

    from diffusers_pdmd.training import adapters as ad
    from diffusers_pdmd.training import distill

    script = _load_script("train_phased_dmd_qwen_image")
    out = tmp_path / "o"
    file = out / "phase_0" / "pytorch_lora_weights.safetensors"
    args = _common(bases, "qwen-image", out, "--lora_alpha", "2", "--checkpointing_steps", "100")
    script.main([*args, "--train_phase", "0"])
    first = load_file(str(file))
    with safe_open(str(file), "pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert config["transformer.r"] == config["transformer.lora_alpha"] == 4 and not config["transformer.use_rslora"]
    assert max(v.abs().max().item() for k, v in first.items() if "lora_B" in k) > 0

    seen = {}
    load = distill.load_earlier_experts

    def recording(d, folder, skip):
        load(d, folder, skip)
        seen["adapter"] = ad.adapter_state_dict(d.models[d.expert_base[0]], "phase_0")
        seen["scale"] = {m.scaling["phase_0"] for m in ad.tuner_layers(d.models[d.expert_base[0]])}

    monkeypatch.setattr(distill, "load_earlier_experts", recording)
    for alpha in ("2", "8"):  # the flags phase 0 was trained with, and another alpha (scale 2)
        script.main([*args, "--lora_alpha", alpha, "--train_phase", "1", "--overwrite_output_dir"])
        (scale,) = seen["scale"]
        assert scale == float(alpha) / 4
        for key, value in first.items():
            mine = seen["adapter"][key.removeprefix("transformer.")]
            torch.testing.assert_close(mine * scale if "lora_B" in key else mine, value, rtol=0, atol=0)
        again = load_file(str(file))
        assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
