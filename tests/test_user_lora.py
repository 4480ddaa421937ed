"""The user's own LoRA on top of the phase experts (diffusers' LoRA API on `PhasedMoEPipeline`), in every expert swap
mode, and modules that stay usable through peft / diffusers after a call (reuse, `from_pipe`, saving)."""

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from test_pipeline_phased_moe import SIZES, _qwen_forward_kwargs, add_lora, phased

from diffusers_pdmd import PhasedDMDScheduler, tiny
from diffusers_pdmd.hub import save_lora_expert
from diffusers_pdmd.pipelines import PhasedMoEPipeline
from diffusers_pdmd.pipelines.expert_swap import resident_extra_bytes


pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")

GIB = 2**30
# Every way the pipeline swaps experts; "split" is what "auto" resolves to when only part of the copies fit.
SWAP_MODES = ["auto", "adapter", "resident", "delta", "split", "peft"]
EXPERTS = {
    "qwen-image": [("transformer", "phase_0"), ("transformer", "phase_1")],
    "wan2.2-t2v-a14b": [("transformer", "phase_0"), ("transformer_2", "phase_1")],
}


def expert_pipe(family, experts=None):
    """A tiny pipeline with random LoRA experts `phase_k` (and its components, shared with it)."""
    experts = experts or EXPERTS[family]
    components = tiny.build_components(family)
    for k, (slot, adapter) in enumerate(experts):
        if adapter is not None:
            add_lora(components[slot], adapter, seed=10 + k)
    return phased(family, components, experts=experts), components


def set_mode(pipe, mode):
    if mode == "split":  # a budget for half of the resident copies: "auto" resolves to "resident+delta"
        experts = [(getattr(pipe, e["base_transformer"]), e["adapter_name"]) for e in pipe.config.experts]
        need = resident_extra_bytes(experts)
        pipe._swap_memory = (need + need // 2, 10 * need)
        mode = "auto"
    pipe.expert_swap_mode = mode


def style_lora_file(family, folder, seed=99):
    """A user's LoRA file (diffusers format) for the family's tiny transformer, on layers the experts adapt
    (to_q, to_k) and on one they do not (to_out.0)."""
    transformer = tiny.build_components(family)["transformer"]
    add_lora(transformer, "style", seed=seed, targets=("to_q", "to_k", "to_out.0"))
    return save_lora_expert(transformer, "style", folder)


def run(pipe, seed=0, **kwargs):
    family = pipe.config.family
    out = pipe(
        "a cat",
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        max_sequence_length=32,
        **SIZES[family],
        **kwargs,
    )
    return out.frames if family != "qwen-image" else out.images


def plain_reference(pipe, components, weight, seed=0, expert_weight=1.0):
    """diffusers' own pipeline over the same modules, with each step's expert and the user's LoRA made active by
    peft's `set_adapters` (for the next step, in a step-end callback): the output the experts + the user's LoRA
    should give."""
    family = pipe.config.family
    pipe.release_experts()
    base = tiny.pipeline_class(family)(**components)
    base.scheduler = PhasedDMDScheduler.from_config(pipe.scheduler.config)
    base.set_progress_bar_config(disable=True)
    sigmas = pipe.scheduler.sigmas[:-1].tolist()

    def activate(step):
        expert = pipe.config.experts[pipe.scheduler.phase_index_for_sigma(sigmas[step])]
        module = components[expert["base_transformer"]]
        names = ([expert["adapter_name"]] if expert["adapter_name"] else []) + ["style"]
        module.set_adapters(names, [expert_weight] * (len(names) - 1) + [weight])

    def callback(_pipe, i, t, kwargs):
        if i + 1 < len(sigmas):
            activate(i + 1)
        return kwargs

    activate(0)
    kwargs = {
        "generator": torch.Generator().manual_seed(seed),
        "output_type": "np",
        "max_sequence_length": 32,
        "callback_on_step_end": callback,
        **SIZES[family],
    }
    if family == "qwen-image":
        return base("a cat", sigmas=sigmas, true_cfg_scale=1.0, **kwargs).images
    return base("a cat", num_inference_steps=len(sigmas), guidance_scale=1.0, **kwargs).frames


def load_style(pipe, file, **kwargs):
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="style", **kwargs)
    if getattr(pipe, "transformer_2", None) is not None:  # as in WanPipeline: transformer_2 takes it on request
        pipe.load_lora_weights(
            str(file.parent), weight_name=file.name, adapter_name="style", load_into_transformer_2=True, **kwargs
        )


