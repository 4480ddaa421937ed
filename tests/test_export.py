"""`python -m diffusers_pdmd.export`: exported experts load in diffusers with exactly our deltas, and back in
`PhasedMoEPipeline.from_pretrained` with the same samples."""

import json

import PIL.Image
import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

from diffusers_pdmd import PhasedDMDScheduler, PhasedMoEPipeline, hub, tiny
from diffusers_pdmd.export import main as export_main
from diffusers_pdmd.hub import multiple_adapters


TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# (boundaries, steps per phase, (slot, rank, alpha) per phase): two different scales, neither 1. Every family with
# two phases: A14B with one expert per transformer, Qwen-Image (the digits demo's layout) and TI2V-5B with both on
# their one transformer.
EXPERTS = {
    "wan2.2-t2v-a14b": ([0.87], [1, 2], [("transformer", 4, 2.0), ("transformer_2", 4, 8.0)]),
    "wan2.2-i2v-a14b": ([0.87], [1, 1], [("transformer", 4, 2.0), ("transformer_2", 4, 8.0)]),
    "qwen-image": ([0.6], [1, 1], [("transformer", 4, 2.0), ("transformer", 4, 8.0)]),
    "wan2.2-ti2v-5b": ([0.7], [1, 1], [("transformer", 4, 2.0), ("transformer", 4, 8.0)]),
}
SIZES = {
    "wan2.2-t2v-a14b": {"height": 16, "width": 16, "num_frames": 5},
    "wan2.2-i2v-a14b": {"height": 16, "width": 16, "num_frames": 5},
    "wan2.2-ti2v-5b": {"height": 32, "width": 32, "num_frames": 5},
    "qwen-image": {"height": 32, "width": 32},
}


def _experts(family, tmp_path):
    base_dir = tiny.save_pipeline(family, tmp_path / "base")
    components = tiny.build_components(family)
    boundaries, steps, experts = EXPERTS[family]
    for k, (slot, rank, alpha) in enumerate(experts):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(k)
            config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
            with multiple_adapters():
                components[slot].add_adapter(config, adapter_name=f"phase_{k}")
    scheduler = PhasedDMDScheduler.from_config(
        components["scheduler"].config, phase_boundaries=boundaries, steps_per_phase=steps
    )
    pipe = PhasedMoEPipeline(
        **{k: v for k, v in components.items() if k not in ("image_encoder", "image_processor", "scheduler")},
        scheduler=scheduler,
        experts=[(slot, f"phase_{k}") for k, (slot, _, _) in enumerate(experts)],
        base_model=str(base_dir),
    )
    pipe.save_pretrained(tmp_path / "experts", experts_only=True)
    return base_dir, tmp_path / "experts", pipe


def _deltas(module, adapter):
    """adapter -> {module name: delta W} as peft applies it (lora_B @ lora_A * scaling)."""
    out = {}
    for name, layer in module.named_modules():
        if hasattr(layer, "lora_A") and adapter in layer.lora_A:
            out[name] = (layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight) * layer.scaling[adapter]
    return out


def _sample(pipe, family):
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"generator": torch.Generator().manual_seed(3), "output_type": "latent", "max_sequence_length": 16}
    if family == "wan2.2-i2v-a14b":
        kwargs["image"] = PIL.Image.new("RGB", (16, 16), (200, 40, 90))
    out = pipe("a cat", **kwargs, **SIZES[family])
    return out.images if family == "qwen-image" else out.frames


@pytest.mark.parametrize("family", list(EXPERTS))
@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
def test_export_round_trip(family, fmt, tmp_path):
    import diffusers

    base_dir, experts_dir, ours = _experts(family, tmp_path)
    out = tmp_path / fmt
    assert export_main([str(experts_dir), str(out), "--format", fmt]) == 0
    two_files = family.endswith("a14b")
    names = (
        ["high_noise_model.safetensors", "low_noise_model.safetensors"]
        if two_files
        else ["phase_0.safetensors", "phase_1.safetensors"]
    )
    assert sorted(p.name for p in out.glob("*.safetensors")) == names

    if fmt == "comfyui":
        with safe_open(str(out / names[0]), "pt") as f:
            keys = list(f.keys())
            alpha = [f.get_tensor(k) for k in keys if k.endswith(".alpha")]
        assert all(k.startswith("diffusion_model.") for k in keys)
        assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in keys} == {
            "lora_down",
            "lora_up",
            "alpha",
        }
        # phase_k's weights carry the scale (alpha / rank), so `.alpha` is the rank: scale 1.
        assert {float(a) for a in alpha} == {float(EXPERTS[family][2][0][1])}
        if two_files:
            assert any(".self_attn.q.lora_down.weight" in k for k in keys)

    # diffusers' own loader gives exactly our deltas.
    base = diffusers.DiffusionPipeline.from_pretrained(base_dir)
    for k, (slot, _, _) in enumerate(EXPERTS[family][2]):
        kwargs = {"load_into_transformer_2": True} if slot == "transformer_2" else {}
        base.load_lora_weights(str(out), weight_name=names[k], adapter_name=f"x{k}", **kwargs)
        theirs, mine = _deltas(getattr(base, slot), f"x{k}"), _deltas(getattr(ours, slot), f"phase_{k}")
        assert theirs.keys() == mine.keys() and mine
        for name in mine:
            assert torch.equal(theirs[name], mine[name]), name

    # And PhasedMoEPipeline loads the exported folder with the experts' own sampler: the same samples, every phase
    # with its own expert (phase 0's alone differs).
    exported = PhasedMoEPipeline.from_pretrained(base_dir, experts=out)
    original = PhasedMoEPipeline.from_pretrained(base_dir, experts=experts_dir)
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["phase_boundaries"] == list(
        EXPERTS[family][0]
    )
    assert [e["base_transformer"] for e in exported.config.experts] == [e[0] for e in EXPERTS[family][2]]
    reference = _sample(original, family)
    torch.testing.assert_close(_sample(exported, family), reference, atol=1e-5, rtol=1e-5)
    if not two_files:  # one phase's file of a two-phase export: refused, naming the way that works ...
        with pytest.raises(ValueError, match="pass the folder"):
            PhasedMoEPipeline.from_pretrained(base_dir, experts=out / "phase_0.safetensors")
        # ... as it would sample every phase with phase 0's expert (asked for explicitly, it does).
        scheduler = PhasedDMDScheduler.from_pretrained(out / "scheduler")
        one = PhasedMoEPipeline.from_pretrained(base_dir, experts=out / "phase_0.safetensors", scheduler=scheduler)
        assert not torch.allclose(_sample(one, family), reference, atol=1e-3)


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="phased_dmd_config.json"):
        export_main([str(tmp_path), str(tmp_path / "out")])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_expert_file_is_named_and_the_export_writes_nothing(damage, tmp_path):
    base_dir, experts_dir, _ = _experts("qwen-image", tmp_path)
    file = experts_dir / "phase_1" / "pytorch_lora_weights.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100] if damage == "truncated" else b"\x00" * 8 + data[8:])
    with pytest.raises(ValueError, match=f"{file}.*truncated or corrupt"):
        PhasedMoEPipeline.from_pretrained(base_dir, experts=experts_dir)
    with pytest.raises(ValueError, match=f"{file}.*truncated or corrupt"):
        hub.load_lora_expert(tiny.build_components("qwen-image")["transformer"], file, "x")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"{file}.*truncated or corrupt"):
        export_main([str(experts_dir), str(out)])
    # phase_0 was converted before phase_1 failed: nothing of it is left, under any name.
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "experts"]


