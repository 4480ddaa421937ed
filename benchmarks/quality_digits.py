#!/usr/bin/env python
"""Phased DMD vs SGTS vs DMD on the digits teacher, over several training seeds: docs/benchmarks/quality.md.

    python benchmarks/quality_digits.py --seeds 0 1 2 --max_train_steps 100 --samples_per_prompt 40
    python benchmarks/quality_digits.py --compare_recipe --seeds 0 1 2 --max_train_steps 100 --samples_per_prompt 40
    python benchmarks/quality_digits.py --compare_parts --seeds 0 1 2 --max_train_steps 60

For each seed, `diffusers_pdmd.demo.run` distils the teacher with the three methods (the unchanged example script)
and measures teacher and students with `diffusers_pdmd.metrics`; this script reports mean ± std over the seeds,
the grid of the first seed, and a plot of diversity against fidelity.

`--compare_recipe` distils Phased DMD only, once with the training defaults (Eq. 13 fake weight, `t` uniform on
the teacher's shifted scale, AdamW beta1 0) and once with the earlier ones (`--fake_weighting inverse_variance
--timestep_sampling uniform --adam_beta1 0.9`), and writes its table into the "Recipe defaults" section of the doc,
leaving the rest of the doc as it is.

`--compare_parts` distils Phased DMD with today's defaults, `--recipe lightx2v` and each of the authors' recipe parts
alone (issue 21; fake-on-real with the real train digits as `--real_data`); each (seed, row) result is saved under `--work_dir` and reused, so several processes can share the
rows (`--parts`) and `--table_only` writes the table of what is saved.
"""

import argparse
import json
import os
import pathlib
import platform
import shlex
import shutil
import sys
import time

import numpy as np
import torch

from diffusers_pdmd import demo, digits, metrics


ROOT = pathlib.Path(__file__).resolve().parents[1]


def mean_and_std(per_seed: dict, seeds) -> tuple[dict, dict]:
    """Mean and standard deviation over `seeds` of each model's metrics (`per_seed[seed][model][metric]`)."""
    names = list(per_seed[seeds[0]])
    keys = list(per_seed[seeds[0]][names[0]])
    mean = {n: {k: float(np.mean([per_seed[s][n][k] for s in seeds])) for k in keys} for n in names}
    std = {n: {k: float(np.std([per_seed[s][n][k] for s in seeds])) for k in keys} for n in names}
    return mean, std


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_train_steps", type=int, default=100)
    parser.add_argument("--samples_per_prompt", type=int, default=40)
    parser.add_argument("--work_dir", default="outputs/quality_digits")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks" / "quality.md"))
    parser.add_argument("--methods", nargs="+", default=list(demo.METHODS), choices=list(demo.METHODS))
    parser.add_argument("--extra", default="", help='more training-script flags: --extra "--fake_reuse_samples 5"')
    parser.add_argument("--compare_recipe", action="store_true", help="Phased DMD: new training defaults vs old.")
    parser.add_argument(
        "--compare_parts",
        action="store_true",
        help="Phased DMD: today's defaults vs --recipe lightx2v and the recipe's parts alone (issue 21).",
    )
    parser.add_argument("--parts", nargs="+", default=None, help="--compare_parts: which rows (default: all).")
    parser.add_argument(
        "--table_only", action="store_true", help="--compare_parts: write the table of the results already saved."
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    if args.compare_recipe:
        return compare_recipe(args, argv)
    if args.compare_parts:
        return compare_parts(args, argv)
    work = pathlib.Path(args.work_dir)
    start = time.time()
    per_seed = {}
    for seed in args.seeds:
        result = demo.run(
            work / f"seed{seed}",
            args.max_train_steps,
            args.samples_per_prompt,
            seed,
            methods=tuple(args.methods),
            extra=tuple(shlex.split(args.extra)),
        )
        per_seed[seed] = result["rows"]
        print(f"seed {seed}:\n{result['table']}\n", flush=True)
    mean, std = mean_and_std(per_seed, args.seeds)
    table = demo.markdown_table(mean, std)
    print(table)

    doc = pathlib.Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / f"seed{args.seeds[0]}" / "grid.png", doc.parent / "quality_grid.png")
    (doc.parent / "quality.json").write_text(json.dumps({"per_seed": per_seed, "mean": mean, "std": std}, indent=2))
    plot(mean, std, doc.parent / "quality_tradeoff.png")
    command = "python benchmarks/quality_digits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {platform.python_version()}"
    )
    text = TEMPLATE.format(
        table=table,
        clf_acc=metrics.digit_classifier().test_accuracy,
        cfg=digits.TRUE_CFG_SCALE,
        steps_teacher=digits.SAMPLE_STEPS,
        nfe_teacher=2 * digits.SAMPLE_STEPS,
        command=command.strip(),
        machine=machine,
        seeds=len(args.seeds),
        steps=args.max_train_steps,
        per_prompt=args.samples_per_prompt,
        minutes=(time.time() - start) / 60,
        analysis=analysis(mean, std),
    )
    old = doc.read_text() if doc.is_file() else ""
    if RECIPE_START in old:  # the recipe sections: --compare_recipe and the output of benchmarks/toy_recipe.py
        text = text.rstrip("\n") + "\n\n" + old[old.index(RECIPE_START) :]
    doc.write_text(text)
    print(f"wrote {doc}")


