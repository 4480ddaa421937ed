"""The main job on a fresh machine: distil the digits teacher with Phased DMD and the baselines, on the CPU.

    python -m diffusers_pdmd.demo --output_dir demo_output        # what `make demo` runs

1. Takes the small real teacher of `diffusers_pdmd.digits` (a Qwen-Image-format pipeline trained on scikit-learn's
   digits; shipped with the package, rebuilt if missing).
2. Distils it with the unchanged example script `examples/phased_dmd/train_phased_dmd_qwen_image.py` (the same
   code as `diffusers_pdmd.training.distill`): `phased_dmd` (4 steps, 2 phases), `sgts` (4 steps) and `dmd`
   (1 step).
3. Samples teacher and students (students with `PhasedMoEPipeline`), and writes `grid.png` (one block of rows per
   model, labelled teacher / Phased DMD / SGTS / DMD; one column per prompt, labelled with its digit; one row per
   seed) and `metrics.md` / `metrics.json` (diversity, Fréchet distances,
   prompt accuracy, sampling cost relative to the teacher).

`--fake_on_real` adds the authors' fake-on-real (recipe part 6, opt-in) with the real train digits as `--real_data`
(`digits.write_real_digits`). `benchmarks/quality_digits.py` repeats this over several training seeds for
`docs/benchmarks/quality.md`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import pathlib
import time

import torch

from . import digits


METHODS = {  # method -> (extra flags, sampling steps)
    "phased_dmd": (["--method", "phased_dmd", "--phase_boundaries", "0.875", "--steps_per_phase", "2", "2"], 4),
    "sgts": (["--method", "sgts", "--steps_per_phase", "2", "2"], 4),
    "dmd": (["--method", "dmd"], 1),
}
LABELS = {
    "teacher": f"teacher ({digits.SAMPLE_STEPS} steps, CFG {digits.TRUE_CFG_SCALE:g})",  # as `digits.sample_digits`
    "phased_dmd": "Phased DMD (4 steps, 2 phases)",
    "sgts": "SGTS (4 steps)",
    "dmd": "DMD (1 step)",
}
GRID_LABELS = {"teacher": "teacher", "phased_dmd": "Phased DMD", "sgts": "SGTS", "dmd": "DMD"}
SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "examples" / "phased_dmd" / "train_phased_dmd_qwen_image.py"


class _FirstOnly(logging.Filter):
    """Let the first record starting with `prefix` through and drop the repeats."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def train_args(
    teacher: pathlib.Path, prompts: pathlib.Path, out: pathlib.Path, method: str, steps: int, seed: int, extra=()
) -> list[str]:
    """Flags of the example script for one student (hyperparameters chosen for the 16x16 digits teacher)."""
    return [
        "--pretrained_model_name_or_path",
        str(teacher),
        "--prompts",
        str(prompts),
        "--output_dir",
        str(out),
        "--resolution",
        str(digits.IMAGE_SIZE),
        "--max_train_steps",
        str(steps),
        "--train_batch_size",
        "32",
        "--learning_rate",
        "1e-4",
        "--fake_learning_rate",
        "1e-3",
        "--lora_rank",
        "16",
        "--lora_alpha",
        "16",
        "--guidance_scale",
        str(digits.TRUE_CFG_SCALE),
        "--fake_updates_per_step",
        "5",
        "--cache_text_embeddings",
        "--max_sequence_length",
        "32",
        "--checkpointing_steps",
        "100000",
        "--seed",
        str(seed),
        "--overwrite_output_dir",  # a re-run of the demo replaces its students
        *METHODS[method][0],
        *extra,
    ]


