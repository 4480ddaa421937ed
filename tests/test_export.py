"""`python -m diffusers_pdmd.export`: exported experts load in diffusers with exactly our deltas, and back in
`PhasedMoEPipeline.from_pretrained` with the same samples."""

import json

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

from diffusers_pdmd import PhasedDMDScheduler, PhasedMoEPipeline, tiny
from diffusers_pdmd.export import main as export_main


TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# (slot, rank, alpha) per phase: two different scales, neither 1.
EXPERTS = {
    "wan2.2-t2v-a14b": ([0.87], [1, 2], [("transformer", 4, 2.0), ("transformer_2", 4, 8.0)]),
    "qwen-image": ([], [2], [("transformer", 4, 2.0)]),
}
SIZES = {"wan2.2-t2v-a14b": {"height": 16, "width": 16, "num_frames": 5}, "qwen-image": {"height": 32, "width": 32}}


def _experts(family, tmp_path):
    base_dir = tiny.save_pipeline(family, tmp_path / "base")
    components = tiny.build_components(family)
    boundaries, steps, experts = EXPERTS[family]
    for k, (slot, rank, alpha) in enumerate(experts):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(k)
            config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
            components[slot].add_adapter(config, adapter_name=f"phase_{k}")
    scheduler = PhasedDMDScheduler.from_config(
        components["scheduler"].config, phase_boundaries=boundaries, steps_per_phase=steps
    )
    pipe = PhasedMoEPipeline(
        **{**components, "scheduler": scheduler},
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
    g = torch.Generator().manual_seed(3)
    if family == "qwen-image":
        x, embeds = torch.randn(1, 16, 16, generator=g), torch.randn(1, 5, 16, generator=g)
        return pipe(prompt_embeds=embeds, latents=x, output_type="latent", **SIZES[family]).images
    x, embeds = torch.randn(1, 16, 2, 2, 2, generator=g), torch.randn(1, 6, 32, generator=g)
    return pipe(prompt_embeds=embeds, latents=x, output_type="latent", **SIZES[family]).frames


@pytest.mark.parametrize("family", list(EXPERTS))
@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
def test_export_round_trip(family, fmt, tmp_path):
    import diffusers

    base_dir, experts_dir, ours = _experts(family, tmp_path)
    out = tmp_path / fmt
    assert export_main([str(experts_dir), str(out), "--format", fmt]) == 0
    two_files = family == "wan2.2-t2v-a14b"
    names = ["high_noise_model.safetensors", "low_noise_model.safetensors"] if two_files else ["phase_0.safetensors"]
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
        assert {float(a) for a in alpha} == {EXPERTS[family][2][0][2]}  # the adapter's alpha, not the rank
        if two_files:
            assert any(".self_attn.q.lora_down.weight" in k for k in keys)

    # diffusers' own loader gives exactly our deltas.
    base = diffusers.DiffusionPipeline.from_pretrained(base_dir)
    for k, (slot, _, _) in enumerate(EXPERTS[family][2]):
        kwargs = {"load_into_transformer_2": True} if slot == "transformer_2" else {}
        base.load_lora_weights(str(out), weight_name=names[k], adapter_name="x", **kwargs)
        theirs, mine = _deltas(getattr(base, slot), "x"), _deltas(getattr(ours, slot), f"phase_{k}")
        assert theirs.keys() == mine.keys() and mine
        for name in mine:
            assert torch.equal(theirs[name], mine[name]), name

    # And PhasedMoEPipeline loads the exported folder with the experts' own sampler: the same samples.
    exported = PhasedMoEPipeline.from_pretrained(base_dir, experts=out)
    original = PhasedMoEPipeline.from_pretrained(base_dir, experts=experts_dir)
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["phase_boundaries"] == list(
        EXPERTS[family][0]
    )
    torch.testing.assert_close(_sample(exported, family), _sample(original, family), atol=1e-5, rtol=1e-5)


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="phased_dmd_config.json"):
        export_main([str(tmp_path), str(tmp_path / "out")])