RECIPE_START = "<!-- recipe sections -->"
DIGITS_START, DIGITS_END = "<!-- digits recipe: start -->", "<!-- digits recipe: end -->"
RECIPES = {
    "new defaults": [],
    "earlier defaults": [
        "--fake_weighting",
        "inverse_variance",
        "--timestep_sampling",
        "uniform",
        "--adam_beta1",
        "0.9",
    ],
}


def compare_recipe(args, argv):
    """Phased DMD with the training defaults against the earlier ones, over `args.seeds`."""
    work = pathlib.Path(args.work_dir) / "recipe"
    start = time.time()
    labels = torch.arange(10).repeat_interleave(args.samples_per_prompt)
    per_seed = {}
    for seed in args.seeds:
        out = work / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        teacher = digits.load_or_build_teacher(out / "teacher")
        prompts = out / "prompts.txt"
        prompts.write_text("\n".join(digits.PROMPTS) + "\n")
        t0 = time.perf_counter()
        models = {"teacher": (digits.sample_digits(digits.load_teacher(teacher), labels, seed=1000 + seed), 0.0, 60)}
        models["teacher"] = (models["teacher"][0], time.perf_counter() - t0, 2 * digits.SAMPLE_STEPS)
        for name, flags in RECIPES.items():
            folder = out / name.replace(" ", "_")
            demo.distill(teacher, prompts, folder, "phased_dmd", args.max_train_steps, seed, extra=flags)
            t0 = time.perf_counter()
            images = demo.sample_student(folder, labels, seed=1000 + seed)
            models[name] = (images, time.perf_counter() - t0, 4)
        per_seed[seed] = demo.evaluate(models, labels)
        print(f"seed {seed}:\n{demo.markdown_table(per_seed[seed])}\n", flush=True)
    mean, std = mean_and_std(per_seed, args.seeds)
    table = demo.markdown_table(mean, std)
    print(table)
    command = "python benchmarks/quality_digits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    section = (
        f"{DIGITS_START}\n### Digits teacher: Phased DMD, new training defaults against the earlier ones\n\n"
        f"Metrics and hyperparameters as above, {args.max_train_steps} generator updates per phase; only the recipe "
        "differs. New defaults: Eq. 13 fake-score weight, `t` "
        "uniform on the teacher's shifted time scale, AdamW beta1 0. Earlier defaults: `--fake_weighting "
        "inverse_variance --timestep_sampling uniform --adam_beta1 0.9`. Mean ± std over "
        f"{len(args.seeds)} training seeds.\n\n{table}\n\nCommand: `nice -n 10 {command.strip()}` "
        f"({(time.time() - start) / 60:.0f} min on a shared 2-core machine). Per-seed numbers: `quality_recipe.json`."
        f"\n{DIGITS_END}"
    )
    doc = pathlib.Path(args.doc)
    (doc.parent / "quality_recipe.json").write_text(
        json.dumps({"per_seed": per_seed, "mean": mean, "std": std}, indent=2)
    )
    text = doc.read_text() if doc.is_file() else ""
    if DIGITS_START in text:
        text = text[: text.index(DIGITS_START)] + section + text[text.index(DIGITS_END) + len(DIGITS_END) :]
    else:
        if RECIPE_START not in text:
            text = text.rstrip("\n") + f"\n\n{RECIPE_START}\n## Recipe defaults\n"
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)
    print(f"wrote {doc}")


