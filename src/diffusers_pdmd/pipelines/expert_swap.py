# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""Activating one phase expert at a time."""

from __future__ import annotations

import contextlib
import copy
import os
import types

import torch

from .lora_delta import set_active_adapter_


MODES = ("auto", "adapter", "resident", "delta", "peft")
# `auto` keeps this fraction of the device's total memory free for activations, the VAE decode and the allocator.
RESIDENT_MARGIN_FRACTION = 0.1


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


def device_memory(device: torch.device | str | None) -> tuple[int, int]:
    """`(free, total)` bytes of `device` (CUDA / XPU / MPS where torch reports it; the host's RAM for the CPU)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)
    if device.type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.xpu.mem_get_info(device)
    try:
        import psutil

        memory = psutil.virtual_memory()
        return memory.available, memory.total
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * size, pages * size


def _is_offloaded(module: torch.nn.Module) -> bool:
    """Whether diffusers / accelerate move `module`'s weights at forward time (CPU or group offloading)."""
    if getattr(module, "_hf_hook", None) is not None:
        return True
    return any(getattr(m, "_diffusers_hook", None) is not None and _has_offload_hook(m) for m in module.modules())


def _has_offload_hook(module: torch.nn.Module) -> bool:
    registry = module._diffusers_hook
    return any("offload" in name for name in getattr(registry, "hooks", {}))


def resident_extra_bytes(experts: list[tuple[torch.nn.Module, str | None]]) -> int:
    """Device memory that `mode="resident"` adds: per module, one copy of the adapted weights per LoRA expert,
    minus the one that reuses the base's storage when no phase uses the module without adapter (the base then
    waits in host memory)."""
    from .lora_delta import lora_linear_layers

    total = 0
    for module, adapters in _by_module(experts).values():
        names = [a for a in adapters if a is not None]
        if not names:
            continue
        layers = lora_linear_layers(module, names)
        per_copy = sum(layer.get_base_layer().weight.nbytes for layer in layers)
        total += per_copy * (len(names) - (0 if None in adapters else 1))
    return total


def choose_swap_mode(
    experts: list[tuple[torch.nn.Module, str | None]],
    free_bytes: int | None = None,
    total_bytes: int | None = None,
    margin_fraction: float = RESIDENT_MARGIN_FRACTION,
) -> tuple[str, str]:
    """The mode `"auto"` resolves to, and why.

    - `"adapter"` where merging is impossible or does not pay: a LoRA layer whose base is not a plain floating point
      `Linear` of at least 16 bits on a real device (quantized, fp8 layerwise-casting storage), a LoRA variant such
      as DoRA, or a module that diffusers / accelerate offload (model, sequential or group offloading: the weights
      move at each forward, merged copies would not, and an in-place merge would run on the host);
    - `"resident"` where the resident copies ([`resident_extra_bytes`]) fit in the budget
      `free_bytes - margin_fraction * total_bytes`; also without any LoRA expert (nothing to merge, nothing to swap);
    - `"resident+delta"` where only part of them fit: resident copies for the adapted layers that fit in the budget
      (in module order), in-place deltas for the rest, so a swap moves only the rest through memory;
    - `"delta"` where the budget is not positive.

    Args:
        experts: As for [`ExpertSwitcher`].
        free_bytes (`int`, *optional*), total_bytes (`int`, *optional*): The device's free and total memory
            (default: [`device_memory`] of the first expert module's device).
        margin_fraction (`float`): Fraction of `total_bytes` kept free.
    """
    from .lora_delta import is_mergeable, lora_linear_layers

    grouped = [(m, [a for a in adapters if a is not None]) for m, adapters in _by_module(experts).values()]
    grouped = [(m, names) for m, names in grouped if names]
    if not grouped:
        return "resident", "no LoRA experts"
    if any(_is_offloaded(module) for module, _ in grouped):
        return "adapter", "the transformer is offloaded (its weights move at each forward)"
    for module, names in grouped:
        try:
            layers = lora_linear_layers(module, names)
        except ValueError as err:
            return "adapter", f"the LoRA experts cannot be merged ({err})"
        if not all(is_mergeable(layer, names) for layer in layers):
            return "adapter", "some adapted layers cannot take a merged weight (quantized, fp8 or offloaded base)"
    if free_bytes is None or total_bytes is None:
        free_bytes, total_bytes = device_memory(next(grouped[0][0].parameters()).device)
    need = resident_extra_bytes(experts)
    margin = int(margin_fraction * total_bytes)
    gib = 2**30
    figures = f"{need / gib:.2f} GiB of merged copies, {free_bytes / gib:.2f} GiB free, margin {margin / gib:.2f} GiB"
    if need <= free_bytes - margin:
        return "resident", f"the merged copies fit ({figures})"
    if free_bytes - margin > 0:
        return "resident+delta", f"part of the merged copies fit ({figures})"
    return "delta", f"the merged copies do not fit ({figures})"


