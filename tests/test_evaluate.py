"""`python -m diffusers_pdmd.evaluate` and its metrics: properties that hold whatever the weights are, on tiny
random-weight DINO / CLIP / LPIPS / RAFT models built from configs (nothing downloads), and the command line on the
tiny families and on the digits teacher."""

import json
import math

import numpy as np
import pytest
import torch

from diffusers_pdmd import metrics
from diffusers_pdmd.evaluate import __main__ as cli
from diffusers_pdmd.evaluate import backbones, measure, samplers, validation_diversity


needs_torchvision = pytest.mark.skipif(
    __import__("importlib").util.find_spec("torchvision") is None, reason="torchvision is not installed"
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random-weight backbones saved as folders, as the user's Hub ids would be."""
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    from diffusers_pdmd import tiny

    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    dino = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 37,
        "patch_size": 8,
    }
    Dinov2Model(Dinov2Config(image_size=32, **dino)).save_pretrained(root / "dino")
    tokenizer = tiny.build_tokenizer("wan2.2-t2v-a14b")
    layers = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 16,
    }
    text = dict(layers, vocab_size=len(tokenizer), max_position_embeddings=32, eos_token_id=tokenizer.eos_token_id)
    text.update(bos_token_id=0, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config=text, vision_config=dict(layers, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    out = {"dino": root / "dino", "clip": root / "clip"}
    if __import__("importlib").util.find_spec("torchvision") is not None:
        out["lpips"] = backbones.save_lpips_folder(backbones.LPIPSModel("alex"), root / "lpips")
        out["raft"] = backbones.save_flow_folder(backbones.build_flow_model("raft_small"), "raft_small", root / "raft")
    return {k: str(v) for k, v in out.items()}


def _images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- formulas, against plain re-computations ---


def test_lpips_distance_by_hand():
    a = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # unit-normalised: (0.6, 0.8)
    b = torch.tensor([4.0, 3.0]).view(1, 2, 1, 1)  # (0.8, 0.6)
    d = metrics.lpips_distance([a], [b], [torch.tensor([1.0, 2.0])])
    assert d.item() == pytest.approx(1.0 * 0.2**2 + 2.0 * 0.2**2, rel=1e-5)
    assert metrics.lpips_distance([a], [a], [torch.tensor([1.0, 2.0])]).item() == 0.0


def test_clip_score_by_hand():
    e = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    t = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 1.0]])
    np.testing.assert_allclose(metrics.clip_score(e, t), [100.0, 0.0, 0.0], atol=1e-9)
    assert metrics.clip_score([[1.0, 1.0]], [[1.0, 0.0]])[0] == pytest.approx(100 / math.sqrt(2))