def test_export_refuses_a_non_empty_out_dir_unless_overwrite(tmp_path):
    _, experts_dir, _ = _experts("qwen-image", tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="`out_dir` .* exists and is not empty"):
        export_main([str(experts_dir), str(out)])
    assert (out / "mine.txt").read_text() == "keep"
    assert export_main([str(experts_dir), str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["phase_0.safetensors", "phase_1.safetensors", "scheduler"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "experts", "out"]


@pytest.mark.parametrize("family", ["wan2.2-t2v-a14b", "qwen-image"])
def test_save_pretrained_writes_the_comfyui_export_beside_the_experts(family, tmp_path):
    from safetensors.torch import load_file

    _, experts_dir, _ = _experts(family, tmp_path)
    assert export_main([str(experts_dir), str(tmp_path / "export")]) == 0
    written = sorted(p.name for p in (experts_dir / "comfyui").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "export").iterdir())
    for name in written:
        if name.endswith(".safetensors"):
            a, b = load_file(str(experts_dir / "comfyui" / name)), load_file(str(tmp_path / "export" / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The folder still loads as the experts it is (comfyui/ is beside phase_k/, not instead of it).
    assert PhasedMoEPipeline.from_pretrained(experts_dir).config.experts[1]["adapter_name"] == "phase_1"
    # The model card gives the ComfyUI settings: one LoRA and one sampler per phase, the switch step, CFG 1.
    text = str(hub.write_model_card(experts_dir, hub.ExpertsConfig.load(experts_dir)))
    steps = EXPERTS[family][1]
    rows = (
        [
            "| 0 | `comfyui/high_noise_model.safetensors` on the high-noise model | 0 | 1 |",
            "| 1 | `comfyui/low_noise_model.safetensors` on the low-noise model | 1 | 3 |",
        ]
        if family.endswith("a14b")
        else [f"| {k} | `comfyui/phase_{k}.safetensors` on the model | {k} | {k + 1} |" for k in range(2)]
    )
    assert "## ComfyUI" in text and f"`steps` {sum(steps)}, `cfg` 1.0" in text
    assert all(row in text for row in rows), text


def test_comfyui_export_of_an_earlier_versions_file_applies_its_metadata_scale(tmp_path):
    """Files written before the scale went into the weights (scale only in the metadata) export with their trained
    alpha in `.alpha`: ComfyUI applies alpha / rank * up @ down = the same deltas as for the new files."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    family = "qwen-image"
    _, experts_dir, ours = _experts(family, tmp_path)
    for k in range(2):  # rewrite phase_k as the earlier version did
        layers = get_peft_model_state_dict(ours.transformer, adapter_name=f"phase_{k}")
        config = ours.transformer.peft_config[f"phase_{k}"].to_dict()
        LoraBaseMixin.write_lora_layers(
            state_dict={f"transformer.{n}": v.detach().contiguous() for n, v in layers.items()},
            save_directory=str(experts_dir / f"phase_{k}"),
            is_main_process=True,
            weight_name=hub.LORA_WEIGHT_NAME,
            save_function=None,
            safe_serialization=True,
            lora_adapter_metadata={f"transformer.{n}": v for n, v in config.items()},
        )
    assert export_main([str(experts_dir), str(tmp_path / "old")]) == 0
    for k, (_, rank, alpha) in enumerate(EXPERTS[family][2]):
        tensors = load_file(str(tmp_path / "old" / f"phase_{k}.safetensors"))
        mine = _deltas(ours.transformer, f"phase_{k}")
        assert {float(v) for n, v in tensors.items() if n.endswith(".alpha")} == {alpha}
        for name, delta in mine.items():
            key = f"diffusion_model.{name}"
            up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
            torch.testing.assert_close(float(tensors[f"{key}.alpha"]) / rank * (up @ down), delta)
