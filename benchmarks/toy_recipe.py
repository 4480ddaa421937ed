#!/usr/bin/env python
"""The training recipe's defaults against the earlier ones, and the authors' recipe parts, on a 1-D mixture.

    python benchmarks/toy_recipe.py --seeds 0 1 2                 # the defaults (docs/benchmarks/quality.md)
    python benchmarks/toy_recipe.py --table parts --seeds 0 1 2   # the authors' recipe parts, alone and together

Data: modes at -1.5, 0, 1.5 (std 0.15) with weights 0.6, 0.3, 0.1. The teacher is an MLP (width 64, depth 3) fitted
by flow matching for 1000 steps with training times uniform on a shift-3 scale (as Wan and Qwen-Image train on
shifted times); the sampling schedules use the same shift. Each setting distils it with
[`distill_toy`](../src/diffusers_pdmd/training/toy_distill.py) (Phased DMD: boundary 0.5, 2 + 2 steps; SGTS: 4
steps), 150 generator updates per phase, 5 fake updates each, batch 256, lr 1e-4 / 1e-3, and then samples 20 000
points from fixed noise; a sample belongs to its nearest mode. Reported: the recovered mode weights (mean over the
seeds) and their total-variation distance to the true weights (mean ± std over the seeds). The real score is the
mixture's analytic velocity, so differences come from the recipe, not from a wrong teacher.

`--table parts` starts from today's defaults and adds each part of the authors' 2026 recipe
([`recipe`](../src/diffusers_pdmd/training/recipe.py)) alone, then together: the diversity loss (weight 0.05; the
real score solves its own 40-step shift-3 grid to the student's second sigma, step 15), IDA (decay 0.97; exact, the
fakes are full-parameter), random exit, the t margin (0.02 above s on the unshifted scale, t in [0.02, 0.98]),
fake-on-real (weight 0.1, real samples of the mixture noised to the student's second sigma in phase 0 and to the
boundary in phase 1). It adds two metrics: the 1-D Wasserstein-1 distance to 20 000 exact samples (W1) and the
spread of the samples around their mode over the true spread 0.15 (averaged over the modes; 1 is exact, below 1 is
the few-step generator's collapse toward the mode centres). `--table lora` repeats defaults and IDA with LoRA fakes
and generators (rank 4 on every layer of the teacher): no IDA, IDA factor by factor, IDA on the merged delta.
"""

import argparse
import time

import numpy as np
import torch

from diffusers_pdmd.training.recipe import RecipeSettings
from diffusers_pdmd.training.toy import GaussianMixture, MLPDenoiser, add_lora
from diffusers_pdmd.training.toy_distill import distill_toy, train_flow_matching


GM = GaussianMixture([-1.5, 0.0, 1.5], stds=0.15, weights=[0.6, 0.3, 0.1])
SHIFT = 3.0
NEW = {"fake_weighting": "paper", "timestep_sampling": "shifted", "betas": (0.0, 0.999)}
SETTINGS = {
    "new defaults (Eq. 13 weight, shifted t, beta1 0)": ("phased_dmd", NEW),
    "earlier weight min(1/sigma^2, 10)": ("phased_dmd", dict(NEW, fake_weighting="inverse_variance")),
    "uniform t": ("phased_dmd", dict(NEW, timestep_sampling="uniform")),
    "beta1 0.9": ("phased_dmd", dict(NEW, betas=(0.9, 0.999))),
    "earlier defaults (all three)": (
        "phased_dmd",
        {"fake_weighting": "inverse_variance", "timestep_sampling": "uniform", "betas": (0.9, 0.999)},
    ),
    "SGTS, new defaults": ("sgts", NEW),
    "SGTS, earlier defaults": (
        "sgts",
        {"fake_weighting": "inverse_variance", "timestep_sampling": "uniform", "betas": (0.9, 0.999)},
    ),
}


