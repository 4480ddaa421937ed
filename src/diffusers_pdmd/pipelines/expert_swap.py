# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""Activating one phase expert at a time."""

from __future__ import annotations

import torch

from .lora_delta import set_active_adapter_


MODES = ("adapter", "resident", "delta", "peft")


def _tuner_layers(module: torch.nn.Module) -> list:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is only needed for LoRA experts
        return []
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def _layer_adapters(layer) -> set[str]:
    names = set()
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if isinstance(container, torch.nn.ModuleDict | torch.nn.ParameterDict):
            names.update(container.keys())
    return names


class ExpertSwitcher:
    """Makes the expert of a phase current and returns the module to call.

    An expert is `(module, adapter_name)`: a transformer and the name of one of its (unfused) peft LoRA adapters, or
    `None` for the module as it is, without any adapter (a base transformer or a fully fine-tuned one). Several
    experts may share one module (Qwen-Image: K adapters on one transformer) or use different modules (Wan2.2 A14B:
    experts on `transformer` and on `transformer_2`).

    How a swap works (`mode="adapter"`): at construction the peft `BaseTunerLayer`s of every expert module are
    collected once (one walk over `module.modules()`). Activating an adapter then sets, on each of those layers of
    the expert's module, `_active_adapter = [adapter_name]` and `_disable_adapters = False`; activating `None` sets
    `_disable_adapters = True`, so each layer returns its base layer's output. These are the two attributes peft's
    LoRA `forward` reads, so exactly the chosen adapter (or none) takes part in the next forward. A swap costs two
    Python attribute writes per LoRA layer of the module (O(number of LoRA layers), no tensor is touched, nothing is
    moved between devices), against peft's `set_adapter`, which walks every submodule of the model and toggles
    `requires_grad` of every adapter parameter. Activating the expert that is already current costs nothing, and
    a module whose layers are already in the requested state is not touched.

    Unlike peft's `set_adapter`, a swap leaves `requires_grad` alone: the switcher is for sampling (or
    back-simulation without gradient). Training code that needs gradients through an adapter sets them itself.

    An unfused LoRA forward costs time at every step (+18% per Qwen-Image forward at 1024x1024 with bf16 rank-64
    adapters on an H200, docs/benchmarks/gpu.md). Two modes merge the experts instead:

    - `mode="resident"`: each expert's merged weights `W + s B A` are computed once and kept on the device; a swap
      re-points each adapted layer's weight (no GPU work). Costs one copy of the adapted weights per expert
      (+25.3 GiB for two Qwen-Image experts); the 4-step, 2-phase sampling overhead measured +0.6%.
    - `mode="delta"`: the experts are merged in place into the shared weights; a swap is one fused `addmm_` per
      layer applying the difference of two experts (25 ms for Qwen-Image, +6.7% per image at batch 1, +1.5% at
      batch 4), with no extra copy of any weight and bounded bf16 drift ([`~lora_delta.DeltaExperts`]).

    Both switch the unfused LoRA forward off for the adapted layers and cast the adapters to the module's dtype;
    [`~ExpertSwitcher.release`] undoes this (base weights back, LoRA forward on).

    `mode="peft"` swaps with diffusers' `set_adapter` / `disable_lora` instead (the full-model walk); it exists as a
    reference to compare against.

    Args:
        experts (`list[tuple[torch.nn.Module, str | None]]`): `experts[k]` is the expert of phase `k`.
        mode (`str`, defaults to `"adapter"`): `"adapter"`, `"resident"`, `"delta"` or `"peft"`.

    Attributes:
        num_swaps (`int`): Number of times the active expert changed since construction or the last
            [`~ExpertSwitcher.reset`]; the first activation is not a swap.
    """

    def __init__(self, experts: list[tuple[torch.nn.Module, str | None]], mode: str = "adapter"):
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        if len(experts) == 0:
            raise ValueError("`experts` must hold one (module, adapter_name) pair per phase, got an empty list.")
        self.mode = mode
        self.experts = []
        self._layers: dict[int, list] = {}
        for phase, expert in enumerate(experts):
            if not isinstance(expert, tuple | list) or len(expert) != 2:
                raise ValueError(f"`experts[{phase}]` must be a (module, adapter_name) pair, got {expert!r}.")
            module, adapter = expert
            if not isinstance(module, torch.nn.Module):
                raise ValueError(f"`experts[{phase}]` has no module: got {type(module).__name__}.")
            if id(module) not in self._layers:
                self._layers[id(module)] = _tuner_layers(module)
            layers = self._layers[id(module)]
            if adapter is not None:
                if not any(adapter in _layer_adapters(layer) for layer in layers):
                    available = sorted(set().union(*(_layer_adapters(layer) for layer in layers)))
                    raise ValueError(
                        f"`experts[{phase}]` names adapter {adapter!r}, which its module does not have; "
                        f"available adapters: {available}."
                    )
                if any(layer.merged for layer in layers):
                    raise ValueError(
                        f"`experts[{phase}]`: the module has fused (merged) LoRA weights; experts must stay unfused. "
                        "Call `unfuse_lora()` first."
                    )
            self.experts.append((module, adapter))
        self._state: dict[int, str | None] = {}
        self._current: tuple[int, str | None] | None = None
        self.num_swaps = 0
        self._merged: dict[int, object] = {}
        if mode in ("resident", "delta"):
            self._merge_experts()

    def _merge_experts(self) -> None:
        from .lora_delta import DeltaExperts, ResidentExperts, cast_adapters_, lora_linear_layers

        by_module: dict[int, tuple[torch.nn.Module, list]] = {}
        for module, adapter in self.experts:
            entry = by_module.setdefault(id(module), (module, []))
            if adapter not in entry[1]:
                entry[1].append(adapter)  # phase order: consecutive phases are neighbours on the delta path
        for key, (module, adapters) in by_module.items():
            names = [a for a in adapters if a is not None]
            if not names:
                continue
            layers = lora_linear_layers(module, names)
            cast_adapters_(layers, next(module.parameters()).dtype, names)
            if self.mode == "resident":
                self._merged[key] = ResidentExperts(layers, names, keep_base=None in adapters)
            else:
                self._merged[key] = DeltaExperts(layers, names)

    def release(self) -> None:
        """Undo a merging mode: base weights back in the layers, the unfused LoRA forward on again."""
        for engine in self._merged.values():
            engine.release() if hasattr(engine, "release") else engine.restore()
        self._merged.clear()
        self.reset()

    @property
    def num_phases(self) -> int:
        return len(self.experts)

    @property
    def num_lora_layers(self) -> int:
        """Number of peft layers over all expert modules (the work of one swap is at most this)."""
        return sum(len(layers) for layers in self._layers.values())

    def _apply(self, module: torch.nn.Module, adapter: str | None) -> None:
        if id(module) in self._merged:
            self._merged[id(module)].activate(adapter)
            return
        if self.mode == "peft":
            if adapter is None:
                module.disable_lora()
            else:
                module.enable_lora()
                module.set_adapter(adapter)
            return
        set_active_adapter_(self._layers[id(module)], adapter)

    def activate(self, phase: int) -> torch.nn.Module:
        """Make the expert of `phase` current and return the module to call."""
        if isinstance(phase, bool) or not isinstance(phase, int) or not 0 <= phase < len(self.experts):
            raise ValueError(f"`phase` must be an int in [0, {len(self.experts) - 1}], got {phase!r}.")
        module, adapter = self.experts[phase]
        key = (id(module), adapter)
        if key == self._current:
            return module
        if self._current is not None:
            self.num_swaps += 1
        if (self._layers[id(module)] or id(module) in self._merged) and self._state.get(id(module), ...) != adapter:
            self._apply(module, adapter)
            self._state[id(module)] = adapter
        self._current = key
        return module

    def reset(self) -> None:
        """Forget the current expert and the adapter state set on the modules, and set `num_swaps` to 0.

        The next [`~ExpertSwitcher.activate`] sets the adapter state again, so adapters changed from outside
        (e.g. by `set_adapters`) between calls are overridden.
        """
        self._state.clear()
        self._current = None
        self.num_swaps = 0