PARTS_START, PARTS_END = "<!-- digits recipe parts: start -->", "<!-- digits recipe parts: end -->"
PARTS = {
    "paper (defaults)": [],
    "--recipe lightx2v": ["--recipe", "lightx2v"],
    "lightx2v, negative prompt ''": ["--recipe", "lightx2v", "--negative_prompt", ""],
    "negative prompt ' '": ["--negative_prompt", " "],
    "diversity loss 0.05": ["--diversity_weight", "0.05"],
    "random exit": ["--random_exit"],
    "IDA 0.97": ["--ida_decay", "0.97"],
    "t margin 0.02": ["--t_margin", "0.02", "--t_lowest", "0.02", "--t_highest", "0.98"],
    # part 6 (opt-in): the real train digits as `--real_data` ({real}: digits.write_real_digits's folder)
    "+ fake-on-real 0.1": ["--real_data", "{real}", "--fake_real_weight", "0.1"],
    "--recipe lightx2v + fake-on-real": ["--recipe", "lightx2v", "--real_data", "{real}"],
}


def compare_parts(args, argv):
    """Phased DMD with today's defaults, `--recipe lightx2v` and each recipe part alone, over `args.seeds`.

    Each (seed, row) result is saved as JSON under `--work_dir` and reused: several processes may share the rows
    (`--parts`), and `--table_only` writes the table of what is saved."""
    work = pathlib.Path(args.work_dir) / "parts"
    labels = torch.arange(10).repeat_interleave(args.samples_per_prompt)
    names = args.parts or list(PARTS)
    for seed in [] if args.table_only else args.seeds:
        out = work / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        teacher = digits.load_or_build_teacher(out / "teacher")
        prompts = out / "prompts.txt"
        prompts.write_text("\n".join(digits.PROMPTS) + "\n")
        teacher_images = digits.sample_digits(digits.load_teacher(teacher), labels, seed=1000 + seed)
        for name in names:
            result = out / (name.replace(" ", "_").replace("'", "").replace("-", "") + ".json")
            if result.is_file():
                continue
            folder = out / "students" / result.stem
            t0 = time.perf_counter()
            real = digits.write_real_digits(work / "real_digits")
            flags = [f.format(real=real) for f in PARTS[name]] + shlex.split(args.extra)
            demo.distill(teacher, prompts, folder, "phased_dmd", args.max_train_steps, seed, extra=flags)
            minutes = (time.perf_counter() - t0) / 60
            images = demo.sample_student(folder, labels, seed=1000 + seed)
            row = demo.evaluate({"teacher": (teacher_images, 1.0, 60), name: (images, float("nan"), 4)}, labels)[name]
            result.write_text(json.dumps({**row, "train_minutes": minutes}, indent=2))
            print(f"seed {seed}, {name}: {row} ({minutes:.1f} min)", flush=True)
    per_seed = {}
    for seed in args.seeds:
        for name in PARTS:
            result = work / f"seed{seed}" / (name.replace(" ", "_").replace("'", "").replace("-", "") + ".json")
            if result.is_file():
                per_seed.setdefault(seed, {})[name] = json.loads(result.read_text())
    rows = [n for n in PARTS if all(n in per_seed.get(s, {}) for s in args.seeds)]
    per_seed = {s: {n: per_seed[s][n] for n in rows} for s in args.seeds}
    mean, std = mean_and_std(per_seed, args.seeds)
    table = demo.markdown_table(mean, std)
    table = "\n".join("|".join(line.split("|")[:-3]) + "|" for line in table.splitlines())  # no NFE / time columns
    print(table)
    command = "python benchmarks/quality_digits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    section = (
        f"{PARTS_START}\n### Digits teacher: the authors' recipe (issue 21), whole and part by part\n\n"
        f"Metrics and hyperparameters as above, {args.max_train_steps} generator updates per phase (fewer than the "
        "tables above: CPU time); each row adds one part to today's defaults (`--recipe paper`), `--recipe lightx2v` "
        "all of them (diversity loss 0.05, IDA 0.97, random exit, t margin 0.02, alternate phases, CFG 4, the "
        "family's negative prompt `' '`); the fake-on-real rows (part 6, opt-in) pass the 1437 real train digits "
        "(`digits.write_real_digits`: 16x16 PNGs captioned with their digit's prompt) as `--real_data`, weight 0.1 "
        "at their sigmas of the run's grid. Mean ± std over "
        f"{len(args.seeds)} training seeds; every student samples with 4 steps.\n\n{table}\n\n"
        f"Command: `nice -n 10 {command.strip()}` (rows run by several such processes with `--parts`, then "
        "`--table_only`). Per-seed numbers: `quality_parts.json`.\n" + PARTS_END
    )
    doc = pathlib.Path(args.doc)
    (doc.parent / "quality_parts.json").write_text(
        json.dumps({"per_seed": per_seed, "mean": mean, "std": std}, indent=2)
    )
    text = doc.read_text() if doc.is_file() else ""
    if PARTS_START in text:
        text = text[: text.index(PARTS_START)] + section + text[text.index(PARTS_END) + len(PARTS_END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)
    print(f"wrote {doc}")


def plot(mean, std, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name in mean:
        ax.errorbar(
            mean[name]["fd_to_real"],
            mean[name]["feature_diversity"],
            xerr=std[name]["fd_to_real"],
            yerr=std[name]["feature_diversity"],
            fmt="o",
            capsize=3,
            label=demo.LABELS.get(name, name),
        )
    ax.set_xlabel("Fréchet distance to real digits (classifier features) ↓")
    ax.set_ylabel("mean pairwise feature distance per prompt ↑")
    ax.set_title("Diversity against fidelity (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def analysis(mean, std) -> str:
    if "phased_dmd" not in mean or "sgts" not in mean:  # a run of some methods only (--methods)
        return "Methods run: " + ", ".join(n for n in mean if n != "teacher") + " (no SGTS comparison)."
    p, s = mean["phased_dmd"], mean["sgts"]
    more = p["feature_diversity"] > s["feature_diversity"] and p["pixel_diversity"] > s["pixel_diversity"]
    gap = p["feature_diversity"] - s["feature_diversity"]
    noise = max(std["phased_dmd"]["feature_diversity"], std["sgts"]["feature_diversity"])
    verdict = (
        "Phased DMD keeps more diversity than SGTS at equal steps in both feature and pixel space"
        if more
        else "Phased DMD does NOT keep more diversity than SGTS at equal steps here in both spaces"
    )
    return (
        f"{verdict}: feature diversity {p['feature_diversity']:.3g} vs {s['feature_diversity']:.3g} (difference "
        f"{gap:+.3g}, largest seed std {noise:.2g}); pixel diversity {p['pixel_diversity']:.3g} vs "
        f"{s['pixel_diversity']:.3g}; teacher {mean['teacher']['feature_diversity']:.3g} / "
        f"{mean['teacher']['pixel_diversity']:.3g}."
    )


TEMPLATE = """# Quality on the digits teacher: Phased DMD against SGTS and DMD

The small-scale version of the paper's diversity claim, measured on the project's digits teacher (a Qwen-Image
format pipeline trained on scikit-learn's digits, `diffusers_pdmd.digits`). Each student is distilled by the
unchanged example script `examples/phased_dmd/train_phased_dmd_qwen_image.py` with the same budget: batch 32,
{steps} generator updates per phase (Phased DMD: 2 phases, boundary 0.875; SGTS and DMD: one generator), 5
fake-score updates per generator update, LoRA rank 16, teacher CFG {cfg:g} (as the teacher samples).

Metrics (`diffusers_pdmd.metrics`; a small CNN classifier trained on the real training digits; held-out
accuracy on the real test digits: {clf_acc:.1%}): diversity = mean pairwise distance between samples of the same prompt, in the classifier's feature space
(the paper's DINOv3 analogue; also as mean cosine similarity, lower = more diverse) and in pixel space (the LPIPS
analogue); fidelity = Fréchet distance in feature space to the teacher's samples and to the real test digits;
prompt adherence = the classifier's accuracy on the prompted digit; cost = model evaluations per image and
wall-clock sampling time relative to the teacher ({steps_teacher} Euler steps with true CFG = {nfe_teacher} evaluations), measured in the
same run. {per_prompt} samples per prompt, 10 prompts. Mean ± std over {seeds} training seeds.

{table}

**Result.** {analysis}

![grid](quality_grid.png)

Grid (first seed): one block per model, top to bottom teacher, Phased DMD, SGTS, DMD; one column per digit, one
row per sample seed.

![diversity against fidelity](quality_tradeoff.png)

Command: `{command}` ({minutes:.0f} min). Machine: {machine}. Per-seed numbers: `quality.json`.
"""


if __name__ == "__main__":
    main()
