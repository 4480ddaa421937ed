"""The authors' recipe parts (training/recipe.py, training/real_data.py) against plain re-implementations of the
formulas as their trainer (ModelTC/LightX2V, lightx2v_train, phased_dmd) computes them, and against closed forms."""

import argparse

import pytest
import torch
import torch.nn.functional as F

from diffusers_pdmd.training import recipe as rc
from diffusers_pdmd.training.flow import subinterval_target
from diffusers_pdmd.training.real_data import RealLatents, cache_latents, load_items
from diffusers_pdmd.training.simulate import backsimulate, phase_sigmas


def _their_shift(t, mu=7.0):
    # their `linear` time shift: mu / (mu + (1 / t - 1))
    return mu / (mu + (1 / t - 1))


def _toy_velocity(x, t):
    # a nonlinear velocity field of (x, t), broadcast over the batch
    return torch.sin(x) * (1.0 + t[:, None]) + 0.3 * x


# -- 1. diversity loss ---------------------------------------------------------------------------------------------


def test_teacher_grid_is_their_40_step_shifted_grid():
    theirs = torch.cat([_their_shift(torch.linspace(1.0, 1.0 / 40, 40, dtype=torch.float64)), torch.zeros(1)])
    ours = torch.tensor(rc.teacher_grid(40, 7.0), dtype=torch.float64)
    assert torch.allclose(ours, theirs, atol=1e-12)
    assert ours[10].item() == pytest.approx(21 / 22)  # S(0.75) at shift 7: the student's second sigma 0.9545
    with pytest.raises(ValueError, match="num_steps"):
        rc.teacher_grid(0, 7.0)
    assert rc.anchor_step_for(21 / 22, 40, 7.0) == 10  # their anchor: the student's second sigma
    assert rc.anchor_step_for(phase_sigmas([0.5], [2, 2], 3.0)[0][1], 40, 3.0) == 15  # the toy's


def test_diversity_target_of_a_constant_velocity_teacher_is_that_velocity():
    c = torch.tensor([[0.7, -1.3]])
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    sigmas = rc.teacher_grid(40, 7.0)
    x_a, sigma_a = rc.teacher_anchor(lambda x, t: c.expand_as(x), z, sigmas, 10)
    assert torch.allclose(rc.diversity_target(z, x_a, sigma_a), c.expand_as(z), atol=1e-5)