MARGIN = {"t_margin": 0.02, "t_lowest": 0.02, "t_highest": 0.98}
LIGHTX2V = {"diversity_weight": 0.05, "ida_decay": 0.97, "random_exit": True, **MARGIN}
REAL = {"real_sampler": GM.sample}
PARTS = {
    "today's defaults (paper)": {},
    "+ diversity loss 0.05": {"recipe": {"diversity_weight": 0.05}},
    "+ IDA 0.97": {"recipe": {"ida_decay": 0.97}},
    "+ random exit": {"recipe": {"random_exit": True}},
    "+ t margin": {"recipe": MARGIN},
    "+ fake-on-real 0.1": REAL,
    "all but fake-on-real (--recipe lightx2v)": {"recipe": LIGHTX2V},
    "all": {"recipe": LIGHTX2V, **REAL},
    "all but the diversity loss": {"recipe": dict(LIGHTX2V, diversity_weight=0.0), **REAL},
}
LORA = {
    "LoRA, no IDA": {},
    "LoRA, IDA 0.97 factor by factor": {"recipe": {"ida_decay": 0.97}},
    "LoRA, IDA 0.97 on the merged delta": {"recipe": {"ida_decay": 0.97}, "ida_mode": "lora_merged"},
}


def teacher(seed: int = 0):
    torch.manual_seed(seed)
    model = MLPDenoiser(dim=1, hidden=64, depth=3)
    return train_flow_matching(model, GM, steps=1000, batch_size=512, seed=seed, t_shift=SHIFT)