def test_cosine_similarity_of_known_features():
    # two prompts: orthogonal pair (cos 0) and a pair at 60 degrees (cos 0.5): mean 0.25
    f = np.array([[1.0, 0.0], [0.0, 5.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert metrics.mean_pairwise_cosine_similarity(f, [0, 0, 1, 1]) == pytest.approx(0.25)


def test_vbench_dynamic_rule():
    # 256x256 frames: threshold 6 px; 16 frames: 4 pairs above it make the video dynamic
    assert metrics.is_dynamic([7, 7, 7, 7] + [0] * 11, 256, 256)
    assert not metrics.is_dynamic([7, 7, 7] + [0] * 12, 256, 256)
    assert not metrics.is_dynamic([5.9] * 15, 256, 256)
    assert metrics.is_dynamic([3.1] * 15, 128, 512)  # threshold 3 px at a shorter side of 128
    assert metrics.dynamic_degree([True, False, False, True]) == 0.5
    m = torch.arange(100.0).view(1, 10, 10)
    assert metrics.top_fraction_mean(m, 0.05).item() == pytest.approx(np.mean([95, 96, 97, 98, 99]))
    flow = torch.zeros(1, 2, 4, 4)
    flow[:, 0], flow[:, 1] = 3.0, 4.0
    assert torch.all(metrics.flow_magnitude(flow) == 5.0)


# --- properties on the tiny backbones ---


def test_identical_samples_give_similarity_one_lpips_zero_fd_zero(models):
    x = _images(1).repeat(4, 1, 1, 1)
    feats = backbones.load_feature_model(models["dino"])(x)
    assert metrics.mean_pairwise_cosine_similarity(feats, [0] * 4) == pytest.approx(1.0, abs=1e-6)
    different = backbones.load_feature_model(models["dino"])(_images(4, seed=1))
    assert metrics.frechet_distance(different, different) == pytest.approx(0.0, abs=1e-6)
    if "lpips" in models:
        lpips = backbones.load_lpips_model(models["lpips"])
        assert torch.all(lpips(x, x) == 0)
        assert torch.all(lpips(x, _images(4, seed=2)) > 0)


def test_sampler_against_itself_is_distance_zero(models):
    feats = backbones.load_feature_model(models["dino"])(_images(6))
    fd = measure.fd_matrix({"a": feats, "b": feats.copy(), "c": feats[::-1] + 1.0})
    assert fd["a"]["a"] == fd["a"]["b"] == pytest.approx(0.0, abs=1e-6)
    assert fd["a"]["c"] == pytest.approx(feats.shape[1], rel=1e-6)  # a shift by 1 in every dimension: ||mu||^2 = D


def test_seed_permutation_changes_nothing(models):
    samples = list(_images(6))
    groups = np.array([0, 0, 0, 1, 1, 1])
    order = [2, 0, 1, 5, 3, 4]  # seeds permuted within each prompt
    feature_model = backbones.load_feature_model(models["dino"])
    f, fp = (measure.features_of(s, feature_model) for s in (samples, [samples[i] for i in order]))
    a, b = measure.diversity(f, groups), measure.diversity(fp, groups)
    assert a["dino_similarity"] == pytest.approx(b["dino_similarity"])
    assert a["dino_similarity_per_prompt"] == pytest.approx(b["dino_similarity_per_prompt"])
    assert metrics.frechet_distance(f, f[:3]) == pytest.approx(metrics.frechet_distance(fp, fp[:3]))
    if "lpips" in models:
        lpips = backbones.load_lpips_model(models["lpips"])
        a = measure.lpips_pairs(samples, groups, lpips)
        b = measure.lpips_pairs([samples[i] for i in order], groups, lpips)
        assert a == pytest.approx(b, rel=1e-5)


class TranslationFlow(torch.nn.Module):
    """A known-flow stand-in with RAFT's interface: the integer translation (dx, dy) that best maps image1 onto
    image2 (exhaustive search), as a uniform flow; a list of flows, the last the finest, as RAFT returns."""

    def __init__(self, search: int = 20):
        super().__init__()
        self.search = search
        self.unused = torch.nn.Parameter(torch.zeros(1))  # a device to read, as from RAFT

    def forward(self, image1, image2, num_flow_updates=12):
        flows = []
        for a, b in zip(image1, image2):
            shifts = [
                (dx, dy) for dx in range(-self.search, self.search + 1) for dy in range(-self.search, 1 + self.search)
            ]
            errors = [(torch.roll(a, (dy, dx), dims=(1, 2)) - b).pow(2).mean() for dx, dy in shifts]
            dx, dy = shifts[int(torch.stack(errors).argmin())]
            flows.append(torch.tensor([float(dx), float(dy)]).view(2, 1, 1).expand(2, *a.shape[1:]))
        return [torch.stack(flows)]


def _translated_video(k: int, frames: int = 5, size: int = 32):
    texture = torch.nn.functional.interpolate(_images(1, 8), size=(size, size), mode="bilinear")[0]
    return torch.stack([torch.roll(texture, (0, k * i), dims=(1, 2)) for i in range(frames)])


@pytest.mark.parametrize("k", [0, 1, 2])
def test_flow_of_a_translated_video_is_k_pixels(k):
    """Frames resized for RAFT (32 -> 128 px) and the flow scaled back: a translation by k pixels per frame reads k."""
    video = _translated_video(k)
    flow = backbones.video_flow(TranslationFlow(), video)
    assert flow.shape == (4, 2, 32, 32)
    torch.testing.assert_close(backbones.video_flow(TranslationFlow(), video, batch_size=3), flow)  # pairs in chunks
    magnitudes, flags = measure.motion([video], TranslationFlow())
    assert magnitudes[0] == pytest.approx(k, abs=1e-5)
    assert flags == [k > 6 * 32 / 256]


@needs_torchvision
def test_raft_interface_on_tiny_raft(models):
    flow = backbones.video_flow(backbones.load_flow_model(models["raft"]), _translated_video(1, frames=3))
    assert flow.shape == (2, 2, 32, 32) and torch.isfinite(flow).all()


def test_validation_diversity():
    from PIL import Image

    same = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))
    out = validation_diversity([[same, same], [same, same]])
    assert out["pixel_diversity"] == pytest.approx(0.0, abs=1e-6)
    images = [[torch.zeros(3, 16, 16), torch.ones(3, 16, 16)]]  # grey 0 vs 1: L2 over 256 pixels = 16
    assert validation_diversity(images)["pixel_diversity"] == pytest.approx(16.0)


# --- samplers and the command line ---


def test_sampler_grammar_and_errors(tmp_path):
    from diffusers_pdmd import tiny

    base = tiny.save_pipeline("qwen-image", tmp_path / "base")
    spec = samplers.parse_sampler(f"teacher={base}:steps=50,cfg=4")
    assert (spec.kind, spec.family, spec.steps, spec.cfg) == ("teacher", "qwen-image", 50, 4.0)
    spec = samplers.parse_sampler(f"light={tmp_path}/x.safetensors:base={base},preset=qwen-image-lightning-4steps")
    assert (spec.kind, spec.family) == ("released", "qwen-image")
    assert samplers.parse_sampler("ours=someone/qwen-image-phased-dmd").kind is None  # a Hub id, resolved at load
    for bad, match in [
        ("noequals", "NAME=SOURCE"),
        (f"t={base}:stepz=3", "KEY=VALUE"),
        (f"t={base}:preset=nope", "preset must be one of"),
        ("t=/does/not/exist", "neither an existing path nor a Hub id"),
        (f"t={tmp_path}", "neither a base pipeline"),
    ]:
        with pytest.raises(ValueError, match=match):
            samplers.parse_sampler(bad)


def _run(args, capsys=None):
    return cli.main([str(a) for a in args])


def _assert_outputs(out, samplers_, prompts):
    result = json.loads((out / "metrics.json").read_text())
    assert list(result["samplers"]) == samplers_
    assert (out / "report.md").read_text().count("|") > 10
    assert (out / "diversity_vs_cost.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "contact_sheets").iterdir()) == [
        f"prompt_{p:03d}.png" for p in range(prompts)
    ]
    return result


def test_cli_errors_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from diffusers_pdmd import tiny

    base = tiny.save_pipeline("qwen-image", tmp_path / "base")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    monkeypatch.setattr(samplers, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    common = ["--prompts", prompts, "--output_dir", tmp_path / "out", "--seeds", 2]
    cases = [
        (["--sampler", f"t={base}", "--height", 30, "--width", 32], "multiple of 16"),
        (["--sampler", "t=/nope", "--height", 32, "--width", 32], "neither an existing path"),
        (["--sampler", f"t={base}", "--height", 32, "--width", 32, "--metrics", "fid"], "--metrics"),
        (["--sampler", f"t={base}", "--sampler", f"t={base}", "--height", 32, "--width", 32], "unique"),
    ]
    wan = tiny.save_pipeline("wan2.2-t2v-a14b", tmp_path / "wan")
    cases.append(
        (["--sampler", f"q={base}", "--sampler", f"w={wan}", "--height", 32, "--width", 32], "cannot be compared")
    )
    for extra, match in cases:
        with pytest.raises(SystemExit):
            _run(common + extra)
        assert match in capsys.readouterr().err
    if __import__("importlib").util.find_spec("lpips") is None:
        with pytest.raises(SystemExit):
            _run(common + ["--sampler", f"t={base}", "--height", 32, "--width", 32, "--metrics", "lpips"])
        assert "pip install" in capsys.readouterr().err  # lpips (or, without torchvision, the eval extra)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SystemExit):
        _run(["--sampler", f"t={base}", "--prompts", tmp_path / "empty.txt", "--output_dir", tmp_path / "o"])
    assert "no prompts" in capsys.readouterr().err


@needs_torchvision
def test_cli_on_tiny_qwen_image_is_resumable(models, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    from diffusers_pdmd import PhasedDMDScheduler, PhasedMoEPipeline, tiny

    base = tiny.save_pipeline("qwen-image", tmp_path / "base")
    pipe = DiffusionPipeline.from_pretrained(base)
    scheduler = PhasedDMDScheduler.from_config(pipe.scheduler.config, phase_boundaries=[0.6], steps_per_phase=[1, 1])
    experts = tmp_path / "experts"
    PhasedMoEPipeline.from_pipe(pipe, scheduler=scheduler).save_pretrained(
        experts, experts_only=True, base_model=str(base)
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    args = ["--sampler", f"teacher={base}:steps=3,cfg=4", "--sampler", f"ours={experts}", "--prompts", prompts]
    args += ["--seeds", 2, "--output_dir", tmp_path / "out", "--height", 32, "--width", 32]
    args += ["--feature_model", models["dino"], "--clip_model", models["clip"], "--lpips_model", models["lpips"]]
    assert _run(args) == 0
    result = _assert_outputs(tmp_path / "out", ["teacher", "ours"], 2)
    teacher, ours = result["samplers"]["teacher"], result["samplers"]["ours"]
    assert teacher["forwards_per_sample"] == 6 and ours["forwards_per_sample"] == 2  # true CFG: 2 per step
    assert teacher["steps"] == 3 and ours["steps"] == 2
    assert "steps 3, cfg 4.0" in (tmp_path / "out" / "report.md").read_text()
    assert teacher["fd_to_reference"] == 0.0 and result["fd"]["ours"]["teacher"] >= 0.0
    assert 0 <= teacher["clip"] <= 100 and "flow" not in teacher  # images: no motion
    assert set(teacher["dino_similarity_per_prompt"]) == {"0", "1"}
    # a rerun samples nothing: every sample is on disk
    monkeypatch.setattr(samplers, "load_pipeline", lambda *a, **k: pytest.fail("sampled again"))
    assert _run(args + ["--metrics", "diversity,cost"]) == 0


@needs_torchvision
def test_cli_on_tiny_wan_measures_motion(models, tmp_path):
    from diffusers_pdmd import tiny

    base = tiny.save_pipeline("wan2.2-t2v-a14b", tmp_path / "base")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    args = ["--sampler", f"teacher={base}:steps=2", "--prompts", prompts, "--seeds", 2, "--output_dir", tmp_path / "o"]
    args += ["--height", 16, "--width", 16, "--num_frames", 5, "--metrics", "diversity,flow,fd,cost"]
    args += ["--feature_model", models["dino"], "--flow_model", models["raft"]]
    assert _run(args) == 0
    result = _assert_outputs(tmp_path / "o", ["teacher"], 1)
    row = result["samplers"]["teacher"]
    assert row["forwards_per_sample"] == 4 and row["flow"] >= 0 and 0 <= row["dynamic_degree"] <= 1
    video, record = samplers.load_sample(samplers.sample_path(tmp_path / "o", "teacher", 0, 0))
    assert video.shape == (5, 3, 16, 16) and record["frames"] == 5


@needs_torchvision
def test_cli_on_tiny_wan_image_to_video(models, tmp_path):
    """An image-to-video teacher through the command line, with `ftfy` absent (diffusers' WanImageToVideoPipeline
    needs it to clean text prompts; the sampler encodes them without it) and `--image` as the first frame."""
    from PIL import Image

    from diffusers_pdmd import tiny

    base = tiny.save_pipeline("wan2.2-i2v-a14b", tmp_path / "base")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "first.png")
    args = ["--sampler", f"teacher={base}:steps=2", "--prompts", prompts, "--seeds", 2, "--output_dir", tmp_path / "o"]
    args += ["--height", 16, "--width", 16, "--num_frames", 5, "--metrics", "diversity,flow,cost"]
    args += ["--feature_model", models["dino"], "--flow_model", models["raft"], "--image", tmp_path / "first.png"]
    assert _run(args) == 0
    row = _assert_outputs(tmp_path / "o", ["teacher"], 1)["samplers"]["teacher"]
    assert row["forwards_per_sample"] == 4 and row["flow"] >= 0
    video, _ = samplers.load_sample(samplers.sample_path(tmp_path / "o", "teacher", 0, 0))
    assert video.shape == (5, 3, 16, 16)


def test_cli_on_the_digits_demo_output(tmp_path):
    """The digits demo's folders (teacher pipeline, experts-only student) measured with the digits classifier as the
    backbone: the same functions the demo's own table uses."""
    from PIL import Image

    from diffusers_pdmd import PhasedDMDScheduler, PhasedMoEPipeline, digits

    if not (digits.ASSET_DIR / "model_index.json").is_file():
        pytest.skip("the shipped digits teacher is missing")
    teacher = digits.load_or_build_teacher(tmp_path / "teacher")
    base = digits.load_teacher(teacher)
    scheduler = PhasedDMDScheduler.from_config(base.scheduler.config, phase_boundaries=[0.875], steps_per_phase=[2, 2])
    student = tmp_path / "phased_dmd"
    PhasedMoEPipeline.from_pipe(base, scheduler=scheduler).save_pretrained(
        student, experts_only=True, base_model=str(teacher)
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(digits.PROMPTS[:2]) + "\n")
    args = [
        "--sampler",
        f"teacher={teacher}:steps=4,cfg={digits.TRUE_CFG_SCALE}",
        "--sampler",
        f"phased_dmd={student}",
    ]
    args += ["--prompts", prompts, "--seeds", 3, "--output_dir", tmp_path / "eval", "--height", 16, "--width", 16]
    args += ["--metrics", "diversity,fd,cost", "--feature_model", "digits", "--real_images", tmp_path / "real"]
    real = metrics.real_digits("test")[0][:12]
    (tmp_path / "real").mkdir()
    for i, image in enumerate(real):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            tmp_path / "real" / f"{i}.png"
        )
    assert _run(args) == 0
    result = _assert_outputs(tmp_path / "eval", ["teacher", "phased_dmd"], 2)
    assert result["feature_model"] == "digits"
    # FD to real data: the real digits' features, read back from the PNGs, against the teacher's
    real_back = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(tmp_path / "real" / f"{i}.png"), dtype=np.float32) / 255).permute(
                2, 0, 1
            )
            for i in range(12)
        ]
    )
    # the same numbers as the digits metrics compute from the same samples
    images = torch.stack(
        [
            samplers.load_sample(samplers.sample_path(tmp_path / "eval", "teacher", p, s))[0]
            for p in range(2)
            for s in range(3)
        ]
    )
    expected = metrics.mean_pairwise_cosine_similarity(metrics.features(images), [0, 0, 0, 1, 1, 1])
    assert result["samplers"]["teacher"]["dino_similarity"] == pytest.approx(expected)
    expected = metrics.frechet_distance(metrics.features(images), metrics.features(real_back))
    assert result["samplers"]["teacher"]["fd_to_real"] == pytest.approx(max(0.0, expected), rel=1e-6)