def _resident_prefix(layers: list, copies: int, budget: float) -> tuple[int, int]:
    """How many of `layers`, from the first, have room for `copies` merged copies each in `budget` bytes, and the
    bytes they take."""
    used = 0
    for k, layer in enumerate(layers):
        cost = layer.get_base_layer().weight.nbytes * copies
        if used + cost > budget:
            return k, used
        used += cost
    return len(layers), used


# The peft / diffusers adapter methods of a transformer. While a switcher holds the module merged (peft wrappers out
# of their slots, expert weights in the base weights), each of them first releases it, so they see the module as it
# was: `transformer.set_adapter(...)`, `save_lora_adapter`, `save_pretrained`, ... work after a pipeline call.
ADAPTER_METHODS = (
    "add_adapter",
    "set_adapter",
    "set_adapters",
    "active_adapters",
    "enable_adapters",
    "disable_adapters",
    "enable_lora",
    "disable_lora",
    "delete_adapters",
    "fuse_lora",
    "unfuse_lora",
    "unload_lora",
    "load_lora_adapter",
    "save_lora_adapter",
    "get_adapter_state_dict",
    "enable_lora_hotswap",
    "save_pretrained",
)
_OWNER = "_phased_dmd_merged_by"


def release_module(module: torch.nn.Module) -> None:
    """Release the merged experts of the [`ExpertSwitcher`] that holds `module` merged, if any (e.g. another
    pipeline over the same modules); a no-op otherwise."""
    owner = module.__dict__.get(_OWNER)
    if owner is not None:
        owner.release()


def _guard(module: torch.nn.Module, owner: ExpertSwitcher) -> None:
    """Mark `module` as held merged by `owner`, and shadow each of its `ADAPTER_METHODS` with one that releases the
    owner (which removes the shadows) before calling the real method. The shadows are methods bound to `module`
    that find the owner through the mark, so a deep copy of the module stays consistent with itself."""
    module.__dict__[_OWNER] = owner
    for name in ADAPTER_METHODS:
        if callable(getattr(type(module), name, None)) and name not in module.__dict__:
            module.__dict__[name] = types.MethodType(_released_first(name), module)


def _released_first(name: str):
    def method(self, *args, **kwargs):
        release_module(self)
        return getattr(type(self), name)(self, *args, **kwargs)

    method._phased_dmd_guard = True
    return method


def _unguard(module: torch.nn.Module) -> None:
    module.__dict__.pop(_OWNER, None)
    for name in ADAPTER_METHODS:
        if getattr(module.__dict__.get(name), "_phased_dmd_guard", False):
            del module.__dict__[name]


class _SplitExperts:
    """Resident copies for some layers, in-place deltas for the others, swapped together."""

    def __init__(self, engines: list):
        self.engines = engines

    def activate(self, adapter: str | None) -> None:
        for engine in self.engines:
            engine.activate(adapter)

    def release(self) -> None:
        for engine in self.engines:
            engine.release() if hasattr(engine, "release") else engine.restore()


def _first_device(experts) -> torch.device:
    return next(experts[0][0].parameters()).device