# ------------------------------------------------------------------------------------------- item 1: user LoRA


@pytest.mark.parametrize("mode", SWAP_MODES)
@pytest.mark.parametrize("family", list(EXPERTS))
def test_user_lora_applies_with_every_expert_at_its_weight(family, mode, tmp_path):
    pipe, components = expert_pipe(family)
    set_mode(pipe, mode)
    experts_only = run(pipe)
    load_style(pipe, style_lora_file(family, tmp_path))
    assert pipe.get_active_adapters() == ["style"]
    listed = {slot: sorted(names) for slot, names in pipe.get_list_adapters().items()}
    if family == "qwen-image":
        assert listed == {"transformer": ["phase_0", "phase_1", "style"]}
    else:
        assert listed == {"transformer": ["phase_0", "style"], "transformer_2": ["phase_1", "style"]}
    pipe.set_adapters("style", 0.7)
    with_style = run(pipe)
    if mode == "split" and family == "qwen-image":  # A14B: one LoRA expert per transformer, no extra copy
        assert pipe.expert_switcher.mode == "resident+delta"
    assert pipe.expert_switcher.num_swaps == 1
    want = plain_reference(pipe, components, weight=0.7)
    np.testing.assert_allclose(with_style, want, atol=2e-5, rtol=0)
    assert np.abs(with_style - experts_only).max() > 1e-4  # the user's LoRA matters
    pipe.set_adapters("style", 1.0)
    assert np.abs(run(pipe) - with_style).max() > 1e-4  # and so does its weight
    pipe.unload_lora_weights()
    assert "style" not in str(pipe.get_list_adapters())
    np.testing.assert_allclose(run(pipe), experts_only, atol=2e-5, rtol=0)


@pytest.mark.parametrize("mode", ["adapter", "resident", "delta"])
def test_user_lora_with_a_base_phase(mode, tmp_path):
    """A phase without an adapter (the base transformer) gets the user's LoRA too."""
    pipe, components = expert_pipe("qwen-image", [("transformer", "phase_0"), ("transformer", None)])
    set_mode(pipe, mode)
    load_style(pipe, style_lora_file("qwen-image", tmp_path))
    pipe.set_adapters(["style"], [0.5])
    ours = run(pipe)
    np.testing.assert_allclose(ours, plain_reference(pipe, components, weight=0.5), atol=2e-5, rtol=0)


@pytest.mark.parametrize("mode", ["adapter", "resident", "delta", "peft"])
def test_fuse_lora_equals_the_unfused_user_lora_and_unfuses(mode, tmp_path):
    pipe, _ = expert_pipe("qwen-image")
    set_mode(pipe, mode)
    experts_only = run(pipe)
    load_style(pipe, style_lora_file("qwen-image", tmp_path))
    pipe.set_adapters("style", 0.8)
    unfused = run(pipe)
    pipe.set_adapters("style", 1.0)
    pipe.fuse_lora(lora_scale=0.8)
    assert pipe.fused_loras == {"style"}
    np.testing.assert_allclose(run(pipe), unfused, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="`adapter_names`.*fused"):
        pipe.set_adapters("style", 0.5)
    pipe.unfuse_lora()
    assert pipe.fused_loras == set()
    pipe.set_adapters("style", 0.8)
    np.testing.assert_allclose(run(pipe), unfused, atol=2e-5, rtol=0)
    pipe.delete_adapters("style")
    np.testing.assert_allclose(run(pipe), experts_only, atol=2e-5, rtol=0)