def test_cli_on_released_qwen_image_lightning(models, tmp_path):
    """Released experts with their preset sampler: Qwen-Image-Lightning's 4 steps without CFG (a LoRA file in its
    published layout, fabricated at tiny shapes as in test_released.py)."""
    from safetensors.torch import save_file
    from test_released import QWEN_MODULES, fabricate_lora

    from diffusers_pdmd import tiny

    base = tiny.save_pipeline("qwen-image", tmp_path / "base")
    tensors, _ = fabricate_lora(
        tiny.build_pipeline("qwen-image").transformer, {m: m for m in QWEN_MODULES}, "transformer_blocks", "", 0
    )
    lora = tmp_path / "Qwen-Image-Lightning-4steps-V1.0.safetensors"
    save_file(tensors, lora)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    args = [
        "--sampler",
        f"lightning={lora}:base={base}",
        "--prompts",
        prompts,
        "--seeds",
        2,
        "--output_dir",
        tmp_path / "o",
    ]
    args += ["--height", 32, "--width", 32, "--metrics", "diversity,cost", "--feature_model", models["dino"]]
    assert _run(args) == 0
    row = json.loads((tmp_path / "o" / "metrics.json").read_text())["samplers"]["lightning"]
    assert row["steps"] == 4 and row["forwards_per_sample"] == 4


def test_prompts_from_a_saved_dataset(tmp_path):
    import datasets

    from diffusers_pdmd.evaluate import load_prompts

    datasets.Dataset.from_dict({"caption": ["a cat", " ", "a dog"]}).save_to_disk(str(tmp_path / "d"))
    assert load_prompts(str(tmp_path / "d"), column="caption") == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="prompt_column"):
        load_prompts(str(tmp_path / "d"))


def test_lpips_matches_the_lpips_package():
    """Our LPIPS equals the `lpips` package's (its shipped heads, a random trunk: no download), where installed."""
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    reference = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    ours = backbones.lpips_from_state_dict("alex", reference.state_dict())
    x, y = _images(2, 64, seed=1), _images(2, 64, seed=2)
    torch.testing.assert_close(ours(x, y), reference(x, y, normalize=True).flatten().detach(), rtol=1e-5, atol=1e-6)
