"""PhasedMoEPipeline: equality with the family pipelines, expert routing, save/load round trips, input checks."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from peft import LoraConfig

from diffusers_pdmd import PhasedDMDScheduler, tiny
from diffusers_pdmd.families import get_family
from diffusers_pdmd.hub import multiple_adapters
from diffusers_pdmd.pipelines import ExpertSwitcher, PhasedMoEPipeline
from diffusers_pdmd.training.adapters import LORA_TARGET_MODULES


SIZES = {
    "qwen-image": {"height": 32, "width": 32},
    "wan2.2-t2v-a14b": {"height": 16, "width": 16, "num_frames": 5},
    "wan2.2-ti2v-5b": {"height": 32, "width": 32, "num_frames": 5},
}
# (phase_boundaries, steps_per_phase) per family. The A14B boundary is just below the teacher's 0.875 switch so
# that every step's teacher transformer is the one of its phase (at exactly 0.875 WanPipeline still uses the
# high-noise transformer while the step belongs to the second phase).
PHASES = {
    "qwen-image": ([0.6], [2, 1]),
    "wan2.2-t2v-a14b": ([0.87], [1, 2]),
    "wan2.2-ti2v-5b": ([0.7], [1, 1]),
}


def add_lora(module, name, seed, targets=("to_q", "to_k", "to_v")):
    """Adds a peft LoRA with non-zero random weights (seeded, global RNG untouched)."""
    with torch.random.fork_rng(devices=[]), multiple_adapters():
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False)
        module.add_adapter(config, adapter_name=name)


def phased(family, components, experts=None, **kwargs):
    boundaries, steps = PHASES[family]
    scheduler = PhasedDMDScheduler.from_config(
        components["scheduler"].config, phase_boundaries=boundaries, steps_per_phase=steps
    )
    pipe = PhasedMoEPipeline(**{**components, "scheduler": scheduler}, experts=experts, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed=0, prompt="a cat", **kwargs):
    family = get_family(pipe)
    kwargs = {
        "generator": torch.Generator().manual_seed(seed),
        "output_type": "np",
        "max_sequence_length": 32,
        **SIZES[family.name],
        **kwargs,
    }
    out = pipe(prompt, **kwargs)
    return out.frames if family.is_video else out.images


def reference(family, components, scheduler, seed=0, **kwargs):
    """The family's own pipeline on the same modules, with the Phased DMD scheduler's sigmas."""
    base = tiny.pipeline_class(family)(**components)
    base.scheduler = PhasedDMDScheduler.from_config(scheduler.config)
    base.set_progress_bar_config(disable=True)
    kwargs = {
        "generator": torch.Generator().manual_seed(seed),
        "output_type": "np",
        "max_sequence_length": 32,
        **SIZES[family],
        **kwargs,
    }
    if family == "qwen-image":
        kwargs.setdefault("true_cfg_scale", 1.0)
        return base("a cat", sigmas=scheduler.sigmas[:-1].tolist(), **kwargs).images
    kwargs.setdefault("guidance_scale", 1.0)
    return base("a cat", num_inference_steps=len(scheduler.timesteps), **kwargs).frames


def record_transformer_calls(modules: dict) -> list:
    calls = []
    for name, module in modules.items():
        module.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
    return calls


# ---------------------------------------------------------------------------------------------- family equality


@pytest.mark.parametrize("family", list(PHASES))
def test_identical_experts_equal_family_pipeline(family):
    components = tiny.build_components(family)
    pipe = phased(family, components)  # default experts: the teacher transformer(s), no adapter
    if family == "wan2.2-t2v-a14b":
        assert [e["base_transformer"] for e in pipe.config.experts] == ["transformer", "transformer_2"]
    slots = {n: components[n] for n in ("transformer", "transformer_2") if components.get(n) is not None}
    calls = record_transformer_calls(slots)
    ours = run(pipe)
    ours_calls, calls[:] = list(calls), []
    theirs = reference(family, components, pipe.scheduler)
    assert ours.std() > 0.01
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
    assert ours_calls == calls  # the same transformer at every sigma
    assert pipe.expert_switcher.num_swaps == (1 if family == "wan2.2-t2v-a14b" else 0)


def test_copies_of_one_lora_equal_family_pipeline_with_that_lora():
    components = tiny.build_components("qwen-image")
    for name in ("p0", "p1"):
        add_lora(components["transformer"], name, seed=7)  # same seed: identical weights
    pipe = phased("qwen-image", components, experts=[("transformer", "p0"), ("transformer", "p1")])
    ours = run(pipe)
    assert pipe.expert_switcher.num_swaps == 1
    pipe.release_experts()  # the default mode merged the experts; give the transformer back unmerged
    components["transformer"].set_adapter("p0")
    np.testing.assert_allclose(ours, reference("qwen-image", components, pipe.scheduler), atol=1e-6, rtol=0)
    components["transformer"].disable_lora()
    assert np.abs(ours - reference("qwen-image", components, pipe.scheduler)).max() > 1e-4  # the LoRA matters


def test_a14b_lora_experts_equal_wan_pipeline_with_those_loras():
    components = tiny.build_components("wan2.2-t2v-a14b")
    add_lora(components["transformer"], "high", seed=1)
    add_lora(components["transformer_2"], "low", seed=2)
    pipe = phased("wan2.2-t2v-a14b", components, experts=[("transformer", "high"), ("transformer_2", "low")])
    ours = run(pipe)
    np.testing.assert_allclose(ours, reference("wan2.2-t2v-a14b", components, pipe.scheduler), atol=1e-6, rtol=0)


def test_ti2v_image_to_video_equals_wan_image_to_video_pipeline():
    components = tiny.build_components("wan2.2-ti2v-5b")
    pipe = phased("wan2.2-ti2v-5b", components)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    ours = run(pipe, image=image)
    i2v = WanImageToVideoPipeline(**components)
    i2v.scheduler = PhasedDMDScheduler.from_config(pipe.scheduler.config)
    i2v.set_progress_bar_config(disable=True)
    # WanImageToVideoPipeline cleans prompts with `ftfy` (not installed): give it WanPipeline's embeddings.
    prompt_embeds, _ = tiny.pipeline_class("wan2.2-ti2v-5b")(**components).encode_prompt(
        "a cat", do_classifier_free_guidance=False, max_sequence_length=32, device="cpu"
    )
    theirs = i2v(
        image,
        prompt_embeds=prompt_embeds,
        num_inference_steps=len(pipe.scheduler.timesteps),
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **SIZES["wan2.2-ti2v-5b"],
    ).frames
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
    assert np.abs(ours - run(pipe)).max() > 1e-4  # the image conditions the video


@pytest.mark.parametrize(
    ("family", "ours_kwargs", "theirs_kwargs"),
    [
        (
            "qwen-image",
            {"true_cfg_scale": 3.0, "negative_prompt": "blurry"},
            {"true_cfg_scale": 3.0, "negative_prompt": "blurry"},
        ),
        (
            "wan2.2-t2v-a14b",
            {"guidance_scale": 3.0, "guidance_scale_2": 2.0},
            {"guidance_scale": 3.0, "guidance_scale_2": 2.0},
        ),
    ],
)
def test_classifier_free_guidance_equals_family_pipeline(family, ours_kwargs, theirs_kwargs):
    components = tiny.build_components(family)
    pipe = phased(family, components)
    ours = run(pipe, **ours_kwargs)
    np.testing.assert_allclose(ours, reference(family, components, pipe.scheduler, **theirs_kwargs), atol=1e-6, rtol=0)
    guided, plain = run(pipe, output_type="latent", **ours_kwargs), run(pipe, output_type="latent")
    assert (guided - plain).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------- expert routing


def lora_firing_recorder(module, adapters):
    """Forward hooks on each adapter's `lora_A` of every LoRA layer: which adapters ran."""
    fired = set()
    for layer in module.modules():
        lora_a = getattr(layer, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict):
            for name in adapters:
                if name in lora_a:
                    lora_a[name].register_forward_hook(lambda *_, name=name: fired.add(name))
    return fired


