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
