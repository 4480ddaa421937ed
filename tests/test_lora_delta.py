"""Fast expert swaps (`pipelines/lora_delta.py`) against peft's own merge, on a tiny model."""

import copy

import pytest
import torch


peft = pytest.importorskip("peft")

from diffusers_pdmd.hub import multiple_adapters  # noqa: E402
from diffusers_pdmd.pipelines.lora_delta import (  # noqa: E402
    DeltaExperts,
    ResidentExperts,
    apply_expert_delta_,
    cast_adapters_,
    delta_factors,
    lora_linear_layers,
    set_active_adapter_,
)


ADAPTERS = ("phase0", "phase1")


class Tiny(torch.nn.Module):
    def __init__(self, dim=24, hidden=40):
        super().__init__()
        self.to_q = torch.nn.Linear(dim, dim)
        self.ff_in = torch.nn.Linear(dim, hidden)
        self.ff_out = torch.nn.Linear(hidden, dim)
        self.head = torch.nn.Linear(dim, 3)  # not adapted

    def forward(self, x):
        x = x + self.to_q(x)
        x = x + self.ff_out(torch.nn.functional.gelu(self.ff_in(x)))
        return self.head(x)


def assert_within_one_bf16_ulp(w, ref):
    w, ref = w.double(), ref.double()
    biggest = torch.maximum(w.abs(), ref.abs()).clamp_min(2.0**-126)
    ulp = torch.exp2(torch.floor(torch.log2(biggest)) - 7)
    assert ((w - ref).abs() <= ulp).all(), ((w - ref).abs() / ulp).max()


def make_model(dtype=torch.float32, seed=0, delta_scale=1.0):
    torch.manual_seed(seed)
    model = Tiny().to(dtype)
    for name in ADAPTERS:
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["to_q", "ff_in", "ff_out"], init_lora_weights=False
        )
        with multiple_adapters():  # several adapters on one model are the design
            peft.inject_adapter_in_model(config, model, adapter_name=name)
    with torch.no_grad():
        for layer in lora_linear_layers(model):
            for name in ADAPTERS:
                layer.lora_B[name].weight.mul_(delta_scale)
    return model


def unfused_output(model, adapter, x):
    set_active_adapter_(lora_linear_layers(model), adapter)
    with torch.no_grad():
        return model(x)


def peft_merged_weights(model, adapter):
    ref = copy.deepcopy(model)
    layers = lora_linear_layers(ref)
    if adapter is not None:
        for layer in layers:
            layer.merge(adapter_names=[adapter])
    return [layer.get_base_layer().weight.detach().clone() for layer in layers]


def weights(model):
    return [layer.get_base_layer().weight.detach().clone() for layer in lora_linear_layers(model)]


def test_lora_linear_layers_finds_adapted_layers_only():
    model = make_model()
    layers = lora_linear_layers(model, ADAPTERS)
    assert len(layers) == 3
    with pytest.raises(ValueError, match="no peft LoRA"):
        lora_linear_layers(model, ["missing"])


def test_lora_with_a_bias_is_not_merged():
    # `.diff_b` keys of extracted LoRAs load as a bias of lora_B, which `W + s B A` leaves out: the merging modes
    # must refuse such adapters rather than drop the bias (the "auto" mode then keeps them unfused).
    torch.manual_seed(0)
    model = Tiny()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"], init_lora_weights=False, lora_bias=True)
    peft.inject_adapter_in_model(config, model, adapter_name="biased")
    with pytest.raises(ValueError, match="bias"):
        lora_linear_layers(model, ["biased"])
    from diffusers_pdmd.pipelines import ExpertSwitcher

    with pytest.raises(ValueError, match="bias"):
        ExpertSwitcher([(model, "biased")], mode="resident")


def test_delta_factors_product():
    model = make_model()
    layer = lora_linear_layers(model)[0]
    b, a = delta_factors(layer, "phase0", "phase1")
    assert b.shape == (24, 8) and a.shape == (8, 24)
    expected = layer.get_delta_weight("phase1") - layer.get_delta_weight("phase0")
    torch.testing.assert_close(b @ a, expected, rtol=1e-5, atol=1e-6)
    assert delta_factors(layer, "phase0", "phase0") is None


@pytest.mark.parametrize("target", ADAPTERS)
def test_apply_expert_delta_matches_peft_merge_fp32(target):
    model = make_model()
    layers = lora_linear_layers(model)
    set_active_adapter_(layers, None)
    apply_expert_delta_(layers, None, target)
    for w, ref in zip(weights(model), peft_merged_weights(make_model(), target)):
        torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)


def test_apply_expert_delta_swap_matches_unfused_forward():
    model = make_model()
    x = torch.randn(5, 24)
    expected = unfused_output(make_model(), "phase1", x)
    layers = lora_linear_layers(model)
    set_active_adapter_(layers, None)
    apply_expert_delta_(layers, None, "phase0")
    apply_expert_delta_(layers, "phase0", "phase1")
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_delta_experts_round_trip_fp32():
    model = make_model()
    base = weights(model)
    x = torch.randn(5, 24)
    outputs = {name: unfused_output(make_model(), name, x) for name in ADAPTERS}
    swap = DeltaExperts(lora_linear_layers(model), ADAPTERS)
    for name in ["phase0", "phase1", "phase0", "phase1", "phase0"]:
        swap.activate(name)
        assert swap.current == name
        with torch.no_grad():
            torch.testing.assert_close(model(x), outputs[name], rtol=1e-5, atol=1e-5)
    assert swap.num_passes == 5
    swap.restore()
    for w, ref in zip(weights(model), base):
        torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-6)
    set_active_adapter_(swap.layers, "phase1")  # the LoRA forward works again after restore
    with torch.no_grad():
        torch.testing.assert_close(model(x), outputs["phase1"], rtol=1e-5, atol=1e-5)