def test_each_step_calls_exactly_the_expert_of_its_phase_qwen():
    components = tiny.build_components("qwen-image")
    transformer = components["transformer"]
    for k, name in enumerate(("p0", "p2")):
        add_lora(transformer, name, seed=k)
    scheduler = PhasedDMDScheduler.from_config(
        components["scheduler"].config, phase_boundaries=[0.8, 0.4], steps_per_phase=[1, 2, 2]
    )
    pipe = PhasedMoEPipeline(
        **{**components, "scheduler": scheduler},
        experts=[("transformer", "p0"), ("transformer", None), ("transformer", "p2")],
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.expert_swap_mode = "adapter"  # the LoRA modules themselves run (merged modes: see the equality tests)
    fired, per_step = lora_firing_recorder(transformer, ["p0", "p2"]), []

    def callback(pipeline, i, t, kwargs):
        per_step.append((pipeline.scheduler.phase_index(t), sorted(fired)))
        fired.clear()
        return {}

    run(pipe, callback_on_step_end=callback)
    assert per_step == [(0, ["p0"]), (1, []), (1, []), (2, ["p2"]), (2, ["p2"])]
    assert pipe.expert_switcher.num_swaps == 2  # phase changes


def test_each_step_calls_exactly_the_expert_of_its_phase_wan_a14b():
    components = tiny.build_components("wan2.2-t2v-a14b")
    add_lora(components["transformer"], "high", seed=1)
    add_lora(components["transformer_2"], "low", seed=2)
    scheduler = PhasedDMDScheduler.from_config(
        components["scheduler"].config, phase_boundaries=[0.875], steps_per_phase=[2, 2]
    )
    pipe = PhasedMoEPipeline(
        **{**components, "scheduler": scheduler}, experts=[("transformer", "high"), ("transformer_2", "low")]
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.expert_swap_mode = "adapter"
    calls = record_transformer_calls({n: components[n] for n in ("transformer", "transformer_2")})
    fired = lora_firing_recorder(components["transformer"], ["high"])
    fired_2 = lora_firing_recorder(components["transformer_2"], ["low"])
    per_step = []

    def callback(pipeline, i, t, kwargs):
        per_step.append((float(t), calls.pop(), sorted(fired | fired_2)))
        assert not calls
        fired.clear()
        fired_2.clear()
        return {}

    run(pipe, callback_on_step_end=callback)
    # The second phase starts exactly at the boundary sigma 0.875, and its expert makes that step.
    assert per_step[2] == (875.0, "transformer_2", ["low"])
    assert [c for _, c, _ in per_step] == ["transformer", "transformer", "transformer_2", "transformer_2"]
    assert pipe.expert_switcher.num_swaps == 1


def _qwen_with_adapters(names=("a", "b")):
    transformer = tiny.build_components("qwen-image")["transformer"]
    for k, name in enumerate(names):
        add_lora(transformer, name, seed=k)
    return transformer


def test_switcher_sets_only_the_chosen_adapter_without_walking_the_model(monkeypatch):
    transformer = _qwen_with_adapters()
    switcher = ExpertSwitcher([(transformer, "a"), (transformer, None), (transformer, "b")])
    layers = [m for m in transformer.modules() if hasattr(m, "lora_A")]
    assert switcher.num_lora_layers == len(layers) > 0
    monkeypatch.setattr(transformer, "modules", lambda: pytest.fail("a swap walked the whole model"))
    for phase, expected in [(0, "a"), (1, None), (2, "b"), (2, "b"), (0, "a")]:
        assert switcher.activate(phase) is transformer
        for layer in layers:
            if expected is None:
                assert layer.disable_adapters
            else:
                assert not layer.disable_adapters and layer.active_adapters == [expected]
    assert switcher.num_swaps == 3
    switcher.reset()
    assert switcher.num_swaps == 0


def _qwen_forward_kwargs():
    """Fixed inputs of one tiny Qwen-Image transformer forward (16 image tokens, 4 text tokens)."""
    return {
        "hidden_states": torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(0)),
        "timestep": torch.tensor([0.5]),
        "encoder_hidden_states": torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(1)),
        "img_shapes": [[(1, 4, 4)]],
        "return_dict": False,
    }


