import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from diffusers_pdmd import PhasedDMDScheduler
from diffusers_pdmd.training.flow import shift_time, unshift_time


def test_acceptance_example():
    scheduler = PhasedDMDScheduler(phase_boundaries=[0.875], steps_per_phase=[2, 2], shift=5.0)
    scheduler.set_timesteps()
    assert len(scheduler.timesteps) == 4
    assert [scheduler.phase_index(t) for t in scheduler.timesteps] == [0, 0, 1, 1]
    assert scheduler.sigmas[2].item() == 0.875
    assert scheduler.sigmas[0].item() == 1.0 and scheduler.sigmas[-1].item() == 0.0
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)


@pytest.mark.parametrize("shift", [1.0, 3.0, 12.0])
def test_intra_phase_spacing_is_shifted_uniform(shift):
    boundaries, steps = [0.9, 0.6], [3, 2, 4]
    scheduler = PhasedDMDScheduler(phase_boundaries=boundaries, steps_per_phase=steps, shift=shift)
    sig = scheduler.sigmas.double().numpy()
    assert np.all(np.diff(sig) < 0)
    edges = [1.0, *boundaries, 0.0]
    start = 0
    for k, n in enumerate(steps):
        phase = sig[start : start + n + 1]  # includes the next phase's first sigma
        assert phase[0] == pytest.approx(edges[k], abs=1e-7)
        assert phase[-1] == pytest.approx(edges[k + 1], abs=1e-6)
        u = unshift_time(phase, shift)
        np.testing.assert_allclose(np.diff(u), np.full(n, np.diff(u).mean()), atol=1e-6)
        assert all(scheduler.phase_index_for_sigma(x) == k for x in phase[:-1])
        start += n


def test_dynamic_shifting_from_qwen_config():
    qwen = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192
    )
    scheduler = PhasedDMDScheduler.from_config(qwen.config, phase_boundaries=[0.9], steps_per_phase=[2, 2])
    assert scheduler.config.use_dynamic_shifting and scheduler.config.max_shift == 0.9
    with pytest.raises(ValueError, match="mu"):
        scheduler.set_timesteps()
    mu = 0.7
    scheduler.set_timesteps(mu=mu)
    # phase 0: [1, 0.9) uniform in unshifted time, shifted by exp(mu)
    u0 = unshift_time(1.0, np.exp(mu))
    u1 = unshift_time(0.9, np.exp(mu))
    assert scheduler.sigmas[1].item() == pytest.approx(shift_time((u0 + u1) / 2, np.exp(mu)), abs=1e-6)
    assert scheduler.sigmas[2].item() == float(np.float32(0.9))  # the boundary exactly, in the float32 schedule


def test_from_wan_unipc_config_takes_flow_shift():
    wan = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=12.0)
    scheduler = PhasedDMDScheduler.from_config(wan.config)
    assert scheduler.config.shift == 12.0
    assert scheduler.config.phase_boundaries == [0.875] or tuple(scheduler.config.phase_boundaries) == (0.875,)


def test_save_load_roundtrip(tmp_path):
    scheduler = PhasedDMDScheduler(phase_boundaries=[0.8, 0.3], steps_per_phase=[1, 2, 1], shift=3.0)
    scheduler.save_pretrained(tmp_path)
    loaded = PhasedDMDScheduler.from_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").exists()
    assert list(loaded.config.phase_boundaries) == [0.8, 0.3]
    assert list(loaded.config.steps_per_phase) == [1, 2, 1]
    torch.testing.assert_close(loaded.sigmas, scheduler.sigmas)


