# Copyright 2026 The diffusers-pdmd authors. Licensed under the Apache License, Version 2.0.
"""Fast swaps between LoRA phase experts that share one frozen base transformer.

Unfused LoRA costs every forward its side path (at Qwen-Image size and 1024x1024 that is tens of percent, see
`docs/benchmarks/gpu.md`), so a few-step sampler wants each expert's weights merged. Two ways to change the merged
expert between phases, both working on peft `lora.Linear` layers with their LoRA forward switched off:

- [`DeltaExperts`] (no extra memory): one in-place pass per layer, `W += s_b B_b A_b - s_a B_a A_a`, a single fused
  `addmm_` over the concatenated factors. It moves each adapted weight through memory once (read + write), the
  floor of any in-place swap.
- [`ResidentExperts`] (one extra copy of the adapted weights per expert): every expert's merged weights stay on the
  device and a swap re-points `weight.data` (no GPU work at all).

Rounding. The weights are bf16, so an in-place swap rounds. Going back and forth along one edge with exactly
negated fp32 products (the same factors, `alpha=+1` then `alpha=-1`) settles after the first round trip into a
cycle of period 2: the error stays bounded (about twice that of one bf16 merge) however many swaps are done.
Jumping between three or more experts along arbitrary edges does NOT: the rounding errors random-walk (a 3-expert
cycle `0 -> 1 -> 2 -> 0` drifts by about one bf16 ulp per element per cycle in a test with random weights).
[`DeltaExperts`] therefore orders the experts on a path `base - e_0 - e_1 - ... - e_{K-1}` and walks it edge by
edge, which keeps the reachable states finite (checked in `tests/test_lora_delta.py`); for the usual sampling
order `0 -> 1 -> ... -> K-1 -> 0` that is `2 (K - 1)` passes per image instead of `K`, and 2 for two phases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _is_lora_linear(module) -> bool:
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is only needed for LoRA experts
        return False
    return isinstance(module, LoraLinear)


def lora_linear_layers(module: torch.nn.Module, adapter_names: Sequence[str] | None = None) -> list:
    """The peft LoRA `Linear` layers of `module` that hold every one of `adapter_names` (all of them if `None`).

    Raises:
        ValueError: If a layer holds an adapter of `adapter_names` as a LoRA variant (DoRA, ...), which has no
            plain `B @ A` delta, or with a LoRA bias (`lora_B.bias`, e.g. the `.diff_b` keys of extracted LoRAs),
            which the merged modes do not carry, or if no layer matches.
    """
    layers = []
    for layer in module.modules():
        if not _is_lora_linear(layer):
            continue
        if adapter_names is not None and not all(name in layer.lora_A for name in adapter_names):
            continue
        variants = set(layer.lora_variant) & set(adapter_names or layer.lora_A.keys())
        if variants:
            raise ValueError(f"Adapters {sorted(variants)} are LoRA variants (e.g. DoRA): no plain B @ A delta.")
        biased = sorted(a for a in adapter_names or layer.lora_A.keys() if getattr(layer, "lora_bias", {}).get(a))
        if biased:
            raise ValueError(f"Adapters {biased} carry a LoRA bias (`.diff_b`): not merged, use the adapter mode.")
        layers.append(layer)
    if not layers:
        raise ValueError(f"`module` has no peft LoRA Linear layer holding adapters {adapter_names}.")
    return layers


def cast_adapters_(layers: Sequence, dtype: torch.dtype, adapter_names: Sequence[str] | None = None) -> None:
    """Cast the LoRA `A` / `B` weights of `adapter_names` (all if `None`) to `dtype`, in place.

    Adapters end up in fp32 on a bf16 base in several ways (peft's `get_peft_model` / `PeftModel.from_pretrained`
    with `autocast_adapter_dtype=True`, diffusers' `cast_training_params(..., torch.float32)` for training); an
    unfused fp32 adapter then casts every layer input to fp32 and runs its two small matmuls in fp32. Adapters in
    the base's dtype skip that.
    """
    for layer in layers:
        for name in adapter_names or list(layer.lora_A.keys()):
            layer.lora_A[name].to(dtype)
            layer.lora_B[name].to(dtype)


def set_active_adapter_(layers: Sequence, adapter_name: str | Sequence[str] | None) -> None:
    """Make `adapter_name` the only unfused adapter of `layers` (`None` or an empty list: none; a list: those
    adapters together, as the user's LoRA on top of an expert), by setting the two attributes peft's LoRA forward
    reads. Unlike peft's `set_adapter` it walks no module tree and leaves `requires_grad` alone. The attributes are
    written straight into each layer's `__dict__` (what `nn.Module.__setattr__` does for them, without its Python
    call per write: 1440 per switch on Qwen-Image's 720 layers, several switches per training update).
    """
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name or [])
    for layer in layers:
        attrs = layer.__dict__
        if not names:
            attrs["_disable_adapters"] = True
        else:
            attrs["_active_adapter"] = list(names)  # a list per layer, as peft keeps them
            attrs["_disable_adapters"] = False


def _weight(layer) -> torch.Tensor:
    return layer.get_base_layer().weight


def _scaled_factors(layer, adapter: str, sign: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    b = layer.lora_B[adapter].weight.to(torch.float32) * (sign * layer.scaling[adapter])
    return b.to(dtype), layer.lora_A[adapter].weight.to(dtype)


def delta_factors(
    layer, from_adapter: str | None, to_adapter: str | None, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Factors `(B, A)` with `B @ A = s_to B_to A_to - s_from B_from A_from` (shapes `(out, r)`, `(r, in)`).

    The scalings are folded into `B` (in fp32, then cast to `dtype`, the weight's by default). `None` on either
    side stands for the base (no adapter); returns `None` when both sides are the same.
    """
    if from_adapter == to_adapter:
        return None
    dtype = dtype or _weight(layer).dtype
    sides = ((to_adapter, 1.0), (from_adapter, -1.0))
    parts = [_scaled_factors(layer, name, sign, dtype) for name, sign in sides if name is not None]
    return torch.cat([b for b, _ in parts], dim=1), torch.cat([a for _, a in parts], dim=0)


def _addmm_weight_(layer, factors: tuple[torch.Tensor, torch.Tensor], alpha: float) -> tuple[torch.Tensor, ...]:
    """`W += alpha * B @ A` in place; returns the factors, moved to the weight's device if it moved (`to()`, model
    offloading) since they were made."""
    b, a = factors
    w = _weight(layer).data
    if b.device != w.device:
        b, a = b.to(w.device), a.to(w.device)
    if layer.fan_in_fan_out:  # weight stored (in, out)
        w.addmm_(a.T, b.T, alpha=alpha)
    else:
        w.addmm_(b, a, alpha=alpha)
    return b, a


@torch.no_grad()
def apply_expert_delta_(layers: Sequence, from_adapter: str | None, to_adapter: str | None) -> None:
    """Turn the merged expert `from_adapter` into `to_adapter` in place: `W += s_to B_to A_to - s_from B_from A_from`.

    One `addmm_` per layer over the concatenated factors (the product accumulates in fp32 and `W` is rounded once).
    `None` stands for the base. The LoRA forward of `layers` should be off (see [`set_active_adapter_`]), else the
    adapter is applied twice. This computes the factors on every call and gives no rounding guarantee for repeated
    jumps among three or more experts; [`DeltaExperts`] caches the factors and walks a path instead.
    """
    for layer in layers:
        factors = delta_factors(layer, from_adapter, to_adapter)
        if factors is not None:
            _addmm_weight_(layer, factors, 1.0)


@torch.no_grad()
def fuse_adapter_(layers: Sequence, adapter: str, scale: float = 1.0, safe: bool = False) -> list[float]:
    """Add `scale * s B A` of `adapter` into the base weight of each of `layers` that holds it (`s` its peft scaling
    now), in place: `W <- round(W + scale * s B A)`, the product in fp32. Returns the factor `scale * s` used per
    layer, for [`unfuse_adapter_`]. peft's LoRA forward is not told (its `merged` flag stays off, so the other
    adapters of the layer still run unfused): deactivate `adapter` after fusing it.

    Raises:
        ValueError: With `safe`, if a fused weight is not finite (the layers fused before it are put back).
    """
    factors = [scale * layer.scaling[adapter] if adapter in layer.lora_A else 0.0 for layer in layers]
    for k, (layer, f) in enumerate(zip(layers, factors)):
        w = _fused_weight(layer, adapter, f)
        if w is None:
            continue
        if safe and not torch.isfinite(w).all():
            unfuse_adapter_(layers[:k], adapter, factors[:k])
            raise ValueError(f"Fusing adapter {adapter!r} gives non-finite weights (`safe_fusing=True`); not fused.")
        _weight(layer).data.copy_(w)
    return factors


@torch.no_grad()
def unfuse_adapter_(layers: Sequence, adapter: str, factors: Sequence[float]) -> None:
    """Undo [`fuse_adapter_`]: subtract the same fp32 products (`factors` as it returned them)."""
    for layer, f in zip(layers, factors):
        w = _fused_weight(layer, adapter, -f)
        if w is not None:
            _weight(layer).data.copy_(w)


def _fused_weight(layer, adapter: str, factor: float) -> torch.Tensor | None:
    if not factor:
        return None
    b, a = layer.lora_B[adapter].weight.float(), layer.lora_A[adapter].weight.float()
    delta = (b @ a) * factor
    w = _weight(layer)
    return (w.float() + (delta.T if layer.fan_in_fan_out else delta)).to(w.dtype)


class DeltaExperts:
    """In-place swaps between LoRA experts merged into the shared base weights (no extra copy of any weight).

    The experts lie on a path `None (base) - adapters[0] - adapters[1] - ...`; activating an expert walks the path
    edge by edge, each edge one `addmm_` per layer with cached factors: forward along an edge adds the product,
    backward subtracts exactly the same fp32 product (`alpha=-1`). This keeps the bf16 rounding error bounded over
    any number of swaps (see the module docstring); put the experts in phase order so that consecutive phases are
    neighbours.

    On construction the layers are taken to hold the base weights (nothing merged) and their LoRA forward is
    switched off; [`~DeltaExperts.restore`] walks back to the base and switches it on again.

    Args:
        layers: peft LoRA `Linear` layers, e.g. from [`lora_linear_layers`].
        adapters (`Sequence[str]`): The experts' adapter names, in phase order.
        cache_factors (`bool`, defaults to `True`): Keep each edge's concatenated factors (about 1.5x the memory of
            the adapters); without it they are rebuilt on every swap (more kernel launches).

    Example:
        ```py
        layers = lora_linear_layers(transformer, ["phase0", "phase1"])
        swap = DeltaExperts(layers, ["phase0", "phase1"])
        swap.activate("phase0")  # merge phase 0 into the base weights
        ...  # phase-0 steps with `transformer`
        swap.activate("phase1")  # one fused pass over the adapted weights
        ```
    """

    def __init__(self, layers: Sequence, adapters: Sequence[str], cache_factors: bool = True):
        if len(adapters) == 0 or len(set(adapters)) != len(adapters) or None in adapters:
            raise ValueError(f"`adapters` must be distinct adapter names, got {list(adapters)}.")
        self.layers = list(layers)
        self.path: list[str | None] = [None, *adapters]
        for name in adapters:
            missing = [i for i, layer in enumerate(self.layers) if name not in layer.lora_A]
            if missing:
                raise ValueError(f"Adapter {name!r} is missing from {len(missing)} of the layers.")
        if any(layer.merged for layer in self.layers):
            raise ValueError("Some layers have peft-merged adapters; unmerge them first.")
        self.cache_factors = cache_factors
        self._factors: dict[int, list] = {}
        self._index = 0
        self.num_passes = 0
        set_active_adapter_(self.layers, None)

    @property
    def current(self) -> str | None:
        """The adapter merged into the weights now (`None`: the base)."""
        return self.path[self._index]

    def _edge(self, i: int) -> list:
        """Factors of the edge `path[i] -> path[i + 1]`, one `(B, A)` per layer."""
        if i in self._factors:
            return self._factors[i]
        factors = [delta_factors(layer, self.path[i], self.path[i + 1]) for layer in self.layers]
        if self.cache_factors:
            self._factors[i] = factors
        return factors

    @torch.no_grad()
    def activate(self, adapter: str | None) -> None:
        """Merge `adapter` (`None`: the base) into the weights, walking the path from the current expert."""
        if adapter not in self.path:
            raise ValueError(f"Unknown expert {adapter!r}; experts: {self.path[1:]} (or None for the base).")
        target = self.path.index(adapter)
        while self._index != target:
            step = 1 if target > self._index else -1
            edge = self._index if step == 1 else self._index - 1
            factors = self._edge(edge)
            for j, layer in enumerate(self.layers):
                factors[j] = _addmm_weight_(layer, factors[j], float(step))
            self._index += step
            self.num_passes += 1

    def restore(self) -> None:
        """Walk back to the base weights, drop the cached factors and switch the LoRA forward on again."""
        self.activate(None)
        self._factors.clear()
        for layer in self.layers:
            layer._disable_adapters = False

    def factor_bytes(self) -> int:
        """Device memory held by the cached factors."""
        return sum(t.numel() * t.element_size() for f in self._factors.values() for pair in f for t in pair)


class ResidentExperts:
    """Every expert's merged weights stay resident; a swap re-points each adapted layer's `weight.data`.

    Costs one copy of the adapted weights per expert (minus one when `keep_base=False`, where the base's storage is
    reused for the first expert and the base itself is lost) and makes a swap free of GPU work. Each merged weight
    is computed once as `round(W + s B A)` in fp32 with one rounding, as peft's merge.

    A copy follows its layer between devices: after `module.to(device)` (which moves the current weights only) the
    next swap moves the target expert's copy to the layer's device and drops the copy left on the old device.

    Args:
        layers: peft LoRA `Linear` layers, e.g. from [`lora_linear_layers`].
        adapters (`Sequence[str]`): The experts' adapter names.
        keep_base (`bool`, defaults to `True`): Keep the base weights on the device too (needed for
            `activate(None)`, e.g. a teacher that is the base without adapters).
        host_base (`bool`, defaults to `False`): With `keep_base=False`, keep a copy of the base weights in host
            memory so that [`~ResidentExperts.release`] restores them bitwise (costs host memory, not device memory).
    """

    def __init__(self, layers: Sequence, adapters: Sequence[str], keep_base: bool = True, host_base: bool = False):
        if len(adapters) == 0 or len(set(adapters)) != len(adapters) or None in adapters:
            raise ValueError(f"`adapters` must be distinct adapter names, got {list(adapters)}.")
        self.layers = list(layers)
        if any(layer.merged for layer in self.layers):
            raise ValueError("Some layers have peft-merged adapters; unmerge them first.")
        self.keep_base = keep_base
        self.weights: dict[str | None, list[torch.Tensor]] = {name: [] for name in adapters}
        self._host_base: list[torch.Tensor] | None = [] if host_base and not keep_base else None
        self._first = adapters[0]
        with torch.no_grad():
            try:
                for layer in self.layers:
                    w = _weight(layer).data
                    if self._host_base is not None:
                        self._host_base.append(w.to("cpu", copy=True))
                    for name in adapters:
                        b, a = _scaled_factors(layer, name, 1.0, torch.float32)
                        delta = (a.T @ b.T) if layer.fan_in_fan_out else (b @ a)
                        self.weights[name].append((w.float() + delta).to(w.dtype))
                    if not keep_base:  # reuse the base's storage for the first expert: one copy fewer
                        w.copy_(self.weights[adapters[0]][-1])
                        self.weights[adapters[0]][-1] = w
            except BaseException:  # out of memory half-way: put back the base weights already overwritten
                if not keep_base and self._host_base is not None:
                    for layer, base in zip(self.layers, self._host_base[: len(self.weights[adapters[0]])]):
                        _weight(layer).data.copy_(base)
                self.weights = {}
                raise
        if keep_base:
            self.weights[None] = [_weight(layer).data for layer in self.layers]
        self._current = None if keep_base else adapters[0]
        self.num_swaps = 0
        set_active_adapter_(self.layers, None)
        self.activate(self._current)

    @property
    def current(self) -> str | None:
        return self._current

    def activate(self, adapter: str | None) -> None:
        """Point every adapted layer at the merged weights of `adapter` (`None`: the base, if kept)."""
        if adapter not in self.weights:
            raise ValueError(f"Unknown or dropped expert {adapter!r}; resident: {list(self.weights)}.")
        if adapter != self._current:
            self.num_swaps += 1
        current, target = self.weights.get(self._current), self.weights[adapter]
        for i, layer in enumerate(self.layers):
            weight = _weight(layer)
            if target[i].device != weight.device:  # the module moved since: the copies follow it
                current[i] = weight.data
                target[i] = target[i].to(weight.device)
            weight.data = target[i]
        self._current = adapter

    def extra_bytes(self) -> int:
        """Device memory held beyond one set of adapted weights."""
        per_set = sum(_weight(layer).numel() * _weight(layer).element_size() for layer in self.layers)
        return per_set * (len(self.weights) - 1)

    def release(self) -> None:
        """Go back to the base weights (bitwise) and switch the LoRA forward on again; drop the copies.

        Without the base (`keep_base=False`, `host_base=False`) the weights stay merged on the first expert and the
        LoRA forward stays off.
        """
        if self.keep_base:
            self.activate(None)
        elif self._host_base is not None:
            self.activate(self._first)  # the base's own storage
            with torch.no_grad():
                for layer, w in zip(self.layers, self._host_base):
                    _weight(layer).data.copy_(w)
            self.weights = {None: [_weight(layer).data for layer in self.layers]}
            self._current, self._host_base, self.keep_base = None, None, True
        self.weights = {k: v for k, v in self.weights.items() if k == self._current}
        if self.keep_base:  # without the base the weights stay merged, and the LoRA forward must stay off
            for layer in self.layers:
                layer._disable_adapters = False


def is_mergeable(layer, adapter_names: Sequence[str] | None = None) -> bool:
    """Whether `W + s B A` can be merged into `layer`'s base weight: a plain `torch.nn.Linear` with a floating point
    weight of at least 16 bits held on a real device (not quantized, not fp8 storage of layerwise casting, not
    offloaded to the meta device), and no LoRA variant (DoRA, ...) among `adapter_names`."""
    base = layer.get_base_layer()
    w = getattr(base, "weight", None)
    if type(base) is not torch.nn.Linear or not isinstance(w, torch.Tensor) or type(w.data) is not torch.Tensor:
        return False
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16) or w.device.type == "meta":
        return False
    return not set(getattr(layer, "lora_variant", {})) & set(adapter_names or layer.lora_A.keys())


class UnwrappedLayers:
    """Puts each peft LoRA layer's `base_layer` in its parent's slot, so that a merged layer runs exactly its base
    `Linear` (no peft wrapper, no cast, no branch); [`~UnwrappedLayers.restore`] puts the wrappers back.

    Args:
        root (`torch.nn.Module`): The module holding `layers` (e.g. the transformer).
        layers: peft LoRA layers of `root`.
    """

    def __init__(self, root: torch.nn.Module, layers: Sequence):
        wanted = {id(layer) for layer in layers}
        self.slots = []
        for parent in root.modules():
            for name, child in parent._modules.items():
                if child is not None and id(child) in wanted:
                    self.slots.append((parent, name, child))
        for parent, name, layer in self.slots:
            parent._modules[name] = layer.get_base_layer()

    def restore(self) -> None:
        for parent, name, layer in self.slots:
            parent._modules[name] = layer
        self.slots = []
