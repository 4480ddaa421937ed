"""Fake-on-real (`--real_data`, recipe part 6) wired into the trainer, on the tiny families and the digits teacher.

The generator's added term and the fake-on-real update are checked against plain re-implementations of the formula
(docs/method.md, part 6) on the draws the step makes; each test fails without the wiring.
"""

import json
import shutil

import pytest
import torch
from PIL import Image
from test_recipe_wiring import _train, _weights, bases  # noqa: F401  (bases: the module-scoped tiny bases)

from diffusers_pdmd.training import steps
from diffusers_pdmd.training.losses import dmd_loss, fake_score_loss


def _real_folder(folder, n=3, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a real photo number {i}")
    return folder


def _plain_real_xs(d, batches, phase):
    """The formula on a fresh real draw: `x_r = (1 - sigma_r) x + sigma_r eps`, `x_s = x_r + (s - sigma_r) G_k(x_r,
    sigma_r)` with their sigma_r (phase 0's second sigma, later phases' first); then the losses' `t` and noise."""
    real = batches.draw_real()
    sigmas = [float(v) for v in real.sigmas[phase]]
    sigma_r, s = (sigmas[1] if phase == 0 else sigmas[0]), sigmas[-1]
    x_r = (1 - sigma_r) * real.x_real + sigma_r * real.z
    x_s = x_r + (s - sigma_r) * d.expert(phase, real.cond)(x_r, torch.full((x_r.shape[0],), sigma_r))
    t, eps = batches.t_and_eps(real, s, x_s)
    return real, x_s, s, t, eps


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def test_the_generator_term_is_the_weighted_dmd_of_real_student_outputs(bases, tmp_path, monkeypatch):  # noqa: F811
    checked = []
    add = steps.add_fake_on_real

    def spy(d, batches, recipe, phase, loss, logs):
        before = batches.gen.get_state()
        real, x_s, s, t, eps = _plain_real_xs(d, batches, phase)
        teacher, fake_real = d.teacher(real.cond, batches.text.negative), d.fake_real(phase, real.cond)
        plain = 0.1 * dmd_loss(x_s, s, teacher, fake_real, t, eps)[0]
        batches.gen.set_state(before)  # the step makes the same draws
        out, out_logs = add(d, batches, recipe, phase, loss, logs)
        params = d.expert_params(phase)
        checked.append((out - loss, plain, _grads(out - loss, params), _grads(plain, params)))
        return out, out_logs

    monkeypatch.setattr(steps, "add_fake_on_real", spy)
    _train(bases, tmp_path / "plain", steps_=1)
    assert not checked  # off without --real_data
    _train(bases, tmp_path / "real", "--real_data", str(_real_folder(tmp_path / "data")), steps_=1)
    assert len(checked) == 2  # one generator update in each phase
    for term, plain, grads, plain_grads in checked:
        assert term.item() > 0 and torch.allclose(term, plain, rtol=1e-5, atol=1e-9)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        for g, p in zip(grads, plain_grads):
            assert (g is None) == (p is None) and (g is None or torch.allclose(g, p, rtol=1e-4, atol=1e-9))


def test_the_fake_real_update_is_the_subinterval_fake_loss_on_detached_real_outputs(bases, tmp_path, monkeypatch):  # noqa: F811
    checked, seen = [], []
    update, optimizer_step = steps.fake_real_update, steps.optimizer_step

    def spy_step(accelerator, params, opt, schedule, max_grad_norm):
        seen.append([None if p.grad is None else p.grad.clone() for p in params])
        return optimizer_step(accelerator, params, opt, schedule, max_grad_norm)

    def spy(d, batches, recipe, state, phase, step):
        before = batches.gen.get_state()
        real, x_s, s, t, eps = _plain_real_xs(d, batches, phase)
        plain = fake_score_loss(d.fake_real(phase, real.cond), x_s.detach(), s, t, eps)[0]
        params = state.opts[phase].fake_real_params
        plain_grads = _grads(plain, params)
        batches.gen.set_state(before)
        seen.clear()
        logs = update(d, batches, recipe, state, phase, step)
        checked.append((logs["fake_real_loss"], plain.item(), seen[-1], plain_grads))
        # its own adapter: `fake_real_<phase>`, on every teacher transformer, separate from the fake score's
        names = {n for m in d.models.values() for n, p in m.named_parameters() if any(p is q for q in params)}
        assert names and all(f"fake_real_{phase}" in n for n in names)
        return logs

    monkeypatch.setattr(steps, "optimizer_step", spy_step)
    monkeypatch.setattr(steps, "fake_real_update", spy)
    _train(bases, tmp_path / "plain", steps_=1)
    assert not checked
    _train(bases, tmp_path / "real", "--real_data", str(_real_folder(tmp_path / "data")), steps_=1)
    assert len(checked) == 2  # one fake update (and so one fake-on-real update) per generator update
    for loss, plain, grads, plain_grads in checked:
        assert loss == pytest.approx(plain, rel=1e-5)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        for g, p in zip(grads, plain_grads):
            assert (g is None) == (p is None) and (g is None or torch.allclose(g, p, rtol=1e-4, atol=1e-10))


# -- runs, records and resume ----------------------------------------------------------------------------------------


def test_real_data_runs_the_qwen_image_script_and_records_its_settings(bases, tmp_path):  # noqa: F811
    out = _train(
        bases, tmp_path / "q", "--real_data", str(_real_folder(tmp_path / "data")), "--fake_real_weight", "0.2"
    )
    recipe = json.loads((out / "training_summary.json").read_text())["recipe"]
    assert recipe["real_data"] == str(tmp_path / "data") and recipe["fake_real_weight"] == 0.2
    assert len(recipe["fake_real_sigmas"]) == 2 and recipe["fake_real_sigmas"][1] == 0.875  # phase 1: its first sigma
    assert "`real_data`" in (out / "README.md").read_text()
    history = json.loads((out / "logs" / "history.json").read_text())
    assert all("fake_real_loss" in row and "fake_real_dmd_loss" in row for row in history)
    assert len(list((out / "real_data_cache").glob("latents-qwen-image-32x32xNone.pt"))) == 1
    plain = json.loads((_train(bases, tmp_path / "p") / "training_summary.json").read_text())["recipe"]
    assert plain["real_data"] is None and plain["fake_real_sigmas"] is None


def test_real_data_runs_the_wan_script_with_images_as_one_frame(bases, tmp_path):  # noqa: F811
    data = _real_folder(tmp_path / "data", size=16)
    flags = ["--real_data", str(data), "--num_frames", "1", "--fake_real_sigmas", "0.95", "0.6"]
    out = _train(bases, tmp_path / "w", *flags, family="wan2.2-t2v-a14b")
    recipe = json.loads((out / "training_summary.json").read_text())["recipe"]
    assert recipe["fake_real_sigmas"] == [0.95, 0.6]
    # the fake-on-real score lives on both teacher transformers, routed by t like the fake score
    names = {p.name for p in (out / "checkpoint-2").glob("fake_real_*")}
    assert names == {"fake_real_1.transformer.safetensors", "fake_real_1.transformer_2.safetensors"}
    with pytest.raises(ValueError, match=r"`--real_data` latents have shape .*--num_frames 1"):
        _train(bases, tmp_path / "w5", "--real_data", str(data), family="wan2.2-t2v-a14b")


def test_real_data_resumes_bit_exact(bases, tmp_path):  # noqa: F811
    data = _real_folder(tmp_path / "data")
    flags = ["--real_data", str(data), "--checkpointing_steps", "1", "--seed", "3"]
    ref = _train(bases, tmp_path / "ref", *flags, steps_=2)
    assert {p.name for p in (ref / "checkpoint-3").glob("fake_real_*")} == {"fake_real_1.transformer.safetensors"}
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(ref / "checkpoint-3", cut / "checkpoint-3")
    _train(bases, cut, *flags, "--resume_from_checkpoint", "latest", steps_=2)
    for phase in (0, 1):
        a, b = _weights(ref / f"phase_{phase}"), _weights(cut / f"phase_{phase}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="--real_data"):  # a checkpoint of a run with fake-on-real
        _train(bases, cut, "--checkpointing_steps", "1", "--seed", "3", "--resume_from_checkpoint", "latest")


def test_without_real_data_every_update_is_as_before(bases, tmp_path, monkeypatch):  # noqa: F811
    """The fake-on-real flags alone change nothing: no real draw, no extra adapter, the same weights bit for bit."""
    from diffusers_pdmd.training import data

    draws = []
    draw_real = data.Batches.draw_real
    monkeypatch.setattr(data.Batches, "draw_real", lambda self: draws.append(1) or draw_real(self))
    a = _train(bases, tmp_path / "a", "--checkpointing_steps", "1", steps_=2)
    b = _train(bases, tmp_path / "b", "--checkpointing_steps", "1", "--fake_real_weight", "0.5", steps_=2)
    assert not draws
    for phase in (0, 1):
        wa, wb = _weights(a / f"phase_{phase}"), _weights(b / f"phase_{phase}")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list((a / "checkpoint-4").glob("fake_real_*"))
    _train(bases, tmp_path / "c", "--real_data", str(_real_folder(tmp_path / "data")), steps_=2)
    assert draws  # the spy sees real draws where there are some


# -- bad inputs fail before any model loads --------------------------------------------------------------------------


def test_bad_real_data_fails_before_loading(bases, tmp_path, monkeypatch):  # noqa: F811
    from diffusers_pdmd.training import distill

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(distill, "_load", no_load)
    empty = tmp_path / "empty"
    empty.mkdir()
    no_caption = _real_folder(tmp_path / "nocap")
    (no_caption / "1.txt").unlink()
    for folder, message in (
        (tmp_path / "missing", "`--real_data` .*no such folder"),
        (empty, "`--real_data` .*holds no"),
        (no_caption, "`--real_data` .*1.png has no caption"),
    ):
        with pytest.raises(ValueError, match=message):
            _train(bases, tmp_path / "o", "--real_data", str(folder))
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "ds"
    datasets.Dataset.from_dict({"picture": [Image.new("RGB", (32, 32))], "text": ["a"]}).save_to_disk(str(saved))
    with pytest.raises(ValueError, match="`--real_data` .*no column \\['image', 'caption'\\].*--real_image_column"):
        _train(bases, tmp_path / "o", "--real_data", str(saved))
    with pytest.raises(ValueError, match="`--fake_real_sigmas` needs one sigma per phase"):
        _train(bases, tmp_path / "o", "--real_data", str(empty), "--fake_real_sigmas", "0.9")
    assert not (tmp_path / "o").exists()


def test_real_data_with_image_conditioning_is_refused(tmp_path):
    from test_recipe_wiring import _load_script

    from diffusers_pdmd import tiny

    base = tiny.save_pipeline("wan2.2-i2v-a14b", tmp_path / "i2v")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    image = tmp_path / "first.png"
    Image.new("RGB", (16, 16)).save(image)
    argv = [
        "--pretrained_model_name_or_path",
        str(base),
        "--prompts",
        str(prompts),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    argv += ["--image", str(image), "--real_data", str(_real_folder(tmp_path / "data", size=16))]
    with pytest.raises(ValueError, match="`--real_data` .*not supported with image conditioning"):
        _load_script("train_phased_dmd_wan22").main([*argv, "--height", "16", "--width", "16", "--num_frames", "1"])


def test_real_data_runs_on_the_digits_teacher(tmp_path):
    """The digits demo's Phased DMD student with the real (test-split) digits as `--real_data`: their latents are the
    teacher's (`digits.encode_latents`, packed), and the run trains the fake-on-real score."""
    from diffusers_pdmd import demo, digits

    if not (digits.ASSET_DIR / "model_index.json").is_file():
        pytest.skip("the shipped digits teacher is missing")
    real = digits.write_real_digits(tmp_path / "real", split="test")
    assert len(list(real.glob("*.png"))) == 360 and (real / "0000.txt").read_text().startswith("a handwritten digit")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(digits.PROMPTS) + "\n")
    out = demo.distill(digits.ASSET_DIR, prompts, tmp_path / "s", "phased_dmd", 1, extra=["--real_data", str(real)])
    history = json.loads((out / "logs" / "history.json").read_text())
    assert len(history) == 2 and all(row["fake_real_dmd_loss"] > 0 for row in history)
    cached = torch.load(next((out / "real_data_cache").glob("*.pt")), weights_only=True)
    pipe = digits.load_teacher(digits.ASSET_DIR)
    images, _ = digits.real_digits("test")
    z = digits.encode_latents(pipe.vae, images[:4])  # the teacher's own latent space, then packed as it trains
    packed = pipe._pack_latents(z, 4, z.shape[1], z.shape[2], z.shape[3])
    assert torch.allclose(cached["latents"][:4], packed, atol=0.05)  # the PNGs hold the images to 8 bits
