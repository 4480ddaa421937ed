"""Which network plays which part: the teacher, the generator experts and the fake scores on one frozen base.

Roles on one frozen copy of the base weights (per teacher transformer):
- teacher (real score): the base with adapters disabled, with classifier-free guidance; for an MoE teacher (Wan2.2
  A14B) the transformer that owns each sample's `t`;
- generator expert of phase k: LoRA adapter `phase_k` on the transformer owning most of the phase;
- fake score of phase k: LoRA adapter `fake_k` on every teacher transformer (routed by `t` like the teacher), or,
  with `--fake_full_finetune`, a trainable full copy of each teacher transformer.
- with `--real_data` (fake-on-real, recipe part 6), the second fake score of phase k, trained on the student's
  outputs from real data: LoRA adapter `fake_real_k` on every teacher transformer (the fake score's rank; a LoRA
  adapter also with `--fake_full_finetune`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging

import torch
import torch.utils.checkpoint

from ..schedulers import PhasedDMDScheduler
from . import adapters as ad
from . import checkpoint as ckpt
from . import parallel
from .data import cat_cond, cfg_batchable, select_cond
from .plan import Plan
from .settings import Settings, resolve
from .simulate import split_by_phase


logger = logging.getLogger("diffusers_pdmd.train")


class _CallThrough:
    """Calls go to the distributed wrapper (gradient sync) or the model, attributes (`config`) to the model.

    `dtype` is read once: diffusers' `ModelMixin.dtype` walks every module (thousands with LoRA layers) on each read,
    and every velocity query reads it.
    """

    def __init__(self, raw, wrapped):
        self.raw, self.wrapped = raw, wrapped
        self.dtype = raw.dtype

    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.raw, name)


def compile_wanted(args, accelerator) -> bool:
    """`--compile` forces compilation, `--no_compile` stops it; by default a one-process CUDA run compiles, unless
    `--base_fp8` (see `check_speed_args`) or `--offload_activations` (saved-tensor hooks, not measured compiled)."""
    if args.no_compile:
        return False
    if args.compile:
        return True
    if args.base_fp8 or args.offload_activations:
        return False
    return accelerator.device.type == "cuda" and accelerator.num_processes == 1


def checkpointing_func(model, uncheckpointed: int):
    """diffusers' gradient-checkpointing function for `model` (`enable_gradient_checkpointing`): its last
    `uncheckpointed` repeated blocks (`model._repeated_blocks`) run as they are and keep their activations, the
    others are recomputed in backward (`torch.utils.checkpoint`, non-reentrant, as diffusers' default)."""
    blocks = [m for m in model.modules() if type(m).__name__ in (getattr(model, "_repeated_blocks", None) or ())]
    kept = {id(m) for m in blocks[len(blocks) - min(uncheckpointed, len(blocks)) :]} if uncheckpointed else set()

    def checkpoint(block, *args):
        if id(block) in kept:
            return block(*args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    return checkpoint


class Distiller:
    """Holds the models and answers velocity queries for each role (see the module docstring)."""

    def __init__(self, settings: Settings | argparse.Namespace, accelerator, family, pipe, plan: Plan):
        args = self.settings = resolve(settings)  # tests and benchmarks hand in the parsed flags
        self.recipe, self.accelerator, self.family, self.plan = args.recipe, accelerator, family, plan
        self.device = accelerator.device
        self.components = dict(pipe.components)
        self.layout = parallel.setup(accelerator, args.context_parallel_degree, family, self.components, self.size())
        self.models = {}
        for name in (n for n in family.transformer_names if self.components.get(n) is not None):
            model = self.components[name]
            model.requires_grad_(False)
            if args.gradient_checkpointing:
                model.enable_gradient_checkpointing(checkpointing_func(model, args.uncheckpointed_blocks or 0))
            if args.attention_backend:
                model.set_attention_backend(args.attention_backend)
            self.models[name] = model
        if self.components.get("vae") is not None:
            self.components["vae"].requires_grad_(False).to(self.device)
        if self.components.get("text_encoder") is not None:
            self.components["text_encoder"].requires_grad_(False).to(self.device)

        k = plan.num_phases
        self._schedules = {}
        sigmas, self.time_shift = self.schedule(*self.size())
        self.sigmas_by_phase = sigmas
        # An expert lives on the teacher transformer that owns the middle of its phase.
        self.expert_base = [family.teacher_transformer_for_sigma(0.5 * (s[0] + s[-1])) for s in sigmas]
        targets = ad.lora_targets(family.name)
        self.fake_full = {}
        for j in range(k):
            ad.add_lora(self.models[self.expert_base[j]], f"phase_{j}", args.lora_rank, args.lora_alpha, targets)
        # peft makes adapters in the base's dtype: an expert loaded from disk stays in it, and so does a finished one
        self.stored_dtype = self.expert_params(0)[0].dtype
        fake_names = [] if args.fake_full_finetune else ["fake"]
        fake_names += ["fake_real"] if self.recipe.fake_on_real else []
        for model in self.models.values():
            for name, j in ((n, j) for n in fake_names for j in plan.phases):
                ad.add_lora(model, f"{name}_{j}", args.fake_lora_rank, args.lora_alpha, targets)
        if args.base_fp8:  # after the adapters: peft makes them in its base layer's dtype; they are skipped here
            for model in self.models.values():
                ad.store_base_in_fp8(model, compute_dtype=torch.bfloat16)
        if not args.offload_idle_transformers:  # else `start_phase` places them
            for model in self.models.values():
                model.to(self.device)
        self.switches = {n: ad.AdapterSwitch(m) for n, m in self.models.items()}
        if accelerator.mixed_precision in ("fp16", "bf16") and not args.upcast_lora_inputs:
            for switch in self.switches.values():  # autocast casts the fp32 LoRA weights per matmul instead
                ad.keep_input_dtype(switch.layers)
        if compile_wanted(args, accelerator):
            self._compile()
        # What a velocity query calls: the model itself, or its DDP / FSDP wrapper in a distributed run.
        self.callers = {n: self._wrap(m) for n, m in self.models.items()}

    def _compile(self) -> None:
        """torch.compile the repeated blocks of every transformer (see `compile_wanted`)."""
        from torch import _dynamo

        # one graph per block for each adapter (experts, fake scores, none for the teacher), grad mode and shape
        _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
        _dynamo.config.accumulated_recompile_limit = max(_dynamo.config.accumulated_recompile_limit, 1024)
        if (
            not self.settings.compile
        ):  # the default: a failure to compile falls back to eager instead of ending the run
            _dynamo.config.suppress_errors = True
        logger.info(
            "Compiling the repeated transformer blocks (torch.compile): the first update takes a minute or two "
            "longer. `--no_compile` skips it."
        )
        for model in self.models.values():
            model.compile_repeated_blocks()

    def _wrap(self, model):
        dtype = model.dtype  # of the model as loaded, before any sharding wrapper
        wrapped = parallel.wrap_model(self.accelerator, model, self.layout)  # DDP / FSDP1 / FSDP2, context parallel
        caller = _CallThrough(model, wrapped)
        caller.dtype = dtype
        return caller

    @property
    def fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def full_params(self, writeback: bool = False):
        """Context in which every (FSDP-sharded) model holds its full parameters, for reading state dicts.

        Collective under FSDP: every process must enter it. `writeback=True` shards what was loaded back on exit.
        """

        stack = contextlib.ExitStack()
        if parallel.is_fsdp2(self.accelerator):
            stack.enter_context(parallel.gathered_parameters([*self.models.values(), *self.fake_full.values()]))
        elif self.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            for caller in [*self.callers.values(), *self.fake_full.values()]:
                stack.enter_context(FSDP.summon_full_params(caller.wrapped, writeback=writeback))
        return stack

    def _optimizer_model(self, phase: int, role: str):
        if role == "gen":
            return self.callers[self.expert_base[phase]]
        full = self.settings.fake_full_finetune and role == "fake"
        models = list(self.fake_full.values()) if full else list(self.callers.values())
        if len(models) > 1:
            raise ValueError("FSDP supports one teacher transformer; train Wan2.2 A14B with DDP (`--multi_gpu`).")
        return models[0]

    def optimizer_state(self, opt, phase: int, role: str, key: str):
        """`(tensors, meta)` of an optimizer; under FSDP its full (unsharded) state (collective)."""
        if parallel.is_fsdp2(self.accelerator):
            return ckpt.flatten_optimizer(parallel.full_optimizer_state_dict(opt), key)
        if not self.fsdp:
            return ckpt.flatten_optimizer(opt.state_dict(), key)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        model = self._optimizer_model(phase, role).wrapped
        full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return ckpt.flatten_optimizer(full, key)

    def load_optimizer_state(self, opt, phase: int, role: str, tensors, meta, key: str):
        state_dict = ckpt.unflatten_optimizer(tensors, meta, key)
        if parallel.is_fsdp2(self.accelerator):
            return parallel.load_full_optimizer_state_dict(opt, state_dict)
        if not self.fsdp:
            opt.load_state_dict(state_dict)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        model = self._optimizer_model(phase, role).wrapped
        set_optimizer_state_dict(model, opt, state_dict, options=StateDictOptions(full_state_dict=True))

    # -- schedule -------------------------------------------------------------------------------------------------

    def scheduler(self) -> PhasedDMDScheduler:
        """The students' scheduler; a recipe's `shift` (lightx2v on Wan: 7) replaces the teacher scheduler's."""
        shift = self.recipe.shift
        return PhasedDMDScheduler.from_config(
            self.components["scheduler"].config,
            phase_boundaries=self.plan.boundaries,
            steps_per_phase=self.plan.steps_per_phase,
            stochastic_sampling=self.plan.method == "sgts",
            **({} if shift is None else {"shift": float(shift), "use_dynamic_shifting": False}),
        )

    def size(self):
        """The first training size `(height, width, num_frames)` (validation samples at it)."""
        return self.settings.sizes[0]

    def schedule(self, h, w, f=None) -> tuple[list[list[float]], float]:
        """`(sigmas by phase, time shift)` at a sample size: Wan's flow shift, Qwen-Image's `exp(mu)` of the size."""
        if (h, w, f) not in self._schedules:
            sched = self.scheduler()
            self.family.check_size(h, w, f)
            shape = self.family.latent_shape(self.components, 1, h, w, f)
            mu = self.family.mu(self.components, shape[1]) if sched.config.use_dynamic_shifting else None
            sched.set_timesteps(mu=mu)
            sigmas = split_by_phase(sched.sigmas.double(), self.plan.steps_per_phase, self.plan.boundaries)
            self._schedules[(h, w, f)] = (sigmas, sched._effective_shift(mu))
        return self._schedules[(h, w, f)]

    # -- trainable parameters -------------------------------------------------------------------------------------

    def adamw(self, params: list, lr: float) -> torch.optim.AdamW:
        """AdamW with the flags' betas and weight decay; the fused CUDA kernel when every parameter is a CUDA fp32
        tensor (one kernel for all tensors instead of a few per tensor; same update up to rounding)."""
        a = self.recipe
        fused = bool(params) and all(p.is_cuda and p.dtype == torch.float32 for p in params)
        return torch.optim.AdamW(
            params,
            lr=lr,
            betas=(a.adam_beta1, a.adam_beta2),
            weight_decay=a.adam_weight_decay,
            **({"fused": True} if fused else {}),
        )

    def expert_params(self, phase: int):
        return ad.adapter_parameters(self.models[self.expert_base[phase]], f"phase_{phase}")

    def fake_params(self, phase: int):
        if self.settings.fake_full_finetune:
            return [p for m in self.fake_full.values() for p in getattr(m, "raw", m).parameters() if p.requires_grad]
        return [p for m in self.models.values() for p in ad.adapter_parameters(m, f"fake_{phase}")]

    def fake_real_params(self, phase: int):
        return [p for m in self.models.values() for p in ad.adapter_parameters(m, f"fake_real_{phase}")]

    def transformers_used(self, phase: int) -> set[str]:
        """Transformers that training `phase` calls: the experts of phases 0..phase (back-simulation) and the
        teacher / fake-score transformers owning some `t` in `(s, 1]`, `s` the end of the phase."""
        used = {self.expert_base[j] for j in range(phase + 1)}
        end = float(self.sigmas_by_phase[phase][-1])
        grid = torch.linspace(end, 1.0, 257, dtype=torch.float64)[1:]
        return used | {self.family.teacher_transformer_for_sigma(float(v)) for v in grid}

    def place(self, phase: int) -> None:
        """With `--offload_idle_transformers`: the transformers `phase` uses on the device, the others on the CPU."""
        if not self.settings.offload_idle_transformers:
            return
        used = self.transformers_used(phase)
        for name in sorted(self.models, key=lambda n: n in used):  # free the device first, then fill it
            self.models[name].to(self.device if name in used else "cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def start_phase(self, phase: int) -> None:
        """Reset the fake score of `phase` to the teacher (a fresh zero-B LoRA, or a fresh full copy); so too its
        fake-on-real score."""
        self.place(phase)
        if self.settings.fake_full_finetune:
            self.fake_full = {}
            for name, model in self.models.items():
                # the frozen base never changes: a copy with adapters off is the teacher
                fake = parallel.copy_model(model)
                for layer in ad.tuner_layers(fake):
                    layer._disable_adapters = True
                for pname, p in fake.named_parameters():
                    p.requires_grad_("lora_" not in pname)
                fake.to(dtype=torch.float32)
                self.fake_full[name] = self._wrap(fake)
        else:
            for model in self.models.values():
                ad.reset_adapter(model, f"fake_{phase}")
        if self.recipe.fake_on_real:
            for model in self.models.values():
                ad.reset_adapter(model, f"fake_real_{phase}")

    def end_phase(self, phase: int) -> None:
        """Sequential order, once `phase` has ended: drop its fake score (its LoRA adapter on every transformer, or
        the full copies) and hold its expert as a later `--train_phase` run loads it from disk: frozen, in the
        base's dtype (`stored_dtype`). Idempotent. Under FSDP the sharded state is left as it is."""
        if self.fsdp:
            return
        for p in self.expert_params(phase):
            p.requires_grad_(False)
            p.grad = None
            p.data = p.data.to(self.stored_dtype)
        if self.settings.fake_full_finetune:
            self.fake_full = {}
        for name, model in self.models.items():
            for adapter in (f"fake_{phase}", f"fake_real_{phase}"):  # fake-on-real's fake score is over too
                if adapter in getattr(model, "peft_config", {}):
                    ad.delete_adapter(model, adapter)
                    self.switches[name].forget()

    # -- velocities -----------------------------------------------------------------------------------------------

    def _call(self, model, switch_name, adapter, x, t, cond):
        if switch_name is not None:
            if self.settings.offload_idle_transformers and self.models[switch_name].device != self.device:
                self.models[switch_name].to(self.device)  # outside its phase (validation at the end)
            self.switches[switch_name].set(adapter)
        offload = contextlib.nullcontext()
        if self.settings.offload_activations and torch.is_grad_enabled():
            # what backward keeps (with checkpointing: each block's inputs) waits in pinned CPU memory
            offload = torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")
        with self.accelerator.autocast(), offload:
            return self.family.velocity(model, x, t, cond).float()

    def _routed(self, x, t, cond, fn):
        if len(self.models) == 1:  # nothing to route (and no host sync reading `t`)
            return fn(next(iter(self.models)), x, t, cond)
        names = [self.family.teacher_transformer_for_sigma(float(v)) for v in t]
        if len(set(names)) == 1:
            return fn(names[0], x, t, cond)
        out = torch.empty_like(x, dtype=torch.float32)
        for name in sorted(set(names)):
            idx = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            out[idx] = fn(name, x[idx], t[idx], select_cond(cond, idx, x.shape[0]))
        return out

    def expert(self, phase: int, cond: dict):
        name = self.expert_base[phase]

        def velocity(x, t):
            return self._call(self.callers[name], name, f"phase_{phase}", x, t, cond)

        return velocity

    def teacher(self, cond: dict, neg_cond: dict | None):
        """Real score: the base (adapters off) with CFG; `neg_cond` holds one negative prompt's embeddings."""
        a, sequential = self.recipe, self.settings.sequential_cfg

        def negative(c: dict, batch: int) -> dict:
            n = dict(c)  # size / image conditioning follows the sample, the text is the negative prompt
            for key in ("prompt_embeds", "prompt_embeds_mask"):
                value = neg_cond.get(key)
                n[key] = value.expand(batch, *value.shape[1:]) if isinstance(value, torch.Tensor) else value
            return n

        def one(name, x, t, c):
            scale = a.guidance_scale
            if name == "transformer_2" and a.guidance_scale_2 is not None:
                scale = a.guidance_scale_2
            if neg_cond is None or scale == 1.0:
                return self._call(self.callers[name], name, None, x, t, c)
            n = x.shape[0]
            neg = negative(c, n)
            if sequential or not cfg_batchable(c, neg):
                v = self._call(self.callers[name], name, None, x, t, c)
                v_neg = self._call(self.callers[name], name, None, x, t, neg)
            else:  # one forward of batch 2n: the conditional rows, then the negative ones
                both = cat_cond(c, neg, n)
                v, v_neg = self._call(
                    self.callers[name], name, None, torch.cat([x, x]), torch.cat([t, t]), both
                ).split(n)
            return self.family.combine_cfg(v, v_neg, scale)

        return lambda x, t: self._routed(x, t, cond, one)

    def fake(self, phase: int, cond: dict):
        def one(name, x, t, c):
            if self.settings.fake_full_finetune:
                return self._call(self.fake_full[name], None, None, x, t, c)
            return self._call(self.callers[name], name, f"fake_{phase}", x, t, c)

        return lambda x, t: self._routed(x, t, cond, one)

    def fake_real(self, phase: int, cond: dict):
        """The fake-on-real score of `phase` (adapter `fake_real_<phase>`), routed by `t` like the fake score."""

        def one(name, x, t, c):
            return self._call(self.callers[name], name, f"fake_real_{phase}", x, t, c)

        return lambda x, t: self._routed(x, t, cond, one)
