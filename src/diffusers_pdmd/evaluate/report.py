# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""What a user reads: ``report.md`` (the paper's table layout), ``metrics.json``, a contact sheet per prompt
(rows = samplers, columns = seeds; a video as a strip of frames) and ``diversity_vs_cost.png``."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch


COLUMNS = (  # key in a sampler's metrics -> header (arrow: which way is better)
    ("steps", "steps"),
    ("forwards_per_sample", "transformer forwards / sample"),
    ("seconds_per_sample", "s / sample"),
    ("dino_similarity", "DINO similarity ↓"),
    ("lpips", "LPIPS ↑"),
    ("flow", "optical flow ↑"),
    ("dynamic_degree", "dynamic degree ↑"),
    ("fd_to_reference", "FD to reference ↓"),
    ("fd_to_real", "FD to real ↓"),
    ("clip", "CLIP score ↑"),
)


def _cell(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def describe(settings: dict) -> str:
    """A sampler's settings (``samples/NAME/sampler.json``) in words."""
    parts = [settings.get("source", "?")]
    parts += [f"{k} {settings[k]}" for k in ("base", "preset", "steps", "cfg") if settings.get(k) is not None]
    if settings.get("negative") is not None:
        parts.append(f"negative prompt {settings['negative']!r}")
    return ", ".join(str(p) for p in parts)


def markdown_table(rows: dict[str, dict]) -> str:
    """One row per sampler, the columns of `COLUMNS` that any sampler has."""
    columns = [(k, h) for k, h in COLUMNS if any(row.get(k) is not None for row in rows.values())]
    lines = ["| sampler | " + " | ".join(h for _, h in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def per_prompt_table(rows: dict[str, dict], key: str, prompts: list[str]) -> str:
    lines = ["| prompt | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for p, prompt in enumerate(prompts):
        cells = [_cell(row.get(f"{key}_per_prompt", {}).get(p)) for row in rows.values()]
        lines.append(f"| {p}: {prompt[:60]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out_dir: pathlib.Path, result: dict, command: str) -> pathlib.Path:
    """``report.md``: the main table, per-prompt diversity, the Fréchet distance matrix, the settings."""
    rows, prompts = result["samplers"], result["prompts"]
    parts = [
        "# Evaluation",
        f"{len(prompts)} prompts x {len(result['seeds'])} seeds, {result['size']}; reference: "
        f"{result['reference']}; feature model: {result['feature_model']}.",
        markdown_table(rows),
        "Samplers: " + "; ".join(f"`{n}`: {describe(st)}" for n, st in result.get("settings", {}).items()) + ".",
        "DINO similarity: mean pairwise cosine similarity of the features of one prompt's seeds (lower = more "
        "diverse); LPIPS: mean pairwise distance (higher = more diverse); optical flow: mean RAFT flow magnitude "
        "between consecutive frames (pixels); dynamic degree: share of videos VBench calls dynamic; FD: Fréchet "
        "distance in the feature model's space; cost: measured per sample.",
    ]
    if any("dino_similarity_per_prompt" in row for row in rows.values()):
        parts += ["## DINO similarity per prompt", per_prompt_table(rows, "dino_similarity", prompts)]
    if any("lpips_per_prompt" in row for row in rows.values()):
        parts += ["## LPIPS per prompt", per_prompt_table(rows, "lpips", prompts)]
    if result.get("fd"):
        names = list(result["fd"])
        lines = ["| FD | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(_cell(result["fd"][a][b]) for b in names) + " |" for a in names]
        parts += ["## Fréchet distances between samplers", "\n".join(lines)]
    parts += [
        "## Command",
        f"```\n{command}\n```",
        "Contact sheets: `contact_sheets/`; plot: `diversity_vs_cost.png`.",
    ]
    path = out_dir / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path


def write_json(out_dir: pathlib.Path, result: dict) -> pathlib.Path:
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return path


def _cell_image(sample: torch.Tensor, frames: int, cell: int) -> np.ndarray:
    """An image, or a strip of up to ``frames`` evenly spaced frames, each resized to ``cell`` pixels high."""
    from .measure import frames_of

    x = frames_of(sample, frames)
    width = max(1, round(cell * x.shape[-1] / x.shape[-2]))
    x = torch.nn.functional.interpolate(x.float(), size=(cell, width), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1).permute(2, 0, 3, 1).reshape(cell, -1, 3).numpy() * 255).round().astype(np.uint8)


def contact_sheet(samples: dict[str, list[torch.Tensor]], seeds, prompt: str, path, frames=4, cell=128):
    """One prompt: a row per sampler (its name on the left), a column per seed (the seed on top)."""
    from PIL import Image, ImageDraw

    rows = {name: [_cell_image(s, frames, cell) for s in items] for name, items in samples.items()}
    cell_w = max(c.shape[1] for cells in rows.values() for c in cells)
    left, top, gap = 140, 36, 4
    sheet = Image.new("RGB", (left + len(seeds) * (cell_w + gap), top + len(rows) * (cell + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), prompt[:150], fill="black")
    for j, seed in enumerate(seeds):
        draw.text((left + j * (cell_w + gap), top - 14), f"seed {seed}", fill="black")
    for i, (name, cells) in enumerate(rows.items()):
        y = top + i * (cell + gap)
        draw.text((4, y + cell // 2), name[:22], fill="black")
        for j, c in enumerate(cells):
            sheet.paste(Image.fromarray(c), (left + j * (cell_w + gap), y))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def plot_diversity_vs_cost(rows: dict[str, dict], path) -> pathlib.Path:
    """Scatter of each sampler's diversity (DINO similarity, and LPIPS if measured) against its forwards/sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("dino_similarity", "lpips") if any(r.get(k) is not None for r in rows.values())]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(5 * max(1, len(keys)), 4), squeeze=False)
    for ax, key in zip(axes[0], keys or ["dino_similarity"]):
        for name, row in rows.items():
            if row.get(key) is not None and row.get("forwards_per_sample"):
                ax.scatter(row["forwards_per_sample"], row[key])
                ax.annotate(name, (row["forwards_per_sample"], row[key]), textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        ax.set_xlabel("transformer forwards per sample (log)")
        ax.set_ylabel(
            {"dino_similarity": "DINO similarity (lower = more diverse)"}.get(key, "LPIPS (higher = more diverse)")
        )
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return pathlib.Path(path)


__all__ = ["contact_sheet", "markdown_table", "plot_diversity_vs_cost", "write_json", "write_report"]
