"""peft adapters on one frozen base: generator experts, fake scores, and the teacher (adapters disabled).

One copy of the base weights serves every role. Switching roles flips each LoRA layer's active adapter (or
disables adapters for the teacher) directly on the collected peft layers, which is a few attribute writes per layer
instead of peft's walk over the whole model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from ..hub import multiple_adapters
from ..pipelines.lora_delta import set_active_adapter_


# Every attention and MLP linear of the transformer blocks (Qwen-Image: 60 blocks x 12 = 720 layers).
LORA_TARGET_MODULES = {
    "qwen-image": [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    ],
    "wan": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"],
}


def lora_targets(family_name: str) -> list[str]:
    """Default LoRA target modules for a family name (`qwen-image`, `wan2.2-*`)."""
    return LORA_TARGET_MODULES["qwen-image" if family_name == "qwen-image" else "wan"]


def add_lora(model, adapter_name: str, rank: int, alpha: float, target_modules: Iterable[str]) -> None:
    """Add a LoRA adapter to a diffusers model. Its `B` starts at zero, so the adapted model equals the base."""
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(target_modules))
    with multiple_adapters():  # peft warns on every adapter after the first; several are the design here
        model.add_adapter(config, adapter_name=adapter_name)


def tuner_layers(model) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


class AdapterSwitch:
    """Fast switching of the active adapter of one model; `None` selects the base (adapters disabled).

    With gradient checkpointing the forward is recomputed during `backward`, with whatever adapter is active
    then: activate the adapter a graph was built with before calling `backward` on it.
    """

    def __init__(self, model):
        self.model = model
        self.layers = tuner_layers(model)
        self.active: str | None = "__unset__"

    def set(self, adapter_name: str | None) -> None:
        if adapter_name == self.active:
            return
        set_active_adapter_(self.layers, adapter_name)
        self.active = adapter_name

    def forget(self) -> None:
        """The layers' active adapter was changed elsewhere (an adapter deleted): the next `set` writes it."""
        self.active = "__unset__"


def adapter_parameters(model, adapter_name: str) -> list[torch.nn.Parameter]:
    """The parameters of one adapter (LoRA A and B of every adapted layer)."""
    return [p for n, p in model.named_parameters() if f".{adapter_name}." in n]


def set_trainable(model, adapter_names: Iterable[str]) -> list[torch.nn.Parameter]:
    """Freeze everything but the named adapters (kept in float32 for the optimizer); return their parameters."""
    names = set(adapter_names)
    params = []
    for n, p in model.named_parameters():
        train = any(f".{a}." in n for a in names)
        p.requires_grad_(train)
        if train:
            p.data = p.data.float()
            params.append(p)
    return params


def adapter_state_dict(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """peft state dict of one adapter (keys without the adapter name), detached and on the CPU."""
    sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def load_adapter_state_dict(model, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"Adapter {adapter_name!r}: unexpected keys in the state dict, e.g. {unexpected[:3]}.")


def rescale_factors(model, adapter_name: str, state_dict: dict[str, torch.Tensor], lora_config: dict) -> dict:
    """Module -> the factor that turns the `lora_B` of a LoRA file (`state_dict` without the `transformer.` prefix,
    its metadata `lora_config`) into `lora_B` of `model`'s adapter `adapter_name`: the file's scaling over the
    adapter's, so that the adapter computes what diffusers' loader of the file computes."""
    from ..hub import adapter_scalings, lora_file_scalings

    ours = adapter_scalings(model, adapter_name)
    theirs = lora_file_scalings(state_dict, lora_config)
    return {m: s / ours[m] for m, s in theirs.items() if m in ours}


def reset_adapter(model, adapter_name: str) -> None:
    """Re-initialise an adapter so that the adapted model equals the base again (`B = 0`)."""
    for layer in tuner_layers(model):
        if adapter_name in getattr(layer, "lora_A", {}):
            layer.reset_lora_parameters(adapter_name, init_lora_weights=True)


def delete_adapter(model, adapter_name: str) -> None:
    """Remove an adapter's LoRA weights from every layer of `model` and its config, leaving the other adapters'
    `requires_grad` as they are (peft re-activates another adapter, and sets its `requires_grad`, when the deleted
    one is active: it is taken off the active list here first). An [`AdapterSwitch`] of the model must then
    `forget` what it set."""
    for layer in tuner_layers(model):
        if adapter_name in layer.active_adapters:
            layer._active_adapter = [a for a in layer.active_adapters if a != adapter_name]
    model.delete_adapters(adapter_name)


def keep_input_dtype(layers: Iterable[BaseTunerLayer]) -> None:
    """Let LoRA layers take their input in its own dtype instead of casting it to the LoRA weights' dtype.

    Under mixed precision the trainable LoRA weights are fp32 (the optimizer's master copy) while activations are
    bf16: peft would cast every adapted layer's input to fp32 (a full copy of the activation) only for autocast to
    cast it back to bf16 for the matmul. Without the cast autocast runs the same bf16 matmuls on the same values
    (`peft.helpers.disable_input_dtype_casting`, kept on).
    """
    for layer in layers:
        layer.cast_input_dtype_enabled = False


def store_base_in_fp8(model, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Store a frozen diffusers model's weights in float8 (e4m3), cast to `compute_dtype` layer by layer as they run.

    diffusers' layerwise casting with its default skips (norms, embeddings, patch embedding and peft adapter
    layers), so LoRA weights keep their own dtype. Halves the memory of a bf16 base; each weight is rounded to
    fp8 once (see `benchmarks/gpu_train.py --fp8_check` for the effect on a teacher forward). Idempotent.
    """
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("layerwise_casting") is not None:
            return
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