def distil(method: str, model, seed: int, generator_steps: int = 150, samples: bool = False, **recipe):
    """Recovered mode weights of `method` distilled from `model` with `recipe` (`distill_toy` keywords); with
    `samples=True` also the samples."""
    phased = method == "phased_dmd"
    result = distill_toy(
        method,
        model,
        GM.velocity,
        boundaries=(0.5,) if phased else (),
        steps_per_phase=(2, 2) if phased else (4,),
        shift=SHIFT,
        t_shift=SHIFT,
        generator_steps=generator_steps,
        fake_updates=5,
        batch_size=256,
        dim=1,
        seed=seed,
        **recipe,
    )
    z = torch.randn(20000, 1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = result.sample(z, generator=torch.Generator().manual_seed(5))
    return (GM.mode_weights(x), x) if samples else GM.mode_weights(x)


def sample_metrics(x: torch.Tensor) -> tuple[float, float]:
    """W1 to exact samples and the mean over modes of (sample std around the nearest mode) / (true std)."""
    exact = GM.sample(len(x), torch.Generator().manual_seed(11))
    w1 = (x.double().flatten().sort().values - exact.flatten().sort().values).abs().mean().item()
    idx = torch.cdist(x.double(), GM.means).argmin(1)
    spread = [
        x[idx == i].double().std().item() / GM.stds[i].item() for i in range(len(GM.means)) if (idx == i).sum() > 1
    ]
    return w1, float(np.mean(spread))


def reference_rows(model) -> dict:
    """W1 and spread of the teacher MLP (40 shift-3 Euler steps) and of the analytic velocity in 4 shift-3 steps."""
    from diffusers_pdmd.training.recipe import teacher_grid
    from diffusers_pdmd.training.toy import euler_sample

    z = torch.randn(20000, 1, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, fn, n in [
        ("teacher MLP, 40 Euler steps", model, 40),
        ("analytic velocity, 4 Euler steps", GM.velocity, 4),
    ]:
        with torch.no_grad():
            x = euler_sample(lambda x, t, c, fn=fn: fn(x, t), z, teacher_grid(n, SHIFT))
        out[name] = (GM.mode_weights(x).tolist(), *sample_metrics(x))
        print(name, out[name], flush=True)
    return out


def ida_lora_fidelity(model, seeds) -> None:
    """Per IDA call on the LoRA toy (hidden layers): how far each LoRA variant lands from the exact merged update
    `T = d F + (1 - d) G` (deltas `F = s B_f A_f`, `G = s B_g A_g`), as `|W - T| / |T - F|`, and which share of the
    generator's part `(1 - d) G` the merged rank-r refactor keeps. Records the calls by wrapping
    `toy_distill.ida_lora_update` (the run itself is unchanged)."""
    import diffusers_pdmd.training.toy_distill as td

    merged, factor, kept = [], [], []

    def recording(fake_factors, generator_factors, decay, scale_f, scale_g):
        fake_factors, generator_factors = list(fake_factors), list(generator_factors)
        before = [(b.detach().double().clone(), a.detach().double().clone()) for b, a in fake_factors]
        td_ida(fake_factors, generator_factors, decay, scale_f, scale_g)
        for (b_f, a_f), (b, a), (b_g, a_g) in zip(before, fake_factors, generator_factors):
            if b_f.shape[0] == 1:
                continue
            f, g = scale_f * b_f @ a_f, scale_g * b_g.double() @ a_g.double()
            t, w = decay * f + (1 - decay) * g, scale_f * b.double() @ a.double()
            fac = scale_f * (decay * b_f + (1 - decay) * b_g.double()) @ (decay * a_f + (1 - decay) * a_g.double())
            merged.append(((w - t).norm() / (t - f).norm()).item())
            factor.append(((fac - t).norm() / (t - f).norm()).item())
            kept.append(((w - decay * f) * g).sum().item() / ((1 - decay) * g.norm().item() ** 2))

    td_ida, td.ida_lora_update = td.ida_lora_update, recording
    try:
        for seed in seeds:
            merged.clear(), factor.clear(), kept.clear()
            distil("phased_dmd", model, seed, recipe=RecipeSettings(ida_decay=0.97), ida_mode="lora_merged", **NEW)
            print(
                f"seed {seed}: |W - T| / |T - F|: merged {np.mean(merged):.3f}, "
                f"factor by factor {np.mean(factor):.3f}; generator share kept by the merged refactor {np.mean(kept):.3f}",
                flush=True,
            )
    finally:
        td.ida_lora_update = td_ida


def parts_table(model, seeds, settings: dict, generator_steps: int = 150) -> dict:
    """One row per setting: mode weights (mean), TV, W1 and spread (mean ± std over the seeds)."""
    rows = {}
    for name, setting in settings.items():
        setting = dict(setting)
        recipe = RecipeSettings(diversity_anchor_step=15, **setting.pop("recipe", {}))
        out = [
            distil("phased_dmd", model, seed, generator_steps, samples=True, recipe=recipe, **NEW, **setting)
            for seed in seeds
        ]
        w = torch.stack([o[0] for o in out])
        tv = (0.5 * (w - GM.weights).abs().sum(1)).numpy()
        w1, spread = np.array([sample_metrics(o[1]) for o in out]).T
        rows[name] = (w.mean(0).tolist(), tv, w1, spread)
        print(name, rows[name], flush=True)
    print("\n| setting | recovered weights (true 0.6 / 0.3 / 0.1) | TV distance | W1 | spread / true |")
    print("|---|---|---|---|---|")
    for name, (mean, tv, w1, spread) in rows.items():
        cells = [f"{a.mean():.3f} ± {a.std():.3f}" for a in (tv, w1, spread)]
        print(f"| {name} | {' / '.join(f'{v:.3f}' for v in mean)} | {' | '.join(cells)} |")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--table", default="defaults", choices=["defaults", "parts", "lora"])
    parser.add_argument("--generator_steps", type=int, default=150, help="Generator updates per phase.")
    parser.add_argument("--only", nargs="+", default=None, help="Only these rows of --table parts / lora.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    model = teacher()
    if args.table != "defaults":
        reference_rows(model)
        settings = PARTS if args.table == "parts" else LORA
        settings = {k: v for k, v in settings.items() if args.only is None or k in args.only}
        if args.table == "lora":
            torch.manual_seed(0)
            model = add_lora(model, 4)  # in place: the teacher's layers frozen, LoRA rank 4 on each
        rows = parts_table(model, args.seeds, settings, args.generator_steps)
        if args.table == "lora":
            ida_lora_fidelity(model, args.seeds)
        print(f"\nseeds {args.seeds}, {time.time() - start:.0f} s")
        return rows
    rows = {}
    for name, (method, recipe) in SETTINGS.items():
        w = torch.stack([distil(method, model, seed, **recipe) for seed in args.seeds])
        tv = 0.5 * (w - GM.weights).abs().sum(1)
        rows[name] = (w.mean(0).tolist(), float(tv.mean()), float(tv.std(unbiased=False)), w[:, 2].tolist())
        print(name, rows[name], flush=True)
    print()
    print("| setting | recovered weights (true 0.6 / 0.3 / 0.1) | TV distance | weight of the 0.1 mode per seed |")
    print("|---|---|---|---|")
    for name, (mean, tv, tv_std, light) in rows.items():
        light = " / ".join(f"{v:.3f}" for v in light)
        print(f"| {name} | {' / '.join(f'{v:.3f}' for v in mean)} | {tv:.3f} ± {tv_std:.3f} | {light} |")
    print(f"\nseeds {args.seeds}, {time.time() - start:.0f} s")
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