def test_diversity_loss_matches_their_anchor_loop_and_mse():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 3, generator=g)
    sigmas = rc.teacher_grid(40, 7.0)
    # their loop: `step_by_index` Euler steps 0..anchor-1 of the teacher, then MSE to (z - x_a) / (1 - sigma_a)
    x = z.clone()
    for i in range(10):
        x = x + (sigmas[i + 1] - sigmas[i]) * _toy_velocity(x, torch.full((8,), sigmas[i]))
    w = torch.nn.Parameter(torch.tensor(0.5))
    student = lambda x, t: w * x  # noqa: E731
    loss, logs = rc.diversity_loss(student, z, *rc.teacher_anchor(_toy_velocity, z, sigmas, 10), weight=0.05)
    expected = 0.05 * F.mse_loss(w * z, (z - x) / (1 - sigmas[10]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["div_loss"] == pytest.approx(expected.item() / 0.05, rel=1e-5)
    loss.backward()
    assert w.grad is not None and w.grad.abs() > 0
    with pytest.raises(ValueError, match="anchor_step"):
        rc.teacher_anchor(_toy_velocity, z, sigmas, 41)


# -- 2. IDA --------------------------------------------------------------------------------------------------------


def test_ida_update_is_their_in_place_ema_and_converges_geometrically():
    g = torch.Generator().manual_seed(2)
    fake = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    gen = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    start = [p.clone() for p in fake]
    for _ in range(7):
        rc.ida_update(fake, gen, 0.97)
    for p, p0, q in zip(fake, start, gen):  # closed form after n steps toward a fixed generator
        assert torch.allclose(p, 0.97**7 * p0 + (1 - 0.97**7) * q, atol=1e-6)
    with pytest.raises(ValueError, match="decay"):
        rc.ida_update(fake, gen, 0.0)
    with pytest.raises(ValueError, match="shape"):
        rc.ida_update([torch.zeros(2)], [torch.zeros(3)])


def test_ida_full_fake_from_a_lora_generator_is_the_ema_of_merged_weights():
    g = torch.Generator().manual_seed(8)
    w, fake = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    b, a = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    expected = 0.97 * fake + 0.03 * (w + 0.5 * b @ a)
    rc.ida_full_from_lora(fake, w, b, a, 0.97, scale_g=0.5)
    assert torch.allclose(fake, expected, atol=1e-6)
    bias, fake_bias = torch.randn(6, generator=g), torch.zeros(6)
    rc.ida_full_from_lora(fake_bias, bias, decay=0.9)  # a tensor without an adapter: pulled toward the base
    assert torch.allclose(fake_bias, 0.1 * bias)


def test_ida_lora_merged_is_the_best_rank_r_approximation_of_the_merged_ema():
    g = torch.Generator().manual_seed(3)
    b_f, a_f = torch.randn(12, 3, generator=g), torch.randn(3, 10, generator=g)
    b_g, a_g = torch.randn(12, 3, generator=g), torch.randn(3, 10, generator=g)
    exact = 0.97 * b_f @ a_f + 0.03 * b_g @ a_g
    u, s, vh = torch.linalg.svd(exact.double())
    best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart-Young
    b, a = rc.ida_lora_merged(b_f, a_f, b_g, a_g, 0.97)
    assert b.shape == b_f.shape and a.shape == a_f.shape
    assert torch.allclose((b @ a).double(), best, atol=1e-4)
    # exact when the generator's delta shares the fake's column space (rank of the EMA <= r)
    b, a = rc.ida_lora_merged(b_f, a_f, b_f, a_g, 0.97)
    assert torch.allclose(b @ a, b_f @ (0.97 * a_f + 0.03 * a_g), atol=1e-4)
    # with scales s = alpha / r: s_f B A = d s_f B_f A_f + (1 - d) s_g B_g A_g at full rank
    b, a = rc.ida_lora_merged(b_f, a_f, b_f, a_g, 0.97, scale_f=2.0, scale_g=0.5)
    assert torch.allclose(2.0 * b @ a, b_f @ (0.97 * 2.0 * a_f + 0.03 * 0.5 * a_g), atol=1e-4)
    # when the generator adds nothing outside the fake's row space, the fake's own A is kept
    b, a = rc.ida_lora_merged(b_f, a_f, b_g, a_f, 0.97)
    assert torch.allclose(a, a_f, atol=1e-5) and torch.allclose(b, 0.97 * b_f + 0.03 * b_g, atol=1e-5)
    # a layer narrower than r (one output): the EMA has rank 1 <= r, so it is exact
    b1, a1 = rc.ida_lora_merged(b_f[:1], a_f, b_g[:1], a_g, 0.97)
    assert torch.allclose(b1 @ a1, 0.97 * b_f[:1] @ a_f + 0.03 * b_g[:1] @ a_g, atol=1e-4)
    # a zero delta (both B = 0, as at initialisation) keeps A alive at the fake's scale
    b, a = rc.ida_lora_merged(torch.zeros_like(b_f), a_f, torch.zeros_like(b_g), a_g, 0.97)
    assert b.abs().max() == 0 and a.norm().item() == pytest.approx(a_f.norm().item(), rel=1e-5)


# -- 3. random exit ------------------------------------------------------------------------------------------------


def test_exit_step_range_is_theirs():
    # theirs (2 + 2 steps, match_step_index 2): high j in [int(diversity), 2), low j in [2, 4)
    assert rc.exit_step_range(2, 0, diversity=False) == (0, 1)
    assert rc.exit_step_range(2, 0, diversity=True) == (1, 1)
    assert rc.exit_step_range(2, 1, diversity=True) == (0, 1)
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([rc.sample_exit_step(3, 1, False, g) for _ in range(3000)])
    assert torch.bincount(draws, minlength=3).div(3000).sub(1 / 3).abs().max() < 0.04


def _their_rollout(z, sigmas, experts, boundary_index, j):
    """Their `_run_region_rollout`: steps 0..j-1 without gradient over the global grid, velocity at step j, then the
    anchor at the phase end s by one Euler step from sigma_j (s = 0 in the last phase)."""
    x = z
    for i in range(j):
        x = x + (sigmas[i + 1] - sigmas[i]) * experts[int(i >= boundary_index)](x, torch.full((len(x),), sigmas[i]))
    v = experts[int(j >= boundary_index)](x, torch.full((len(x),), sigmas[j]))
    s = sigmas[boundary_index] if j < boundary_index else 0.0
    return x + (s - sigmas[j]) * v


@pytest.mark.parametrize("phase,j", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_backsimulate_exit_matches_their_rollout(phase, j):
    sig = phase_sigmas([0.875], [2, 2], 7.0)
    grid = sig[0] + sig[1][1:]
    experts = [_toy_velocity, lambda x, t: 0.5 * _toy_velocity(x, t) - x]
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(4))
    x_s, s = rc.backsimulate_exit(z, sig, experts, phase, j)
    assert s == sig[phase][-1]
    assert torch.allclose(x_s, _their_rollout(z, grid, experts, 2, 2 * phase + j), atol=1e-5)


def test_phase_exit_at_the_last_step_is_backsimulation_and_grad_reaches_step_j_only():
    sig = phase_sigmas([0.5], [3, 1], 1.0)
    z = torch.randn(5, 1, generator=torch.Generator().manual_seed(5))
    w = torch.nn.Parameter(torch.tensor(0.3))
    calls = []

    def expert(x, t):
        calls.append(torch.is_grad_enabled())
        return w * x + t[:, None]

    assert torch.allclose(rc.backsimulate_exit(z, sig, [expert], 0, 2)[0], backsimulate(z, sig, [expert], 0)[0])
    calls.clear()
    x_s, x0 = rc.phase_exit(z, sig[0], expert, 1)
    assert calls == [False, True]
    (x_s.sum() + x0.sum()).backward()
    assert w.grad is not None
    with pytest.raises(ValueError, match="exit_step"):
        rc.phase_exit(z, sig[0], expert, 3)


# -- 4. margin -----------------------------------------------------------------------------------------------------


def _their_score_sigmas(raw_min, raw_max, shift=7.0, lowest=20, highest=980):
    """Their `sample_score_sigma_range` candidates: raw steps in [max(1, raw_min, 20), min(1000, raw_max, 981)),
    warped through the 1000-step shifted table (`timesteps[1000 - raw] / 1000`)."""
    table = _their_shift(torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)[:-1], shift)
    raw = torch.arange(max(1, raw_min, lowest), min(1000, raw_max, highest + 1))
    return table[1000 - raw]


def test_margin_t_bounds_are_their_candidate_range():
    high = _their_score_sigmas(500 + 20, 1000)  # phase 0 (s = 0.875 = raw 500), margin 20
    lo, hi = rc.margin_t_bounds(0.875, 7.0)
    assert (lo, hi) == (pytest.approx(high.min().item(), abs=1e-9), pytest.approx(high.max().item(), abs=1e-9))
    low = _their_score_sigmas(0 + 20, 1000)  # the last phase (s = 0)
    lo, hi = rc.margin_t_bounds(0.0, 7.0)
    assert (lo, hi) == (pytest.approx(low.min().item(), abs=1e-9), pytest.approx(low.max().item(), abs=1e-9))
    assert lo == pytest.approx(0.125)  # S(0.02) at shift 7
    with pytest.raises(ValueError, match="no `t` left"):
        rc.margin_t_bounds(0.9999, 7.0)


def test_sample_t_with_the_margin_stays_inside_it():
    from diffusers_pdmd.training.losses import sample_t

    lo, hi = rc.margin_t_bounds(0.875, 7.0)
    t = sample_t(0.875, 4000, torch.Generator().manual_seed(0), min_gap=lo - 0.875, t_max=hi, shift=7.0)
    assert t.min() >= lo - 1e-6 and t.max() <= hi + 1e-6
    assert t.min() < lo + 0.01 and t.max() > hi - 0.001


# -- 5. negative prompts -------------------------------------------------------------------------------------------


def test_default_negative_prompt_per_family():
    assert rc.default_negative_prompt("qwen-image") == " "
    wan = rc.default_negative_prompt("wan2.2-t2v-a14b")
    assert wan.startswith("色调艳丽，过曝，静态") and wan.endswith("背景人很多，倒着走")
    assert rc.default_negative_prompt("wan2.2-ti2v-5b") == wan
    with pytest.raises(ValueError, match="family"):
        rc.default_negative_prompt("sdxl")


# -- 6. fake-on-real -----------------------------------------------------------------------------------------------


def test_real_student_outputs_match_their_real_state():
    g = torch.Generator().manual_seed(6)
    x_real, eps = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    sigma_r, s = 21 / 22, 0.875
    x_r = rc.noise_real(x_real, sigma_r, eps)
    assert torch.allclose(x_r, (1 - sigma_r) * x_real + sigma_r * eps)  # their `scheduler.add_noise`
    x_s, x0 = rc.real_student_outputs(_toy_velocity, x_r, sigma_r, s)
    v = _toy_velocity(x_r, torch.full((4,), sigma_r))
    assert torch.allclose(x_s, x_r + (s - sigma_r) * v, atol=1e-6)  # their anchor: Euler from sigma to sigma_s
    assert torch.allclose(x0, x_r - sigma_r * v, atol=1e-6)  # their student_x0: Euler to 0
    with pytest.raises(ValueError, match="sigma_r"):
        rc.real_student_outputs(_toy_velocity, x_r, 0.5, 0.875)


def test_fake_on_real_target_is_their_phased_velocity_target():
    g = torch.Generator().manual_seed(7)
    x_s, eps = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    s, t = torch.full((64,), 0.875), 0.875 + 0.12 * torch.rand(64, generator=g)
    beta = (t**2 - ((1 - t) / (1 - s)) ** 2 * s**2).sqrt()[:, None]
    theirs = -x_s / (1 - s[:, None]) + ((t + (1 - t) * s**2 / (1 - s) ** 2)[:, None] / beta) * eps
    assert torch.allclose(subinterval_target(x_s, eps, s, t), theirs, atol=1e-4)


def test_real_sigmas_of_their_grid():
    assert rc.real_sigmas_lightx2v(phase_sigmas([0.875], [2, 2], 7.0)) == [pytest.approx(21 / 22), 0.875]


def test_real_data_folder_and_dataset_are_cached(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (4, 4), (60 * i, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"red {i}\n")
    calls = []

    def encode(image):
        calls.append(1)
        return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32)

    latents, captions = cache_latents(load_items(str(folder)), encode, tmp_path / "c.pt")
    assert captions == ["red 0", "red 1", "red 2"] and latents[:, 0].tolist() == [0, 60, 120]
    cache_latents(load_items(str(folder)), encode, tmp_path / "c.pt")
    assert len(calls) == 3  # the second call read the cache
    assert RealLatents(latents, captions)[1][1] == "red 1"

    import datasets

    ds = datasets.Dataset.from_dict({"img": [Image.new("RGB", (4, 4), (9, 9, 9))], "text": ["grey"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    latents, captions = cache_latents(load_items(str(tmp_path / "ds"), "img", "text"), encode)
    assert captions == ["grey"] and latents[0].tolist() == [9, 9, 9]
    with pytest.raises(ValueError, match="caption"):
        load_items(str(tmp_path / "ds"), "img", "caption")
    video = tmp_path / "latents"  # ready latents (e.g. encoded videos) are loaded as they are
    video.mkdir()
    torch.save(torch.ones(2, 3, 4), video / "clip.pt")
    (video / "clip.txt").write_text("a clip")
    latents, captions = cache_latents(load_items(str(video)), encode)
    assert latents.shape == (1, 2, 3, 4) and captions == ["a clip"] and len(calls) == 4
    (folder / "0.txt").unlink()
    with pytest.raises(ValueError, match="caption file"):
        load_items(str(folder))


# -- 7. the preset -------------------------------------------------------------------------------------------------


def test_paper_recipe_is_off_and_lightx2v_is_their_config():
    paper = rc.resolve_recipe("paper", "wan2.2-t2v-a14b")
    assert (paper.diversity_weight, paper.ida_decay, paper.random_exit, paper.t_margin) == (0.0, 1.0, False, 0.0)
    assert paper.phase_order == "sequential" and paper.negative_prompt == "" and paper.shift is None
    ours = rc.resolve_recipe("lightx2v", "wan2.2-t2v-a14b")
    assert (ours.diversity_weight, ours.diversity_teacher_steps, ours.diversity_anchor_step) == (0.05, 40, None)
    assert (ours.ida_decay, ours.random_exit, ours.t_margin, ours.t_lowest, ours.t_highest) == (
        0.97,
        True,
        0.02,
        0.02,
        0.98,
    )
    assert (ours.guidance_scale, ours.guidance_scale_2, ours.shift, ours.steps_per_phase) == (4.0, 4.0, 7.0, [2, 2])
    assert ours.phase_order == "alternate" and ours.negative_prompt == rc.WAN_NEGATIVE_PROMPT
    assert rc.resolve_recipe("lightx2v", "digits").negative_prompt == ""  # a family without a standard one
    qwen = rc.resolve_recipe("lightx2v", "qwen-image", {"ida_decay": 1.0})
    assert qwen.negative_prompt == " " and qwen.shift is None and qwen.ida_decay == 1.0
    with pytest.raises(ValueError, match="recipe"):
        rc.resolve_recipe("sensenova")
    with pytest.raises(ValueError, match="ida_decay"):
        rc.resolve_recipe("paper", explicit={"ida_decay": 1.5})
    with pytest.raises(ValueError, match="unknown"):
        rc.resolve_recipe("paper", explicit={"lr": 1.0})


def test_add_recipe_args_explicit_flags_win():
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase_order", default="sequential")
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    rc.add_recipe_args(parser)
    argv = ["--recipe", "lightx2v", "--no_random_exit", "--guidance_scale", "4.0", "--ida_decay", "0.9"]
    args = parser.parse_args(argv)
    explicit = rc.explicit_flags(parser, argv)
    assert explicit == {"recipe", "random_exit", "guidance_scale", "ida_decay"}
    assert parser.parse_args([]).phase_order == "sequential"  # defaults restored after the probe
    settings = rc.resolve_recipe_args(args, explicit, "qwen-image")
    assert settings.random_exit is False and settings.ida_decay == 0.9 and settings.diversity_weight == 0.05
    assert settings.phase_order == "alternate"  # not on the command line: the preset's
    settings = rc.resolve_recipe_args(
        parser.parse_args(["--phase_order", "sequential", "--recipe", "lightx2v"]), {"phase_order", "recipe"}
    )
    assert settings.phase_order == "sequential"


# -- the parts in the toy trainer ----------------------------------------------------------------------------------


def _toy_teacher():
    from diffusers_pdmd.training.toy import MLPDenoiser

    torch.manual_seed(0)
    return MLPDenoiser(dim=1, hidden=16, depth=2)


def test_distill_toy_ida_pulls_the_fake_toward_the_generator():
    from diffusers_pdmd.training.toy import GaussianMixture
    from diffusers_pdmd.training.toy_distill import distill_toy

    gm, teacher = GaussianMixture([-1.0, 1.0], stds=0.1), _toy_teacher()
    kw = {
        "boundaries": (),
        "steps_per_phase": (2,),
        "generator_steps": 1,
        "fake_updates": 0,
        "batch_size": 8,
        "dim": 1,
    }
    out = distill_toy("phased_dmd", teacher, gm.velocity, recipe=rc.RecipeSettings(ida_decay=0.25), **kw)
    for p_t, p_g, p_f in zip(teacher.parameters(), out.experts[0].parameters(), out.fake_scores[0].parameters()):
        assert torch.allclose(p_f, 0.25 * p_t + 0.75 * p_g, atol=1e-6)  # one generator step, no fake update


def test_distill_toy_runs_every_part_and_logs_them():
    from diffusers_pdmd.training.toy import GaussianMixture, add_lora
    from diffusers_pdmd.training.toy_distill import distill_toy

    gm = GaussianMixture([-1.0, 1.0], stds=0.1)
    settings = rc.RecipeSettings(
        diversity_weight=0.05,
        ida_decay=0.97,
        random_exit=True,
        t_margin=0.02,
        t_lowest=0.02,
        t_highest=0.98,
    )
    kw = {
        "boundaries": (0.5,),
        "steps_per_phase": (2, 2),
        "generator_steps": 2,
        "fake_updates": 1,
        "batch_size": 8,
        "dim": 1,
    }
    out = distill_toy(
        "phased_dmd",
        add_lora(_toy_teacher(), 2),
        gm.velocity,
        recipe=settings,
        real_sampler=gm.sample,
        ida_mode="lora_merged",
        t_shift=3.0,
        **kw,
    )
    assert "div_loss" in out.logs[0] and "div_loss" not in out.logs[-1]  # phase 0 only
    assert all("real_dmd" in log for log in out.logs)
    with pytest.raises(ValueError, match="ida_mode"):
        distill_toy("phased_dmd", _toy_teacher(), gm.velocity, ida_mode="ema", **kw)