def _public(config):
    """A config without the keys diffusers adds on load (`_class_name`, `_diffusers_version`, `_use_default_values`)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"steps_per_phase": (3, 1)}, {"phase_boundaries": (0.9, 0.4), "steps_per_phase": (1, 2, 1), "shift": 3.0}],
)
def test_config_survives_save_load_as_a_value(tmp_path, kwargs):
    # diffusers' SchedulerCommonTest.test_from_pretrained: the loaded config equals the object's, tuples included.
    scheduler = PhasedDMDScheduler(**kwargs)
    scheduler.save_pretrained(tmp_path)
    loaded = PhasedDMDScheduler.from_pretrained(tmp_path)
    assert _public(loaded.config) == _public(scheduler.config)
    assert loaded.config.steps_per_phase == scheduler.config.steps_per_phase


@pytest.mark.parametrize("kwargs", [{}, {"phase_boundaries": [0.9, 0.4], "steps_per_phase": [1, 2, 1], "shift": 3.0}])
@pytest.mark.parametrize("other_cls", [FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler])
def test_compatible_scheduler_round_trip_keeps_config(kwargs, other_cls):
    # diffusers' SchedulerCommonTest.test_compatibles: to a compatible scheduler and back gives the same config,
    # `_use_default_values` included.
    scheduler = PhasedDMDScheduler(**kwargs)
    assert other_cls in scheduler.compatibles
    back = PhasedDMDScheduler.from_config(other_cls.from_config(scheduler.config).config)
    assert {k: v for k, v in back.config.items() if k in scheduler.config} == dict(scheduler.config)
    assert sorted(back.config["_use_default_values"]) == sorted(scheduler.config["_use_default_values"])


def test_explicit_sigmas():
    scheduler = PhasedDMDScheduler(phase_boundaries=[0.5], steps_per_phase=[1, 1])
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5000001, 0.2])
    assert scheduler.sigmas[2].item() == 0.5
    assert [scheduler.phase_index(t) for t in scheduler.timesteps] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="decreasing"):
        scheduler.set_timesteps(sigmas=[1.0, 0.5, 0.7])


def test_explicit_sigmas_with_off_grid_boundary_route_like_wan():
    # Wan2.2-Lightning A14B: 4 Euler steps on shift-5 sigmas, high-noise model while t >= 875 (WanPipeline's rule).
    authors = [1.0, 0.9375, 5 / 6, 0.625]
    scheduler = PhasedDMDScheduler(phase_boundaries=[0.875], steps_per_phase=[2, 2])
    scheduler.set_timesteps(sigmas=authors)
    torch.testing.assert_close(scheduler.sigmas, torch.tensor([*authors, 0.0]))
    wan_rule = [0 if float(t) >= 875 else 1 for t in scheduler.timesteps]
    assert [scheduler.phase_index(t) for t in scheduler.timesteps] == wan_rule == [0, 0, 1, 1]
    # A threshold with no step in one of its phases is allowed: that expert is simply not used.
    scheduler.set_timesteps(sigmas=[0.8, 0.5, 0.2])
    assert [scheduler.phase_index(t) for t in scheduler.timesteps] == [1, 1, 1]


def test_same_grid_on_or_off_grid_boundary():
    # phase_boundaries=[5/6] with shift 5 makes the authors' grid itself, the boundary being its third sigma.
    ours = PhasedDMDScheduler(phase_boundaries=[5 / 6], steps_per_phase=[2, 2], shift=5.0)
    torch.testing.assert_close(ours.sigmas, torch.tensor([1.0, 0.9375, 5 / 6, 0.625, 0.0]))
    routed = PhasedDMDScheduler(phase_boundaries=[0.875], steps_per_phase=[2, 2])
    routed.set_timesteps(sigmas=ours.sigmas.tolist())
    phases = [[s.phase_index(t) for t in s.timesteps] for s in (ours, routed)]
    assert phases[0] == phases[1] == [0, 0, 1, 1]


def test_phase_index_at_a_boundary_is_the_phase_it_starts():
    scheduler = PhasedDMDScheduler(phase_boundaries=[0.75, 0.25], steps_per_phase=[1, 1, 1])
    # On the scheduler's own grid each phase starts on its boundary ...
    assert scheduler.sigmas[:3].tolist() == [1.0, 0.75, 0.25]
    assert [scheduler.phase_index(t) for t in scheduler.timesteps] == [0, 1, 2]
    # ... and explicit sigmas landing on a boundary give the same answer as the sigma-based query.
    scheduler.set_timesteps(sigmas=[0.9, 0.75, 0.5, 0.25, 0.1])
    assert [scheduler.phase_index(t) for t in scheduler.timesteps] == [0, 1, 1, 2, 2]
    assert [scheduler.phase_index_for_sigma(s) for s in (1.0, 0.75, 0.7500001, 0.7501, 0.25, 0.0)] == [
        0,
        1,
        1,
        0,
        2,
        2,
    ]


def test_euler_step_integrates_constant_velocity():
    scheduler = PhasedDMDScheduler(phase_boundaries=[0.875], steps_per_phase=[2, 2], shift=5.0)
    scheduler.set_timesteps()
    x0 = torch.randn(2, 3, 4)
    noise = torch.randn(2, 3, 4)
    x = noise.clone()
    v = noise - x0  # the exact velocity of a straight path: Euler is exact
    for t in scheduler.timesteps:
        out = scheduler.step(v, t, x)
        torch.testing.assert_close(out.pred_original_sample, x0, atol=1e-5, rtol=1e-5)
        x = out.prev_sample
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=1e-5)


def test_stochastic_step_renoises_prediction():
    scheduler = PhasedDMDScheduler(phase_boundaries=[0.5], steps_per_phase=[1, 1], stochastic_sampling=True)
    scheduler.set_timesteps()
    x0 = torch.randn(20000)
    sample = torch.randn(20000)
    v = sample - x0  # at sigma = 1, x_t = noise
    out = scheduler.step(v, scheduler.timesteps[0], sample, generator=torch.Generator().manual_seed(0))
    # prev = 0.5 * x0 + 0.5 * fresh noise, independent of the old noise
    resid = (out.prev_sample - 0.5 * x0) / 0.5
    assert abs(resid.std().item() - 1) < 0.03
    assert abs(torch.corrcoef(torch.stack([resid, sample]))[0, 1].item()) < 0.03


def test_scale_noise_and_add_noise():
    scheduler = PhasedDMDScheduler()
    x0, noise = torch.randn(3, 4), torch.randn(3, 4)
    ts = torch.tensor([1000.0, 500.0, 0.0])
    out = scheduler.add_noise(x0, noise, ts)
    sig = (ts / 1000)[:, None]
    torch.testing.assert_close(out, sig * noise + (1 - sig) * x0)
    torch.testing.assert_close(scheduler.scale_noise(x0, 250.0, noise), 0.25 * noise + 0.75 * x0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"phase_boundaries": [0.5, 0.7], "steps_per_phase": [1, 1, 1]}, "phase_boundaries"),
        ({"phase_boundaries": [1.2], "steps_per_phase": [1, 1]}, "phase_boundaries"),
        ({"phase_boundaries": [0.5], "steps_per_phase": [1]}, "steps_per_phase"),
        ({"phase_boundaries": [0.5], "steps_per_phase": [1, 0]}, "steps_per_phase"),
        ({"phase_boundaries": [0.5], "steps_per_phase": [1, 1.5]}, "steps_per_phase"),
        ({"shift": 0.0}, "shift"),
        ({"time_shift_type": "cubic"}, "time_shift_type"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PhasedDMDScheduler(**kwargs)


def test_invalid_calls():
    scheduler = PhasedDMDScheduler(phase_boundaries=[0.875], steps_per_phase=[2, 2])
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(num_inference_steps=5)
    scheduler.set_timesteps(num_inference_steps=4)
    with pytest.raises(ValueError, match="timestep"):
        scheduler.phase_index(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="sigma"):
        scheduler.phase_index(2000.0)
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(torch.zeros(1), 123.0, torch.zeros(1))


def test_phase_index_accepts_types():
    scheduler = PhasedDMDScheduler(phase_boundaries=[0.875], steps_per_phase=[2, 2])
    assert scheduler.phase_index(900) == 0
    assert scheduler.phase_index(875.0) == 1
    assert scheduler.phase_index(torch.tensor(100.0)) == 1
    assert scheduler.phase_index(torch.tensor([950.0])) == 0
