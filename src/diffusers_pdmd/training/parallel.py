"""Several GPUs: FSDP through accelerate, context parallelism through diffusers.

Nothing here splits attention or shards weights by hand:

- **FSDP** is accelerate's. FSDP1 (`fsdp_version: 1`) wraps with `Accelerator.prepare_model`; FSDP2
  (`fsdp_version: 2`) with accelerate's own `fsdp2_prepare_model`, which shards the model in place (so optimizers
  built afterwards hold the sharded parameters, which is why the training run can build one per phase).
  [`gathered_parameters`], [`full_optimizer_state_dict`] and [`load_full_optimizer_state_dict`] turn FSDP2's
  `DTensor` shards into the full tensors a checkpoint holds, and back (so checkpoints resume on any number of
  processes, sharded or not).
- **Context parallelism** is diffusers' (`ContextParallelConfig`, `ModelMixin.enable_parallelism`, experimental in
  diffusers 0.42): each transformer call splits the image / video tokens over the `degree` processes of one
  context-parallel group and attention exchanges them (Ulysses all-to-all, or ring). Every process of a group runs
  the same samples; the groups are the data-parallel replicas. Gradients of one group's processes are partial sums
  over their tokens, so they are summed over the group and averaged over the groups ([`wrap_model`] sets DDP's and
  FSDP2's reduction accordingly).

Processes are laid out on one mesh `("dp", "ring", "ulysses")` of shape `(world / degree, 1, degree)`: ranks
`g * degree ... g * degree + degree - 1` form context-parallel group `g` (consecutive ranks share a host first).

What runs on the CPU (gloo): Ulysses attention forward and backward with diffusers' native (SDPA) backend, DDP and
FSDP2. Ring attention needs a backend that returns the log-sum-exp (flash-attn, `_native_cudnn`, `_native_flash`,
sage: CUDA only), and diffusers' "Ulysses anything" mode has no backward; neither is used for training here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from unittest import mock

import torch


MODES = ("ulysses", "ring")
# Attention backends of diffusers 0.42 whose context-parallel forward returns the log-sum-exp ring attention needs.
RING_BACKENDS = ("flash", "flash_hub", "flash_varlen_hub", "_flash_3_hub", "_flash_3_varlen_hub", "_native_cudnn",
                 "_native_flash", "sage", "sage_hub")  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """Where this process sits: `degree` processes per context-parallel group, `world // degree` groups."""

    world_size: int = 1
    rank: int = 0
    degree: int = 1
    mesh: object = None  # the ("dp", "ring", "ulysses") DeviceMesh when degree > 1

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: the number of different batches processed at once."""
        return self.world_size // self.degree

    @property
    def dp_rank(self) -> int:
        """This process's replica; the processes of one context-parallel group share it (and their samples)."""
        return self.rank // self.degree


def check_degree(degree: int, world_size: int, flag: str = "--context_parallel_degree") -> None:
    """`ValueError` unless `degree` is a positive divisor of the number of processes."""
    if not isinstance(degree, int) or degree < 1:
        raise ValueError(f"`{flag}` must be a positive integer, got {degree!r}.")
    if world_size % degree:
        raise ValueError(
            f"`{flag}` ({degree}) must divide the number of processes ({world_size}); allowed: "
            f"{[d for d in range(1, world_size + 1) if world_size % d == 0]}."
        )