def distill(teacher, prompts, out, method: str, steps: int, seed: int = 0, extra=()) -> pathlib.Path:
    """Run the example script in this process (the library's `train` if the script is not beside the package);
    `extra`: more script flags."""
    argv = train_args(pathlib.Path(teacher), pathlib.Path(prompts), pathlib.Path(out), method, steps, seed, extra)
    if SCRIPT.is_file():
        spec = importlib.util.spec_from_file_location("train_phased_dmd_qwen_image", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(argv)
    else:  # installed without the repository: the same code the script calls
        from .training.distill import build_parser, train

        train(build_parser("digits").parse_args(argv), expected_families=("qwen-image",))
    return pathlib.Path(out)


@torch.no_grad()
def sample_student(path, labels, seed: int = 0, batch_size: int = 200) -> torch.Tensor:
    """Images in [0, 1], (N, 3, 16, 16), from a student folder through `PhasedMoEPipeline`."""
    from .pipelines import PhasedMoEPipeline

    pipe = PhasedMoEPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    labels = [int(x) for x in labels]
    out = []
    for start in range(0, len(labels), batch_size):
        prompts = [digits.prompt_for(x) for x in labels[start : start + batch_size]]
        out.append(
            pipe(prompts, height=digits.IMAGE_SIZE, width=digits.IMAGE_SIZE, generator=generator, output_type="pt")
            .images.float()
            .cpu()
        )
    return torch.cat(out)


def evaluate(models: dict[str, tuple[torch.Tensor, float, int]], labels: torch.Tensor) -> dict[str, dict]:
    """Metrics of each model's samples; `models[name] = (images, seconds, model evaluations per image)`."""
    from . import metrics

    real = digits.real_digits("test")[0]
    teacher_images, teacher_seconds, teacher_nfe = models["teacher"]
    rows = {}
    for name, (images, seconds, nfe) in models.items():
        m = metrics.digit_metrics(images, labels, reference_images=real)
        rows[name] = {
            "accuracy": m["accuracy"],
            "feature_diversity": m["feature_diversity"],
            "feature_cosine_similarity": m["feature_cosine_similarity"],
            "pixel_diversity": m["pixel_diversity"],
            "fd_to_real": m["frechet_distance"],
            # clipped at 0: the teacher against itself comes out at -1e-5 from the matrix square root
            "fd_to_teacher": max(
                0.0, metrics.frechet_distance(metrics.features(images), metrics.features(teacher_images))
            ),
            "nfe": nfe,
            "relative_nfe": nfe / teacher_nfe,
            "relative_time": seconds / teacher_seconds,
        }
    return rows


COLUMNS = [
    ("feature_diversity", "diversity, features ↑"),
    ("feature_cosine_similarity", "cos. similarity ↓"),
    ("pixel_diversity", "diversity, pixels ↑"),
    ("fd_to_teacher", "FD to teacher ↓"),
    ("fd_to_real", "FD to real ↓"),
    ("accuracy", "prompt accuracy ↑"),
    ("nfe", "NFE / image"),
    ("relative_time", "time vs teacher"),
]


def markdown_table(rows: dict[str, dict], stds: dict[str, dict] | None = None) -> str:
    head = "| model | " + " | ".join(c for _, c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, row in rows.items():
        cells = []
        for key, _ in COLUMNS:
            value = f"{row[key]:.3g}" if key != "nfe" else f"{row[key]:g}"
            if stds and key not in ("nfe",):
                value += f" ± {stds[name][key]:.2g}"
            cells.append(value)
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid(
    models: dict[str, tuple[torch.Tensor, float, int]], labels: torch.Tensor, seeds: int, path, scale: int = 3
) -> None:
    """One block of `seeds` rows per model (teacher first), one column per digit; a blank row between blocks. The
    model's name is written left of its block and the digit above its column."""
    from PIL import Image, ImageDraw, ImageFont

    blocks = []
    for images, _, _ in models.values():
        order = torch.cat([torch.nonzero(labels == d)[:seeds, 0] for d in range(10)])
        block = images[order].view(10, seeds, *images.shape[1:]).transpose(0, 1).reshape(-1, *images.shape[1:])
        blocks += [block, torch.zeros(10, *images.shape[1:])]
    digits.save_grid(torch.cat(blocks[:-1]), path, nrow=10, scale=scale)

    images = Image.open(path).convert("RGB")
    cell = (digits.IMAGE_SIZE + 1) * scale  # one image and its 1-pixel border, scaled
    try:
        font = ImageFont.load_default(size=4 * scale + 2)
    except (OSError, TypeError, ValueError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    left, top = 30 * scale + 16, 8 * scale
    labelled = Image.new("RGB", (images.width + left, images.height + top), "white")
    labelled.paste(images, (left, top))
    draw = ImageDraw.Draw(labelled)
    for d in range(10):
        draw.text((left + scale + d * cell + cell // 2, top // 2), str(d), fill="black", font=font, anchor="mm")
    for k, name in enumerate(models):
        middle = top + scale + k * (seeds + 1) * cell + seeds * cell // 2
        draw.text((left - 8, middle), GRID_LABELS.get(name, name), fill="black", font=font, anchor="rm")
    labelled.save(path)


def run(
    output_dir,
    steps: int = 100,
    per_prompt: int = 20,
    seed: int = 0,
    grid_seeds: int = 4,
    methods=tuple(METHODS),
    extra=(),
) -> dict:
    """The whole demo; returns the metrics rows and writes grid.png, metrics.md, metrics.json."""
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("diffusers_pdmd.demo")
    start = time.time()
    teacher = digits.load_or_build_teacher(out / "teacher")
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(digits.PROMPTS) + "\n")
    local_base = _FirstOnly("The experts name their base by the local path")  # one warning, not one per student
    logging.getLogger("diffusers_pdmd.hub").addFilter(local_base)
    try:
        for method in methods:
            log.info("Distilling with %s (%d generator updates per phase)", method, steps)
            distill(teacher, prompts, out / method, method, steps, seed, extra)
    finally:
        logging.getLogger("diffusers_pdmd.hub").removeFilter(local_base)

    labels = torch.arange(10).repeat_interleave(per_prompt)
    models = {}
    t0 = time.perf_counter()
    pipe = digits.load_teacher(teacher)
    images = digits.sample_digits(pipe, labels, seed=1000 + seed)
    models["teacher"] = (images, time.perf_counter() - t0, 2 * digits.SAMPLE_STEPS)
    for method in methods:
        t0 = time.perf_counter()
        images = sample_student(out / method, labels, seed=1000 + seed)
        models[method] = (images, time.perf_counter() - t0, METHODS[method][1])
    rows = evaluate(models, labels)
    grid(models, labels, grid_seeds, out / "grid.png")
    table = markdown_table(rows)
    (out / "metrics.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "metrics.md").write_text(
        f"{table}\n\n{per_prompt} samples per prompt (10 prompts); teacher: {digits.SAMPLE_STEPS} steps with true "
        f"CFG {digits.TRUE_CFG_SCALE:g} against the empty prompt (2 model evaluations per step), students distilled "
        f"with guidance scale {digits.TRUE_CFG_SCALE:g}; {steps} generator updates per phase; seed {seed}; "
        f"{time.time() - start:.0f} s in all.\n"
    )
    return {"rows": rows, "table": table, "seconds": time.time() - start}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusers_pdmd.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--max_train_steps", type=int, default=100, help="Generator updates per phase.")
    parser.add_argument("--samples_per_prompt", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fake_on_real",
        action="store_true",
        help="Add fake-on-real (recipe part 6) with the real train digits as --real_data (off: the paper's default).",
    )
    args = parser.parse_args(argv)
    if args.max_train_steps < 1 or args.samples_per_prompt < 2:
        parser.error("--max_train_steps must be >= 1 and --samples_per_prompt >= 2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves the other core free
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    extra = []
    if args.fake_on_real:
        extra = ["--real_data", str(digits.write_real_digits(pathlib.Path(args.output_dir) / "real"))]
    result = run(args.output_dir, args.max_train_steps, args.samples_per_prompt, args.seed, extra=extra)
    out = pathlib.Path(args.output_dir)
    print(f"\n{result['table']}\n")
    print(
        f"Done in {result['seconds'] / 60:.1f} min. Grid: {out / 'grid.png'} (rows per model: teacher, "
        f"{', '.join(METHODS)}); table: {out / 'metrics.md'}; students: {', '.join(str(out / m) for m in METHODS)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