def test_switcher_adapter_mode_equals_peft_mode():
    transformer = _qwen_with_adapters()
    kwargs = _qwen_forward_kwargs()
    outs = {}
    for mode in ("adapter", "peft"):
        switcher = ExpertSwitcher([(transformer, "a"), (transformer, None), (transformer, "b")], mode=mode)
        outs[mode] = [switcher.activate(k)(**kwargs)[0] for k in (0, 1, 2, 0)]
    for a, b in zip(outs["adapter"], outs["peft"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (outs["adapter"][0] - outs["adapter"][1]).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["resident", "delta"])
def test_merging_modes_equal_unfused_adapters_and_release(mode):
    """Merged experts (resident copies or in-place deltas) compute what the unfused adapters compute."""
    transformer = _qwen_with_adapters()
    kwargs = _qwen_forward_kwargs()
    order = (0, 1, 2, 0, 2, 1)
    plain = ExpertSwitcher([(transformer, "a"), (transformer, None), (transformer, "b")], mode="adapter")
    want = [plain.activate(k)(**kwargs)[0] for k in order]
    base_weights = {n: p.detach().clone() for n, p in transformer.named_parameters() if "base_layer" in n}
    merged = ExpertSwitcher([(transformer, "a"), (transformer, None), (transformer, "b")], mode=mode)
    got = [merged.activate(k)(**kwargs)[0] for k in order]
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert merged.num_swaps == len(order) - 1
    merged.release()
    for n, p in transformer.named_parameters():  # the base weights are back, and the unfused forward works again
        if n in base_weights:
            torch.testing.assert_close(p, base_weights[n], atol=1e-6, rtol=0)
    again = ExpertSwitcher([(transformer, "a"), (transformer, None), (transformer, "b")], mode="adapter")
    torch.testing.assert_close(again.activate(2)(**kwargs)[0], want[2], atol=1e-6, rtol=0)


def test_switcher_rejects_bad_experts():
    transformer = _qwen_with_adapters(("a",))
    with pytest.raises(ValueError, match="available adapters: \\['a'\\]"):
        ExpertSwitcher([(transformer, "missing")])
    with pytest.raises(ValueError, match="`mode`"):
        ExpertSwitcher([(transformer, "a")], mode="fused")
    with pytest.raises(ValueError, match="`phase`"):
        ExpertSwitcher([(transformer, "a")]).activate(1)
    transformer.fuse_lora(adapter_names=["a"])
    with pytest.raises(ValueError, match="unfused"):
        ExpertSwitcher([(transformer, "a")])


# ---------------------------------------------------------------------------------------------- save / load


def _experts_for_round_trip(family, components):
    """LoRA experts, plus a fully fine-tuned one (A14B) or the bare base (TI2V)."""
    add_lora(components["transformer"], "first", seed=3)
    if family == "qwen-image":
        add_lora(components["transformer"], "second", seed=4)
        return [("transformer", "first"), ("transformer", "second")]
    if family == "wan2.2-t2v-a14b":
        with torch.no_grad():  # stands for a fully fine-tuned low-noise transformer
            for p in components["transformer_2"].parameters():
                p.add_(0.05 * torch.randn_like(p))
        return [("transformer", "first"), {"base_transformer": "transformer_2", "type": "full"}]
    return [("transformer", "first"), ("transformer", None)]


@pytest.mark.parametrize("family", list(PHASES))
def test_save_load_round_trip_both_forms(family, tmp_path):
    base_dir = tiny.save_pipeline(family, tmp_path / "base")
    components = tiny.build_components(family)
    pipe = phased(family, components, experts=_experts_for_round_trip(family, components), base_model=str(base_dir))
    expected = run(pipe)
    pipe.save_pretrained(tmp_path / "experts", experts_only=True)
    pipe.save_pretrained(tmp_path / "full")
    assert not (tmp_path / "experts" / "model_index.json").exists()
    assert not (tmp_path / "experts" / "transformer").exists()
    assert (tmp_path / "full" / "model_index.json").is_file()

    loaded = {
        "experts-only": PhasedMoEPipeline.from_pretrained(tmp_path / "experts"),
        "full": PhasedMoEPipeline.from_pretrained(tmp_path / "full"),
        "base + experts": PhasedMoEPipeline.from_pretrained(base_dir, experts=tmp_path / "experts"),
    }
    for form, other in loaded.items():
        other.set_progress_bar_config(disable=True)
        assert [e["type"] for e in other.config.experts] == [e["type"] for e in pipe.config.experts], form
        # fp32 on the CPU: the same weights loaded from disk may meet other GEMM kernels (buffer alignment) than
        # the ones built in memory, ~1e-6 apart after a few blocks (seen once in the full suite)
        np.testing.assert_allclose(run(other), expected, atol=1e-5, rtol=0, err_msg=form)
    if family == "wan2.2-t2v-a14b":  # a loaded full folder (LoRA and full experts) saves to the same pipeline
        loaded["full"].save_pretrained(tmp_path / "again")
        again = PhasedMoEPipeline.from_pretrained(tmp_path / "again")
        again.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(run(again), expected, atol=1e-6, rtol=0)


def test_full_folder_transformer_has_no_lora_keys(tmp_path):
    from safetensors import safe_open

    components = tiny.build_components("qwen-image")
    pipe = phased("qwen-image", components, experts=_experts_for_round_trip("qwen-image", components))
    pipe.save_pretrained(tmp_path / "full")
    with safe_open(tmp_path / "full" / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora" in k or "base_layer" in k]
    assert sorted(keys) == sorted(tiny.build_components("qwen-image")["transformer"].state_dict())
    assert "save_pretrained" not in components["transformer"].__dict__  # the shadowing was undone


def test_load_and_save_errors(tmp_path):
    base_dir = tiny.save_pipeline("wan2.2-ti2v-5b", tmp_path / "ti2v")
    with pytest.raises(ValueError, match="experts="):
        PhasedMoEPipeline.from_pretrained(base_dir)
    with pytest.raises(ValueError, match="remote code"):
        PhasedMoEPipeline.from_pretrained(base_dir, trust_remote_code=True)
    components = tiny.build_components("qwen-image")
    add_lora(components["transformer"], "a", seed=0)
    pipe = phased("qwen-image", components, experts=[("transformer", "a"), ("transformer", "a")])
    with pytest.raises(ValueError, match="base_model"):
        pipe.save_pretrained(tmp_path / "x", experts_only=True)
    pipe.save_pretrained(tmp_path / "qwen-experts", experts_only=True, base_model=str(base_dir))
    with pytest.raises(ValueError, match="family"):
        PhasedMoEPipeline.from_pretrained(tmp_path / "qwen-experts")  # a Qwen-Image LoRA on a Wan base
    qwen_base = tiny.save_pipeline("qwen-image", tmp_path / "qwen")
    pipe.save_pretrained(tmp_path / "bad-scheduler", experts_only=True, base_model=str(qwen_base))
    PhasedDMDScheduler(phase_boundaries=[0.3], steps_per_phase=[1, 1]).save_pretrained(
        tmp_path / "bad-scheduler/scheduler"
    )
    with pytest.raises(ValueError, match="disagree"):
        PhasedMoEPipeline.from_pretrained(tmp_path / "bad-scheduler")
    with pytest.raises(ValueError, match="already holds Phased DMD experts"):
        PhasedMoEPipeline.from_pretrained(tmp_path / "bad-scheduler", experts=tmp_path / "qwen-experts")


# ---------------------------------------------------------------------------------------------- input checks


@pytest.fixture(scope="module")
def checked():
    """Pipelines of the three families whose models count their forward calls."""
    out = {}
    for family in PHASES:
        components = tiny.build_components(family)
        add_lora(components["transformer"], "a", seed=0)
        pipe = phased(family, components)
        pipe.model_calls = []
        for name in ("text_encoder", "transformer", "transformer_2", "vae"):
            if components.get(name) is not None:
                components[name].register_forward_pre_hook(
                    lambda *_, name=name, calls=pipe.model_calls: calls.append(name)
                )
        out[family] = pipe
    return out


def _set_experts(n):
    return lambda pipe: pipe.set_experts([("transformer", None)] * n)


def _set_boundaries(pipe):
    pipe.set_experts(pipe.config.experts, phase_boundaries=[0.5])


def _set_missing_adapter(pipe):
    pipe.set_experts([("transformer", "a"), ("transformer", "nope")])


def _set_scheduler(pipe):
    pipe.scheduler = PhasedDMDScheduler(phase_boundaries=[0.5], steps_per_phase=[1, 1])


def _set_family(pipe):
    pipe.register_to_config(family="sdxl")


BAD_INPUTS = [
    ("qwen-image", _set_experts(3), {}, "`experts` has 3 experts but the scheduler has 2 phases"),
    ("qwen-image", _set_boundaries, {}, "phase_boundaries"),
    ("qwen-image", _set_scheduler, {}, "phase_boundaries"),
    ("qwen-image", _set_missing_adapter, {}, "adapter 'nope'"),
    ("qwen-image", _set_family, {}, "`family` must be one of"),
    ("qwen-image", None, {"height": 20}, "`height` must be a positive multiple of 8"),
    ("qwen-image", None, {"width": 0}, "`width`"),
    ("qwen-image", None, {"num_frames": 5}, "`num_frames`"),
    ("qwen-image", None, {"output_type": "mp4"}, "`output_type` must be one of"),
    ("qwen-image", None, {"prompt_embeds": torch.zeros(1, 4, 16)}, "either `prompt` or `prompt_embeds`"),
    ("qwen-image", None, {"prompt": None}, "one of `prompt` or `prompt_embeds`"),
    ("qwen-image", None, {"prompt": 3}, "`prompt` must be a string"),
    (
        "qwen-image",
        None,
        {
            "negative_prompt": "x",
            "prompt": None,
            "prompt_embeds": torch.zeros(1, 4, 16),
            "negative_prompt_embeds": torch.zeros(1, 4, 16),
        },
        "either `negative_prompt` or",
    ),
    ("qwen-image", None, {"num_inference_steps": 7}, "`num_inference_steps`=7"),
    ("qwen-image", None, {"negative_prompt_embeds": torch.zeros(2, 4, 16)}, "`negative_prompt_embeds` must be"),
    ("qwen-image", None, {"guidance_scale": -1.0}, "`guidance_scale` must be a number"),
    ("qwen-image", None, {"num_images_per_prompt": 0}, "`num_images_per_prompt` must be a positive int"),
    ("qwen-image", None, {"callback_on_step_end_tensor_inputs": ["noise"]}, "callback_on_step_end_tensor_inputs"),
    ("qwen-image", None, {"max_sequence_length": 2048}, "`max_sequence_length`"),
    ("qwen-image", None, {"latents": torch.zeros(1, 3, 16)}, "`latents` must have shape"),
    ("qwen-image", None, {"generator": [torch.Generator()] * 2}, "`generator` is a list of 2"),
    ("qwen-image", None, {"guidance_scale_2": 2.0}, "`guidance_scale_2`"),
    ("wan2.2-t2v-a14b", None, {"num_frames": 6}, "`num_frames` must be a positive int"),
    ("wan2.2-t2v-a14b", None, {"height": 24}, "`height` must be a positive multiple of 16"),
    ("wan2.2-t2v-a14b", None, {"true_cfg_scale": 3.0}, "`true_cfg_scale` is not an argument"),
    ("wan2.2-t2v-a14b", None, {"image": np.zeros((16, 16, 3))}, "`image` is not an argument"),
    ("wan2.2-t2v-a14b", None, {"guidance_scale": -1.0}, "`guidance_scale` must be a number"),
    ("wan2.2-t2v-a14b", None, {"prompt_embeds_mask": torch.ones(1, 4)}, "`prompt_embeds_mask`"),
    ("wan2.2-ti2v-5b", None, {"width": 48}, "`width` must be a positive multiple of 32"),
    ("wan2.2-ti2v-5b", None, {"guidance_scale_2": 2.0}, "`guidance_scale_2`"),
    ("wan2.2-ti2v-5b", None, {"image": "cat.png"}, "`image` must be a PIL image"),
    ("wan2.2-ti2v-5b", None, {"num_videos_per_prompt": 0}, "`num_videos_per_prompt` must be a positive int"),
    ("wan2.2-ti2v-5b", None, {"num_images_per_prompt": 2}, "`num_images_per_prompt` is not an argument"),
    ("wan2.2-ti2v-5b", None, {"sigmas": [1.0, 0.5, 0.7]}, "strictly decreasing"),
]


@pytest.mark.parametrize(("family", "mutate", "kwargs", "match"), BAD_INPUTS)
def test_bad_inputs_raise_before_any_model_runs(checked, family, mutate, kwargs, match):
    pipe = checked[family]
    saved = (dict(pipe.config), pipe.scheduler)
    if mutate is not None:
        mutate(pipe)
    pipe.model_calls.clear()
    try:
        with pytest.raises(ValueError, match=match):
            run(pipe, **kwargs)
        assert pipe.model_calls == []
    finally:
        pipe.register_to_config(**{k: saved[0][k] for k in ("family", "experts", "phase_boundaries")})
        pipe.scheduler = saved[1]


def test_unknown_family_at_construction():
    components = tiny.build_components("qwen-image")
    with pytest.raises(ValueError, match="`family` must be one of"):
        PhasedMoEPipeline(**components, family="flux")
    with pytest.raises(ValueError, match="`experts\\[0\\]`"):
        PhasedMoEPipeline(**components, experts=[("unet", None)])


# ---------------------------------------------------------------------------------------------- measurement

QWEN_BLOCK_LINEARS = LORA_TARGET_MODULES["qwen-image"]  # all 12 attention and MLP linears of a block


@pytest.mark.benchmark
@pytest.mark.parametrize(("blocks", "targets"), [(2, ["to_q", "to_k", "to_v"]), (60, QWEN_BLOCK_LINEARS)])
def test_measure_swap_cost(blocks, targets):
    """Time of a swap against a forward (`pytest -m benchmark -s -k swap_cost`); numbers in docs/pipeline.md."""
    import time

    transformer = tiny.build_components("qwen-image", transformer_kwargs={"num_layers": blocks})["transformer"]
    for k in range(3):
        add_lora(transformer, f"p{k}", seed=k, targets=targets)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 64, 16, generator=g),
        "timestep": torch.tensor([0.5]),
        "encoder_hidden_states": torch.randn(1, 8, 16, generator=g),
        "img_shapes": [[(1, 8, 8)]],
        "return_dict": False,
    }
    per_swap = {}
    for mode in ("adapter", "peft"):
        switcher = ExpertSwitcher([(transformer, "p0"), (transformer, None), (transformer, "p2")], mode=mode)
        start = time.perf_counter()
        for i in range(200):
            switcher.activate(i % 3)
        per_swap[mode] = (time.perf_counter() - start) / 200
        assert switcher.num_swaps == 199
    with torch.no_grad():
        transformer(**inputs)
        start = time.perf_counter()
        for _ in range(10):
            transformer(**inputs)
        forward = (time.perf_counter() - start) / 10
    print(
        f"\n{blocks} blocks, {switcher.num_lora_layers} LoRA layers: swap {per_swap['adapter'] * 1e6:.1f} us "
        f"(peft set_adapter {per_swap['peft'] * 1e3:.2f} ms), forward {forward * 1e3:.2f} ms"
    )
    assert per_swap["adapter"] < per_swap["peft"]