def test_delta_experts_bf16_error_is_bounded_over_many_swaps():
    """Back and forth along one edge the bf16 state settles into a period-2 cycle: no drift."""
    model = make_model(torch.bfloat16, delta_scale=0.05)
    exact_model = make_model(torch.float64, delta_scale=0.05)
    exact = {name: peft_merged_weights(exact_model, name) for name in ADAPTERS}
    merged_once = {name: peft_merged_weights(make_model(torch.bfloat16, delta_scale=0.05), name) for name in ADAPTERS}
    swap = DeltaExperts(lora_linear_layers(model), ADAPTERS)

    def rel_err(ws, name):
        num = sum((w.double() - e).norm() ** 2 for w, e in zip(ws, exact[name])) ** 0.5
        den = sum((e - b.double()).norm() ** 2 for e, b in zip(exact[name], weights(make_model(torch.float64)))) ** 0.5
        return (num / den).item()

    states = []
    for n in range(400):
        swap.activate(ADAPTERS[n % 2])
        if n >= 396:
            states.append(weights(model))
    # period 2 at the end
    for w2, w0 in zip(states[2], states[0]):
        assert torch.equal(w2, w0)
    for name, ws in zip([ADAPTERS[396 % 2], ADAPTERS[397 % 2]], states[:2]):
        err, ref_err = rel_err(ws, name), rel_err(merged_once[name], name)
        assert err <= 3 * ref_err + 1e-3, (err, ref_err)


def test_delta_experts_path_walk_is_bounded_for_three_experts():
    """Three experts cycled 0 -> 1 -> 2 -> 0 by walking the path: the set of bf16 states saturates (no random walk)
    and the error stays within a few times that of one bf16 merge."""
    torch.manual_seed(0)
    model = Tiny().to(torch.bfloat16)
    names = ["e0", "e1", "e2"]
    for name in names:
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["ff_in"], init_lora_weights=False)
        with multiple_adapters():  # several adapters on one model are the design
            peft.inject_adapter_in_model(config, model, adapter_name=name)
    layer = lora_linear_layers(model, names)[0]
    with torch.no_grad():
        for name in names:
            layer.lora_B[name].weight.mul_(0.05)
    w0 = layer.get_base_layer().weight.detach().double().clone()
    exact = {
        n: w0 + layer.scaling[n] * layer.lora_B[n].weight.double() @ layer.lora_A[n].weight.double() for n in names
    }

    def rel_err(w, name):
        return ((w.double() - exact[name]).norm() / (exact[name] - w0).norm()).item()

    once = max(rel_err(exact[n].bfloat16(), n) for n in names)
    swap = DeltaExperts([layer], names)
    seen, counts, worst = {n: set() for n in names}, [], 0.0
    for cycle in range(900):
        name = names[cycle % 3]
        swap.activate(name)
        w = layer.get_base_layer().weight.detach()
        seen[name].add(w.view(torch.int16).numpy().tobytes())
        worst = max(worst, rel_err(w, name))
        if cycle in (449, 899):
            counts.append(sum(len(v) for v in seen.values()))
    assert counts[0] == counts[1], counts
    assert worst < 6 * once, (worst, once)
    assert swap.num_passes == 3 + (900 // 3 - 1) * 4  # 0 -> 1 -> 2 once, then 2 -> 1 -> 0 -> 1 -> 2 per cycle


@pytest.mark.parametrize("keep_base", [True, False])
def test_resident_experts_match_peft_merge(keep_base):
    model = make_model(torch.bfloat16)
    base = weights(model)
    layers = lora_linear_layers(model)
    # the merge in fp32, rounded once to bf16
    refs = {
        name: [
            torch.addmm(
                layer.get_base_layer().weight.float(),
                layer.lora_B[name].weight.float() * layer.scaling[name],
                layer.lora_A[name].weight.float(),
            ).bfloat16()
            for layer in layers
        ]
        for name in ADAPTERS
    }
    # peft's merge of the same (exactly up-cast) weights in fp32; its bf16 CPU merge rounds the delta to bf16 first
    peft_refs = {name: peft_merged_weights(copy.deepcopy(model).float(), name) for name in ADAPTERS}
    swap = ResidentExperts(lora_linear_layers(model), ADAPTERS, keep_base=keep_base)
    assert swap.current == (None if keep_base else "phase0")
    for name in ["phase1", "phase0", "phase1"]:
        swap.activate(name)
        for w, ref in zip(weights(model), refs[name]):
            assert torch.equal(w, ref)
        for w, ref in zip(weights(model), peft_refs[name]):
            assert_within_one_bf16_ulp(w, ref)
    if keep_base:
        swap.activate(None)
        for w, ref in zip(weights(model), base):
            assert torch.equal(w, ref)
        assert swap.extra_bytes() == 2 * sum(w.numel() * 2 for w in base)
    else:
        with pytest.raises(ValueError, match="dropped"):
            swap.activate(None)
        assert swap.extra_bytes() == sum(w.numel() * 2 for w in base)


def test_cast_adapters_to_bf16():
    model = make_model(torch.bfloat16)
    layers = lora_linear_layers(model)
    cast_adapters_(layers, torch.float32)  # as after `cast_training_params` or peft's autocast
    assert layers[0].lora_A["phase0"].weight.dtype == torch.float32
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    before = unfused_output(model, "phase0", x)
    cast_adapters_(layers, torch.bfloat16)
    assert all(layer.lora_B[n].weight.dtype == torch.bfloat16 for layer in layers for n in ADAPTERS)
    after = unfused_output(model, "phase0", x)
    torch.testing.assert_close(after, before, rtol=2e-2, atol=2e-2)