def _by_module(experts) -> dict[int, tuple[torch.nn.Module, list]]:
    by_module: dict[int, tuple[torch.nn.Module, list]] = {}
    for module, adapter in experts:
        entry = by_module.setdefault(id(module), (module, []))
        if adapter not in entry[1]:
            entry[1].append(adapter)  # phase order: consecutive phases are neighbours on the delta path
    return by_module


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
      re-points each adapted layer's weight (no GPU work). Costs one device copy of the adapted weights per LoRA
      expert beyond the first, whose copy reuses the base's storage while the base waits in host memory (+25.3 GiB
      for two Qwen-Image experts); a phase that uses the base keeps it on the device instead (one copy more).
    - `mode="delta"`: the experts are merged in place into the shared weights; a swap is one fused `addmm_` per
      layer applying the difference of two experts (25 ms for Qwen-Image, +6.7% per image at batch 1, +1.5% at
      batch 4), with no extra copy of any weight and bounded bf16 drift ([`~lora_delta.DeltaExperts`]).

    While merged, each adapted layer runs exactly its base `Linear`: the peft wrapper is taken out of its parent's
    slot ([`~lora_delta.UnwrappedLayers`]), so a forward does no peft work, no cast and no branch, and a compiled
    transformer sees plain `Linear`s whose weights change in place (delta) or by pointer (resident), which does not
    recompile. [`~ExpertSwitcher.release`] undoes all this: the wrappers back in their slots, the base weights back
    (bitwise: resident keeps them, on the device if a phase uses the base, else in host memory; delta walks back
    along the same fp32 products, within the bf16 rounding bound of [`~lora_delta.DeltaExperts`]), the LoRA forward
    on, and the adapters untouched.

    `mode="auto"` picks one of these by the rule of [`choose_swap_mode`]: resident when the merged copies fit in
    free device memory with a margin of `RESIDENT_MARGIN_FRACTION` of the device's memory, resident copies for the
    layers that fit and deltas for the others (`"resident+delta"`) when part of them fit, else delta; adapter where
    merging is impossible. The resolved mode is `switcher.mode`, the reason `switcher.mode_reason`.

    `mode="peft"` swaps with diffusers' `set_adapter` / `disable_lora` instead (the full-model walk); it exists as a
    reference to compare against.

    The user's own LoRAs (`user_adapters`, e.g. a style LoRA loaded with the pipeline's `load_lora_weights`) run
    together with whichever expert is active, at the weight their peft scaling holds: in the unfused modes each
    swap makes `[expert, *user_adapters]` the active adapters; in the merging modes a layer that holds one of them
    keeps its peft wrapper, running the user's LoRA unfused on top of the merged expert weights.

    While a merging mode holds a module merged, the module is marked as held (a new switcher over it, e.g. of a
    second pipeline sharing the module, releases this one first) and its peft / diffusers adapter methods
    (`ADAPTER_METHODS`: `set_adapter`, `save_lora_adapter`, `save_pretrained`, ...) release it before they run, so
    the module stays usable through those APIs after a pipeline call.

    Args:
        experts (`list[tuple[torch.nn.Module, str | None]]`): `experts[k]` is the expert of phase `k`.
        mode (`str`, defaults to `"adapter"`): `"auto"`, `"adapter"`, `"resident"`, `"delta"` or `"peft"`.
        memory (`tuple[int, int]`, *optional*): `(free, total)` device bytes for `"auto"` (default: measured).
        user_adapters (`list[tuple[torch.nn.Module, list[str]]]`, *optional*): Per expert module, LoRA adapters
            (not experts) to run together with every expert of that module.

    Attributes:
        num_swaps (`int`): Number of times the active expert changed since construction or the last
            [`~ExpertSwitcher.reset`]; the first activation is not a swap.
    """

    def __init__(
        self,
        experts: list[tuple[torch.nn.Module, str | None]],
        mode: str = "adapter",
        memory: tuple[int, int] | None = None,
        user_adapters: list[tuple[torch.nn.Module, list[str]]] | None = None,
    ):
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
                release_module(module)  # held merged by another switcher (another pipeline over the same modules)
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
        self._extra = self._check_user_adapters(user_adapters or [])
        self._saved: dict[int, list] = {key: _adapter_state(layers) for key, layers in self._layers.items()}
        self.released = False
        self._state: dict[int, str | None] = {}
        self._current: tuple[int, str | None] | None = None
        self.num_swaps = 0
        self.requested_mode = mode
        self.mode_reason = "requested"
        self._budget = None
        if mode == "auto":
            free, total = memory if memory is not None else device_memory(_first_device(self.experts))
            self.mode, self.mode_reason = choose_swap_mode(self.experts, free, total)
            self._budget = free - int(RESIDENT_MARGIN_FRACTION * total)
        self._merged: dict[int, object] = {}
        self._unwrapped: dict[int, object] = {}
        if self.mode in ("resident", "delta", "resident+delta"):
            try:
                self._merge_experts()
            except torch.OutOfMemoryError:
                self.release()
                if not (mode == "auto" and self.mode in ("resident", "resident+delta")):
                    raise
                self.mode, self.mode_reason = "delta", f"{self.mode_reason}, but the copies ran out of memory"
                self.released = False
                self._merge_experts()

    def __deepcopy__(self, memo):
        """A copy over the copied modules (a deep copy of a merged transformer copies its switcher through the
        mark), with the per-module state re-keyed to the copies."""
        clone = copy.copy(self)
        memo[id(self)] = clone
        state = copy.deepcopy(self.__dict__, memo)
        remap = {id(old): id(new) for (old, _), (new, _) in zip(self.experts, state["experts"])}
        for name in ("_layers", "_saved", "_merged", "_unwrapped", "_extra", "_state"):
            state[name] = {remap.get(key, key): value for key, value in state[name].items()}
        if state["_current"] is not None:
            state["_current"] = (remap.get(state["_current"][0]), state["_current"][1])
        clone.__dict__.update(state)
        return clone

    def _check_user_adapters(self, user_adapters) -> dict[int, list[str]]:
        extra = {}
        for module, names in user_adapters:
            if id(module) not in self._layers:
                raise ValueError("`user_adapters` names a module that no expert uses.")
            held = set().union(*(_layer_adapters(layer) for layer in self._layers[id(module)]))
            missing = [name for name in names if name not in held]
            if missing:
                raise ValueError(f"`user_adapters`: {missing} are not adapters of their module; available: {held}.")
            extra[id(module)] = list(names)
        return extra

    def _merge_experts(self) -> None:
        from .lora_delta import DeltaExperts, ResidentExperts, UnwrappedLayers, lora_linear_layers

        for key, (module, adapters) in _by_module(self.experts).items():
            names = [a for a in adapters if a is not None]
            if not names:
                continue
            layers = lora_linear_layers(module, names)
            keep_base = None in adapters
            if self.mode == "resident":
                self._merged[key] = ResidentExperts(layers, names, keep_base=keep_base, host_base=not keep_base)
            elif self.mode == "delta":
                self._merged[key] = DeltaExperts(layers, names)
            else:  # resident copies for the layers that fit in the budget, deltas for the rest
                k, used = _resident_prefix(layers, len(names) - (0 if keep_base else 1), self._budget)
                self._budget -= used
                engines = []
                if k:
                    engines.append(ResidentExperts(layers[:k], names, keep_base=keep_base, host_base=not keep_base))
                if k < len(layers):
                    engines.append(DeltaExperts(layers[k:], names))
                self._merged[key] = _SplitExperts(engines)
            # A layer that also holds a user's LoRA keeps its peft wrapper: the user's LoRA runs unfused on top of
            # the merged expert (`_active_adapter` = the user's adapters); the others run their bare `Linear`.
            extra = self._extra.get(key, [])
            on_top = {id(layer) for layer in layers if any(name in layer.lora_A for name in extra)}
            self._unwrapped[key] = UnwrappedLayers(module, [layer for layer in layers if id(layer) not in on_top])
            unwrapped = {id(layer) for _, _, layer in self._unwrapped[key].slots}
            set_active_adapter_([layer for layer in self._layers[key] if id(layer) not in unwrapped], extra)
            _guard(module, self)

    def release(self) -> None:
        """Undo a merging mode: the peft wrappers back in their slots, the base weights back (see the class
        docstring for the rounding), and every peft layer's adapter state (`active_adapters`, disabled or not) as
        it was when the switcher was built; the adapter methods of the modules unguarded. In the unfused modes only
        the adapter state is given back. Releasing twice does nothing more."""
        if self.released:
            return
        self.released = True
        for unwrapped in self._unwrapped.values():
            unwrapped.restore()
        for engine in self._merged.values():
            engine.release() if hasattr(engine, "release") else engine.restore()
        for key in self._merged:
            _unguard(next(m for m, _ in self.experts if id(m) == key))
        for saved in self._saved.values():
            _restore_adapter_state(saved)
        self._unwrapped.clear()
        self._merged.clear()
        self.reset()

    @contextlib.contextmanager
    def sampling(self):
        """[`~ExpertSwitcher.reset`] on entry and [`~ExpertSwitcher.finish`] on exit (also on an error): one
        pipeline call's use of the experts."""
        self.reset()
        try:
            yield self
        finally:
            self.finish()

    def finish(self) -> None:
        """The end of a pipeline call: the unmerged modules' peft layers get back the adapter state they had at
        the last [`~ExpertSwitcher.reset`] (the user's, e.g. their active LoRAs); merged modules stay merged."""
        for key, saved in self._saved.items():
            if key not in self._merged:
                _restore_adapter_state(saved)
        self._state.clear()
        self._current = None

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
        names = ([] if adapter is None else [adapter]) + self._extra.get(id(module), [])
        if self.mode == "peft":
            if not names:
                module.disable_lora()
            else:
                module.enable_lora()
                module.set_adapter(names)
            return
        set_active_adapter_(self._layers[id(module)], names)

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
        (e.g. by `set_adapters`) between calls are overridden. The adapter state of the unmerged modules' peft
        layers is recorded, for [`~ExpertSwitcher.finish`] to give back.
        """
        self._state.clear()
        self._current = None
        self.num_swaps = 0
        for key, layers in self._layers.items():
            if key not in self._merged:
                self._saved[key] = _adapter_state(layers)


def _adapter_state(layers: list) -> list:
    return [(layer, copy.copy(layer._active_adapter), layer._disable_adapters) for layer in layers]


def _restore_adapter_state(saved: list) -> None:
    for layer, active, disabled in saved:
        layer._active_adapter, layer._disable_adapters = copy.copy(active), disabled