def check_transformer(model, degree: int, tokens: int | None = None, mode: str = "ulysses", flag: str = "degree"):
    """`ValueError` unless diffusers can split `model`'s attention `degree` ways (before any weight moves).

    Ulysses gives each process `heads / degree` heads, so both the heads and the tokens must divide evenly (the
    training backward needs the even split: diffusers' "anything" variant is forward-only).
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    name = type(model).__name__
    if getattr(model, "_cp_plan", None) is None or not hasattr(model, "enable_parallelism"):
        raise ValueError(f"`{flag}` > 1: diffusers has no context-parallel plan for {name}.")
    heads = getattr(model.config, "num_attention_heads", None)
    if mode == "ulysses" and heads is not None and heads % degree:
        raise ValueError(
            f"`{flag}` ({degree}) must divide the {heads} attention heads of {name} for Ulysses attention; allowed: "
            f"{[d for d in range(1, heads + 1) if heads % d == 0]}."
        )
    if tokens is not None and tokens % degree:
        raise ValueError(
            f"`{flag}` ({degree}) must divide the {tokens} image / video tokens of one sample; change the size or "
            "the degree."
        )


def image_tokens(family, components, height, width, num_frames) -> int:
    """Tokens of one sample's latents in the transformer (what context parallelism splits)."""
    shape = family.latent_shape(components, 1, height, width, num_frames)
    if len(shape) == 3:  # packed (B, tokens, C): Qwen-Image
        return int(shape[1])
    transformer = components.get(family.transformer_names[0])
    p_t, p_h, p_w = transformer.config.patch_size
    return (shape[2] // p_t) * (shape[3] // p_h) * (shape[4] // p_w)


@contextlib.contextmanager
def _device_count_on_cpu():
    # diffusers 0.42.1 (`ModelMixin._resolve_parallel_config`) picks the device as `rank % device_count()`, which
    # divides by zero on a CPU-only torch; the device is unused by context parallelism itself.
    if torch.accelerator.device_count() > 0:
        yield
        return
    with mock.patch("torch.accelerator.device_count", return_value=1):
        yield


def make_layout(accelerator, degree: int) -> Layout:
    """Validate `degree` against the processes of `accelerator` and build the device mesh (collective)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    check_degree(degree, world)
    if degree == 1:
        return Layout(world, rank, 1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        accelerator.device.type, (world // degree, 1, degree), mesh_dim_names=("dp", "ring", "ulysses")
    )
    return Layout(world, rank, degree, mesh)


def setup(accelerator, degree: int, family, components: dict, size) -> Layout:
    """The training run's layout: checks `--context_parallel_degree` against the processes, the heads and the
    tokens of every teacher transformer (before any weight moves), then builds the mesh."""
    check_degree(degree, accelerator.num_processes)
    if degree > 1:
        tokens = image_tokens(family, components, *size)
        for name in family.transformer_names:
            if components.get(name) is not None:
                check_transformer(components[name], degree, tokens, flag="--context_parallel_degree")
    return make_layout(accelerator, degree)


def _pad_text(degree: int):
    """Forward pre-hook: pad Qwen-Image's text tokens (which diffusers splits too) to a multiple of `degree`.

    The padded tokens are masked out of attention (`encoder_hidden_states_mask`), so the output is unchanged.
    """

    def hook(module, args, kwargs):
        text = kwargs.get("encoder_hidden_states")
        if text is None or text.shape[1] % degree == 0:
            return args, kwargs
        pad = -text.shape[1] % degree
        mask = kwargs.get("encoder_hidden_states_mask")
        if mask is None:
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        kwargs["encoder_hidden_states"] = torch.nn.functional.pad(text, (0, 0, 0, pad))
        kwargs["encoder_hidden_states_mask"] = torch.nn.functional.pad(mask, (0, pad))
        return args, kwargs

    return hook


def enable_on(model, layout: Layout, mode: str = "ulysses") -> None:
    """Turn on diffusers' context parallelism for one transformer (no-op for degree 1 or if already on)."""
    if layout.degree == 1 or getattr(model, "_parallel_config", None) is not None:
        return
    from diffusers.models._modeling_parallel import ContextParallelConfig

    check_transformer(model, layout.degree, mode=mode)
    backend = _backend_name(model)
    if mode == "ring" and backend not in RING_BACKENDS:
        raise ValueError(
            f"Ring attention needs an attention backend that returns the log-sum-exp, one of {RING_BACKENDS}; "
            f"{type(model).__name__} uses {backend!r}: call `transformer.set_attention_backend(...)` first, or use "
            "mode='ulysses'."
        )
    degrees = {"ulysses_degree": layout.degree} if mode == "ulysses" else {"ring_degree": layout.degree}
    config = ContextParallelConfig(**degrees, mesh=layout.mesh["ring", "ulysses"])
    with _device_count_on_cpu():
        model.enable_parallelism(config=config)
    if type(model).__name__.startswith("QwenImage"):
        model.register_forward_pre_hook(_pad_text(layout.degree), with_kwargs=True)


def _backend_name(model) -> str:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for module in model.modules():
        backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
        if backend is not None:
            return getattr(backend, "value", str(backend))
    return _AttentionBackendRegistry.get_active_backend()[0].value


def copy_model(model):
    """`copy.deepcopy` of a transformer that may be FSDP2-sharded or have context parallelism on.

    The copy is neither: a plain deep copy would share diffusers' hook closures with the original (the copy's forward
    would run the original's weights), and FSDP2's state. [`wrap_model`] wraps the copy again. Of an FSDP2 model it
    is a fresh model with the base weights (peft adapters dropped); collective then.
    """
    import copy

    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):  # FSDP2 shards in place: build the copy from the gathered base weights
        with gathered_parameters([model], frozen=True, everywhere=True):
            state = {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items()}
        clone = type(model).from_config(model.config)
        clone.load_state_dict({k: v for k, v in state.items() if "lora_" not in k})
        return clone.to(next(iter(state.values())).device)
    config = getattr(model, "_parallel_config", None)
    if config is None or config.context_parallel_config is None:
        return copy.deepcopy(model)
    from diffusers.hooks.context_parallel import apply_context_parallel, remove_context_parallel

    processors = [m.processor for m in model.modules() if hasattr(getattr(m, "processor", None), "_parallel_config")]
    remove_context_parallel(model, model._cp_plan)
    for p in processors:
        p._parallel_config = None
    model._parallel_config = None
    try:
        clone = copy.deepcopy(model)
    finally:
        model._parallel_config = config
        for p in processors:
            p._parallel_config = config
        apply_context_parallel(model, config.context_parallel_config, model._cp_plan)
    return clone