def test_lora_api_errors_name_the_argument(tmp_path):
    pipe, _ = expert_pipe("qwen-image")
    file = style_lora_file("qwen-image", tmp_path)
    with pytest.raises(ValueError, match="`load_into_transformer_2=True`"):
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, load_into_transformer_2=True)
    with pytest.raises(ValueError, match="`adapter_name` 'phase_0'.*expert"):
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="phase_0")
    with pytest.raises(ValueError, match="`adapter_names`.*'phase_1'.*expert of phase 1"):
        pipe.delete_adapters("phase_1")
    assert sorted(pipe.transformer.peft_config) == ["phase_0", "phase_1"]


# ------------------------------------------------------------------------------------------- item 2: after a call


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {family: tiny.save_pipeline(family, root / family) for family in EXPERTS}


@pytest.mark.parametrize("mode", SWAP_MODES)
@pytest.mark.parametrize("family", list(EXPERTS))
def test_modules_stay_usable_after_a_call(family, mode, base_folders, tmp_path):
    pipe, components = expert_pipe(family)
    set_mode(pipe, mode)
    want = run(pipe)
    # peft / diffusers APIs of the transformer work after a call (merged experts are released on the way).
    pipe.transformer.set_adapter("phase_0")
    assert any(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())
    # Components reused: a second pipeline over the same modules, and diffusers' `from_pipe`.
    second = phased(family, pipe.components, experts=EXPERTS[family])
    set_mode(second, mode)
    np.testing.assert_allclose(run(second), want, atol=2e-5, rtol=0)
    third = PhasedMoEPipeline.from_pipe(pipe)
    third.set_progress_bar_config(disable=True)
    set_mode(third, mode)
    np.testing.assert_allclose(run(third), want, atol=2e-5, rtol=0)
    # The first pipeline again (the others merged the shared modules in between), then its experts saved after the
    # call load back.
    np.testing.assert_allclose(run(pipe), want, atol=2e-5, rtol=0)
    second.save_pretrained(tmp_path / "experts", experts_only=True, base_model=str(base_folders[family]))
    loaded = PhasedMoEPipeline.from_pretrained(tmp_path / "experts")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(run(loaded), want, atol=2e-5, rtol=0)


def test_a_peft_call_on_a_merged_transformer_releases_it():
    pipe, _ = expert_pipe("qwen-image")
    pipe.expert_swap_mode = "resident"
    want = run(pipe)
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())  # merged: plain Linears
    assert pipe.transformer.active_adapters() is not None  # any adapter method gives the peft layers back first
    assert any(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())
    assert "active_adapters" not in vars(pipe.transformer)  # and drops its guard
    np.testing.assert_allclose(run(pipe), want, atol=0, rtol=0)  # the next call merges again
    assert pipe.expert_switcher.mode == "resident"


def test_a_user_lora_loaded_before_the_experts_stays_active(base_folders, tmp_path):
    """The user's LoRA on a family pipeline, then Phased DMD experts loaded onto it: both run."""
    pipe, components = expert_pipe("qwen-image")
    pipe.save_pretrained(tmp_path / "experts", experts_only=True, base_model=str(base_folders["qwen-image"]))
    want_experts = run(pipe)
    load_style(pipe, style_lora_file("qwen-image", tmp_path))
    pipe.set_adapters("style", 0.6)
    want = run(pipe)
    base = tiny.pipeline_class("qwen-image")(**tiny.build_components("qwen-image"))
    load_style(base, style_lora_file("qwen-image", tmp_path))
    base.set_adapters("style", 0.6)
    fresh = PhasedMoEPipeline.from_pipe(base, scheduler=pipe.scheduler)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_experts(tmp_path / "experts")
    assert fresh.get_active_adapters() == ["style"]
    np.testing.assert_allclose(run(fresh), want, atol=2e-5, rtol=0)
    fresh.unload_lora_weights()
    np.testing.assert_allclose(run(fresh), want_experts, atol=2e-5, rtol=0)


