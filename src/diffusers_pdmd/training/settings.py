"""What a run does, in plain values: the flags resolved once, after [`cli.check_args`] has checked them.

Three things describe a run:
- [`Recipe`]: the algorithm's knobs, what an update step computes (learning rates, loss weightings, how `t` is
  drawn, the teacher's guidance, batch sizes). The steps in `steps.py` are handed this and nothing else of the flags.
- [`Settings`]: everything else, grouped as the parser groups its flags: the base model, the data, the adapters,
  speed and memory, and the output folder. Field names are the flags' names, so the run-folder checks of `runs.py`
  read a `Settings` as they read the parsed flags.
- [`Plan`](plan.py): which phases are trained, their sigmas and the position of each step (needs the family, so it
  is made once the family is known).

A new flag gets a field here, named as the flag: in `Recipe` when an update step reads it, else in `Settings`. A field
named as its flag is read from it; one whose value needs resolving (a default that depends on other flags) gets its
line in [`resolve_recipe`] / [`resolve`]. The parser group that adds the flag lives in `cli.py`.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields

from .cli import PAPER_DEFAULTS, sizes


@dataclass(frozen=True)
class Recipe:
    """The algorithm's knobs (paper defaults in `cli.build_parser`)."""

    learning_rate: float
    fake_learning_rate: float  # resolved: 4e-7 with --fake_full_finetune (paper), else --learning_rate
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    max_grad_norm: float
    lr_scheduler: str
    lr_warmup_steps: int
    train_batch_size: int
    gradient_accumulation_steps: int
    fake_updates_per_step: int
    fake_reuse_samples: int
    dmd_weighting: str
    fake_weighting: str
    timestep_sampling: str
    logit_mean: float
    logit_std: float
    guidance_scale: float
    guidance_scale_2: float | None
    negative_prompt: str
    # the authors' recipe (`--recipe`, recipe.py; each default is off)
    recipe: str = "paper"
    diversity_weight: float = 0.0
    diversity_teacher_steps: int = 40
    diversity_anchor_step: int | None = None
    ida_decay: float = 1.0
    random_exit: bool = False
    t_margin: float = 0.0
    t_lowest: float = 0.0
    t_highest: float = 1.0
    shift: float | None = None
    fake_on_real: bool = False  # resolved: `--real_data` given (part 6)
    fake_real_weight: float = 0.1
    fake_real_sigmas: list[float] | None = None  # None: `recipe.real_sigmas_lightx2v` of the run's grid

    @property
    def t_margin_on(self) -> bool:
        return (self.t_margin, self.t_lowest, self.t_highest) != (0.0, 0.0, 1.0)

    @property
    def needs_negative(self) -> bool:
        """Whether the teacher runs classifier-free guidance (and so needs the negative prompt's embeddings)."""
        return self.guidance_scale != 1.0 or self.guidance_scale_2 not in (None, 1.0)


@dataclass(frozen=True)
class Settings:
    """The run's settings: everything but the recipe and the plan, under the flags' names."""

    recipe: Recipe
    flags: dict = field(repr=False)  # the flags as parsed (the tracker's and the checkpoint's record of them)
    # -- the base model
    pretrained_model_name_or_path: str
    revision: str | None
    base_model_id: str | None
    # -- what is trained (the plan, once the family is known)
    method: str
    phase_boundaries: list[float] | None
    steps_per_phase: list[int]
    train_phase: int | str
    phase_order: str
    max_train_steps: int
    # -- data
    prompts: str
    prompt_column: str
    video: bool
    sizes: list[tuple[int, int, int | None]]  # (height, width, num_frames) of each bucket
    resolutions: list[str] | None  # as given (error messages name its entries)
    image: str | None
    max_sequence_length: int
    cache_text_embeddings: bool
    # -- adapters
    lora_rank: int
    lora_alpha: float
    fake_lora_rank: int  # resolved: --lora_rank when not given
    fake_full_finetune: bool
    # -- speed and memory (new memory fields go here, named as their flags)
    mixed_precision: str | None
    gradient_checkpointing: bool
    uncheckpointed_blocks: int | None  # None: 0 unless the memory plan set it
    attention_backend: str | None
    compile: bool
    no_compile: bool
    sequential_cfg: bool
    upcast_lora_inputs: bool
    base_fp8: bool
    offload_idle_transformers: bool
    offload_activations: bool
    context_parallel_degree: int
    # -- output, checkpoints, validation, tracking, Hub
    output_dir: str
    seed: int
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    resume_from_checkpoint: str | None
    overwrite_output_dir: bool
    validation_prompts: list[str]
    validation_steps: int
    validation_seeds: int
    report_to: str
    logging_dir: str
    push_to_hub: bool
    hub_model_id: str | None
    hub_token: str | None = field(repr=False)
    # -- real data of fake-on-real (recipe part 6; off without `--real_data`)
    real_data: str | None = None
    real_image_column: str = "image"
    real_caption_column: str = "caption"


def _as_flagged(cls, args: argparse.Namespace, resolved: dict):
    """`cls` with the `resolved` values, every other field read from the flag of its name (a field with a default
    keeps it where the namespace lacks the flag: one built by hand in a test)."""
    read = {}
    for f in fields(cls):
        if f.name not in resolved and (hasattr(args, f.name) or f.default is MISSING):
            read[f.name] = getattr(args, f.name)
    return cls(**resolved, **read)


def resolve_recipe(args: argparse.Namespace) -> Recipe:
    """The [`Recipe`] of the parsed flags: a field named as its flag is read from it; the others are resolved here."""
    fake_lr = args.fake_learning_rate or (
        PAPER_DEFAULTS["fake_full_learning_rate"] if args.fake_full_finetune else args.learning_rate
    )
    resolved = {
        "fake_learning_rate": fake_lr,
        "guidance_scale_2": getattr(args, "guidance_scale_2", None),  # a flag of the Wan2.2 script only
        "fake_on_real": getattr(args, "real_data", None) is not None,
    }
    return _as_flagged(Recipe, args, resolved)


def resolve(args: argparse.Namespace | Settings) -> Settings:
    """The run's settings from the parsed (and checked) flags; a `Settings` is returned as it is.

    A field named as its flag is read from it; the others are resolved here.
    """
    if isinstance(args, Settings):
        return args
    video = hasattr(args, "num_frames")
    resolved = {
        "recipe": resolve_recipe(args),
        "flags": dict(vars(args)),
        "video": video,
        "sizes": sizes(args),
        "resolutions": args.resolutions,
        "image": args.image if video else None,
        "fake_lora_rank": args.fake_lora_rank or args.lora_rank,
        "validation_prompts": list(args.validation_prompts or []),
    }
    return _as_flagged(Settings, args, resolved)