# ----------------------------------------------------------------------------------------------------------------
# Wrapping (DDP, FSDP1, FSDP2) with the gradient reduction context parallelism needs
# ----------------------------------------------------------------------------------------------------------------


def is_fsdp2(accelerator) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


def _sum_over_group_hook(dp_size: int):
    """DDP communication hook: all-reduce the sum, divided by the data-parallel replicas only."""
    import torch.distributed as dist

    def hook(state, bucket):
        tensor = bucket.buffer().div_(dp_size)
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

    return hook


def wrap_model(accelerator, model, layout: Layout):
    """Context parallelism (if asked) then accelerate's distributed wrapper; the model itself on one process.

    Gradients are summed over a context-parallel group (each process holds its tokens' part) and averaged over the
    groups, so a run with any degree follows the loss curve of one process with the global batch.
    """
    enable_on(model, layout)
    if accelerator.num_processes == 1:
        return model
    if is_fsdp2(accelerator):
        from accelerate.utils import fsdp2_prepare_model
        from torch.distributed.fsdp import FSDPModule

        # FSDP2 needs one dtype per trainable group and cannot change it after sharding: every adapter is kept in
        # float32 from the start (an adapter trained later must not be cast after `fully_shard`).
        for name, p in model.named_parameters():
            if "lora_" in name and p.dtype != torch.float32:
                p.data = p.data.float()
        wrapped = fsdp2_prepare_model(accelerator, model)
        if layout.degree > 1:
            for m in wrapped.modules():
                if isinstance(m, FSDPModule):
                    m.set_gradient_divide_factor(float(layout.dp_size))
                    if accelerator.device.type == "cpu":  # gloo has no PREMUL_SUM: divide, then sum
                        m.set_force_sum_reduction_for_comms(True)
        return wrapped
    if layout.degree > 1 and accelerator.distributed_type.value == "FSDP":
        raise ValueError("`--context_parallel_degree` > 1 with FSDP needs `fsdp_version: 2` in the accelerate config.")
    wrapped = accelerator.prepare_model(model)
    if layout.degree > 1 and isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        wrapped.register_comm_hook(None, _sum_over_group_hook(layout.dp_size))
    return wrapped