def test_lightning_experts_saved_after_two_pipelines_sampled_load_back(base_folders, tmp_path):
    """Wan2.2-Lightning's two files loaded in memory, sampled by the pipeline and by one made with `from_pipe`,
    then saved in our format: the files load back and sample the same."""
    from safetensors.torch import save_file
    from test_released import WAN_NATIVE, fabricate_lora

    family = "wan2.2-t2v-a14b"
    ref = tiny.build_pipeline(family)
    folder = tmp_path / "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1"
    folder.mkdir()
    for name, module, seed in (("high", ref.transformer, 0), ("low", ref.transformer_2, 1)):
        tensors, _ = fabricate_lora(module, WAN_NATIVE, "blocks", "diffusion_model.", seed)
        save_file(tensors, folder / f"{name}_noise_model.safetensors")
    pipe = PhasedMoEPipeline.from_pretrained(base_folders[family], experts=folder)
    pipe.set_progress_bar_config(disable=True)
    want = run(pipe)
    other = PhasedMoEPipeline.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(run(other), want, atol=2e-5, rtol=0)
    pipe.save_pretrained(tmp_path / "ours", experts_only=True)
    loaded = PhasedMoEPipeline.from_pretrained(tmp_path / "ours")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(run(loaded), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("mode", ["adapter", "resident"])
def test_disable_and_enable_lora_leave_the_experts_on(mode, tmp_path):
    pipe, _ = expert_pipe("qwen-image")
    set_mode(pipe, mode)
    experts_only = run(pipe)
    load_style(pipe, style_lora_file("qwen-image", tmp_path))
    with_style = run(pipe)
    pipe.disable_lora()
    assert pipe.get_active_adapters() == []
    np.testing.assert_allclose(run(pipe), experts_only, atol=2e-5, rtol=0)
    pipe.enable_lora()
    np.testing.assert_allclose(run(pipe), with_style, atol=2e-5, rtol=0)
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="`save_pretrained`.*fused"):
        pipe.save_pretrained(tmp_path / "full")


def test_a_deep_copy_of_a_merged_transformer_is_its_own():
    import copy

    pipe, _ = expert_pipe("qwen-image")
    pipe.expert_swap_mode = "resident"
    run(pipe)
    clone = copy.deepcopy(pipe.transformer)
    clone.set_adapter("phase_0")  # releases the clone's copy of the merge, not the pipeline's
    assert any(isinstance(m, BaseTunerLayer) for m in clone.modules())
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())
    pipe.transformer.set_adapter("phase_0")
    kwargs = _qwen_forward_kwargs()
    torch.testing.assert_close(clone(**kwargs)[0], pipe.transformer(**kwargs)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["adapter", "resident", "delta"])
def test_set_adapters_naming_an_expert_sets_its_weight(mode, tmp_path):
    pipe, components = expert_pipe("qwen-image")
    set_mode(pipe, mode)
    load_style(pipe, style_lora_file("qwen-image", tmp_path))
    pipe.set_adapters(["phase_0", "phase_1", "style"], [0.5, 0.5, 0.7])
    assert pipe.get_active_adapters() == ["style"]
    ours = run(pipe)
    want = plain_reference(pipe, components, weight=0.7, expert_weight=0.5)
    np.testing.assert_allclose(ours, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("mode", ["adapter", "resident", "delta"])
def test_the_lora_scale_of_attention_kwargs_scales_the_user_lora_only(mode, tmp_path):
    """`attention_kwargs={"scale": s}` (the family pipelines' LoRA scale) scales the user's LoRA, in every mode, for
    that call only; the experts keep their weight."""
    pipe, components = expert_pipe("qwen-image")
    set_mode(pipe, mode)
    load_style(pipe, style_lora_file("qwen-image", tmp_path))
    full = run(pipe)
    ours = run(pipe, attention_kwargs={"scale": 0.5})
    np.testing.assert_allclose(run(pipe), full, atol=1e-6, rtol=0)  # for that call only (delta: fp32 rounding)
    np.testing.assert_allclose(ours, plain_reference(pipe, components, weight=0.5), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="`attention_kwargs\\['scale'\\]`"):
        run(pipe, attention_kwargs={"scale": "half"})
