"""Atomic, pickle-free training checkpoints.

A checkpoint is a folder `checkpoint-<global_step>` holding safetensors files (model/adapter weights, optimizer
tensors, RNG states) and one `training_state.json` (step counters, optimizer structure, scheduler states, python
RNG). It is written to a hidden temporary folder and renamed into place, so a kill at any moment leaves the
previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


STATE_NAME = "training_state.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def flatten_optimizer(sd: dict, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able metadata.

    Parameter keys may be ints (`Optimizer.state_dict`) or names (the full state dict of an FSDP optimizer).
    """
    tensors, state_meta = {}, {}
    for pid, st in sd["state"].items():
        entry = {}
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{pid}.{key}"] = value.detach().to("cpu").contiguous()
                entry[key] = "__tensor__"
            else:
                entry[key] = value
        state_meta[str(pid)] = entry
    int_keys = all(isinstance(k, int) for k in sd["state"])
    return tensors, {"state": state_meta, "param_groups": sd["param_groups"], "int_keys": int_keys}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> dict:
    """Inverse of [`flatten_optimizer`]: the optimizer state dict."""
    state = {}
    for pid, entry in meta["state"].items():
        key = int(pid) if meta.get("int_keys", True) else pid
        state[key] = {k: (tensors[f"{prefix}.{pid}.{k}"] if v == "__tensor__" else v) for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(generators: dict[str, torch.Generator] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """All RNG states: python and numpy in JSON, torch (CPU, CUDA, named generators) as tensors."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for name, g in (generators or {}).items():
        tensors[f"rng.gen.{name}"] = g.get_state().cpu()
    np_state = np.random.get_state()
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, generators: dict[str, torch.Generator] | None = None):
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    for name, g in (generators or {}).items():
        g.set_state(tensors[f"rng.gen.{name}"])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(
    output_dir: str | os.PathLike, global_step: int, files: dict[str, dict[str, torch.Tensor]], state: dict
) -> Path:
    """Write `files` (name -> tensors, saved as `<name>.safetensors`) and `state` atomically.

    Returns:
        The final checkpoint folder.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{global_step}"
    tmp = output_dir / f".checkpoint-{global_step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, tensors in files.items():
        save_file(tensors, str(tmp / f"{name}.safetensors"))
    with open(tmp / STATE_NAME, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # a re-run of the same step: replace it only once the new one is complete
        old = output_dir / f".checkpoint-{global_step}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def read_state(path: str | os.PathLike) -> dict:
    """The JSON state of a checkpoint (step, run, history), without reading its tensors."""
    path = Path(path)
    if not (path / STATE_NAME).is_file():
        raise ValueError(f"`--resume_from_checkpoint`: {path} is not a checkpoint folder (no {STATE_NAME}).")
    try:
        with open(path / STATE_NAME) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"`--resume_from_checkpoint`: {path / STATE_NAME} is not readable JSON ({e}).") from e


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """`(files, state)` of a checkpoint: every `<name>.safetensors` as `files[name]`, and its JSON state."""
    path = Path(path)
    state = read_state(path)
    files = {}
    for p in sorted(path.glob("*.safetensors")):
        try:
            files[p.stem] = load_file(str(p))
        except Exception as e:
            raise ValueError(f"Checkpoint file {p} is corrupt or not a safetensors file ({e}).") from e
    return files, state


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_NAME).is_file()]


def resolve_resume(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """`"latest"` -> the newest complete checkpoint (or None), a path -> that path."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume
    if not path.is_dir():
        raise ValueError(
            f"`--resume_from_checkpoint` must be 'latest' or an existing checkpoint folder, got {resume!r}."
        )
    return path


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None) -> None:
    """Keep only the newest `total_limit` checkpoints."""
    if not total_limit:
        return
    found = list_checkpoints(output_dir)
    for old in found[: max(len(found) - total_limit, 0)]:
        shutil.rmtree(old, ignore_errors=True)