# ----------------------------------------------------------------------------------------------------------------
# Full tensors out of FSDP2 shards (checkpoints), and back
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gathered_parameters(models, frozen: bool = False, everywhere: bool = False):
    """FSDP2's `summon_full_params` for state dicts: inside, `state_dict()` returns full tensors and
    `load_state_dict()` takes full tensors (each process keeps its shard of them).

    Collective on entry: every process must enter it. Then it gathers the trainable parameters (and the peft
    adapters, trained or not; with `frozen=True` every parameter) one at a time to the CPU, kept on the main process
    only unless `everywhere=True`: the others' `state_dict()` returns their shards, as only the main process writes.
    peft's `get_peft_model_state_dict` / `set_peft_model_state_dict` work unchanged inside, as they go through these.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor

    keep = everywhere or dist.get_rank() == 0
    full = {}

    def names(module):
        return [n for n, p in module._parameters.items() if isinstance(p, DTensor)]

    def gather(module, state_dict, prefix, local_metadata):
        for n in names(module):
            if (module, n) in full and prefix + n in state_dict:
                state_dict[prefix + n] = full[module, n]

    def shard(module, state_dict, prefix, *args):
        for n in names(module):
            value, p = state_dict.get(prefix + n), module._parameters[n]
            if value is not None and not isinstance(value, DTensor):
                value = value.to(p.device, p.dtype)
                state_dict[prefix + n] = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)

    handles = []
    try:
        for model in models:
            for m in model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
            model.state_dict()  # FSDP2's state-dict pre-hooks register the sharded parameters on every module
            for prefix, m in model.named_modules():  # the same order on every process
                for n in names(m):
                    p = m._parameters[n]
                    if frozen or p.requires_grad or "lora_" in prefix:
                        value = p.full_tensor().detach()
                        if keep:
                            full[m, n] = value if everywhere else value.cpu()
                if names(m):
                    handles.append(m._register_state_dict_hook(gather))
                    handles.append(m._register_load_state_dict_pre_hook(shard, with_module=True))
        yield
    finally:
        for h in handles:
            h.remove()
        full.clear()


def full_optimizer_state_dict(optimizer) -> dict:
    """`optimizer.state_dict()` with every FSDP2 shard gathered to the full tensor (collective)."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    state = {}
    for key in sorted(sd["state"]):  # the same order on every process
        state[key] = {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() if torch.is_tensor(v) else v
            for k, v in sd["state"][key].items()
        }
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state_dict(optimizer, state_dict: dict) -> None:
    """Inverse of [`full_optimizer_state_dict`]: shard each full state tensor like its parameter, then load."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for key, entry in state_dict["state"].items():
        p = params[int(key)]
        out = {}
        for k, v in entry.items():
            if isinstance(p, DTensor) and torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape):
                v = distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            out[k] = v
        state[key] = out
    optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------


def enable_context_parallel(pipe, degree: int | None = None, mode: str = "ulysses"):
    """Sample with `pipe` (a `PhasedMoEPipeline` or a diffusers pipeline) on several GPUs, one prompt at a time.

    Call it in every process of `torchrun --nproc_per_node N` (or `accelerate launch`), after loading the pipeline
    and its experts and before the first call; give every process the same prompt and the same seed. Each
    transformer call splits its tokens over the processes (diffusers' context parallelism, Ulysses or ring), and
    every process gets the whole output.

    Args:
        pipe: The pipeline; its `transformer` (and `transformer_2`) are parallelised.
        degree (`int`, *optional*): Processes per prompt; default all of them.
        mode (`str`): `"ulysses"` (any attention backend diffusers marks context-parallel, native SDPA included)
            or `"ring"` (needs a backend that returns the log-sum-exp, e.g. `"flash"` or `"_native_cudnn"`).

    Returns:
        [`Layout`]: this process's place (`dp_rank`: which prompt group it belongs to when `degree` < processes).

    Example:
        ```py
        # torchrun --nproc_per_node 2 sample.py
        import torch
        from diffusers_pdmd import PhasedMoEPipeline
        from diffusers_pdmd.training.parallel import enable_context_parallel

        pipe = PhasedMoEPipeline.from_pretrained("me/wan22-phased-dmd", dtype=torch.bfloat16)
        layout = enable_context_parallel(pipe)  # initialises torch.distributed and moves pipe to this GPU
        video = pipe("a fox in the snow", generator=torch.Generator().manual_seed(0)).frames[0]
        ```
    """
    import os

    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    degree = world if degree is None else degree
    check_degree(degree, world, flag="degree")
    transformers = [m for name in ("transformer", "transformer_2") if (m := getattr(pipe, name, None)) is not None]
    for m in transformers:
        check_transformer(m, degree, mode=mode)
    if degree == 1:
        return Layout(world, rank, 1)
    from torch.distributed.device_mesh import init_device_mesh

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    mesh = init_device_mesh(device.type, (world // degree, 1, degree), mesh_dim_names=("dp", "ring", "ulysses"))
    layout = Layout(world, rank, degree, mesh)
    pipe.to(device)
    for m in transformers:
        enable_on(m, layout, mode)
    return layout


__all__ = [
    "Layout",
    "check_degree",
    "check_transformer",
    "copy_model",
    "enable_context_parallel",
    "full_optimizer_state_dict",
    "gathered_parameters",
    "load_full_optimizer_state_dict",
    "make_layout",
    "wrap_model",
]
