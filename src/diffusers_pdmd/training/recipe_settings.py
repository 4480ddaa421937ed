"""The recipe's settings, torch-free (the scripts' `--help` imports no torch): the preset ([`resolve_recipe`],
[`add_recipe_args`]) and the families' standard negative prompts. The math of each part is in [`recipe`](recipe.py),
which re-exports these names.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, fields


# ----------------------------------------------------------------------------------------------------------------
# 5. The teacher's negative prompt
# ----------------------------------------------------------------------------------------------------------------

# Wan's `sample_neg_prompt` (Wan-Video/Wan2.2, wan/configs/shared_config.py), also the default of their sampler and
# of the authors' trainer.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# Qwen-Image's model card and diffusers' QwenImage examples: a single space (true CFG with an "empty" prompt).
QWEN_IMAGE_NEGATIVE_PROMPT = " "
NEGATIVE_PROMPTS = {
    "qwen-image": QWEN_IMAGE_NEGATIVE_PROMPT,
    "wan2.2-t2v-a14b": WAN_NEGATIVE_PROMPT,
    "wan2.2-i2v-a14b": WAN_NEGATIVE_PROMPT,
    "wan2.2-ti2v-5b": WAN_NEGATIVE_PROMPT,
}
# Teacher CFG of their Wan2.2 T2V-A14B config (`guidance_distill`), on both experts.
LIGHTX2V_GUIDANCE = {"guidance_scale": 4.0, "guidance_scale_2": 4.0}


def default_negative_prompt(family: str) -> str:
    """The family's standard negative prompt for the teacher's classifier-free guidance."""
    if family not in NEGATIVE_PROMPTS:
        raise ValueError(f"`family` must be one of {sorted(NEGATIVE_PROMPTS)}, got {family!r}.")
    return NEGATIVE_PROMPTS[family]


# ----------------------------------------------------------------------------------------------------------------
# 7. The preset
# ----------------------------------------------------------------------------------------------------------------

RECIPES = ("paper", "lightx2v")
WAN_FAMILIES = ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b")


@dataclass(frozen=True)
class RecipeSettings:
    """The resolved recipe: plain values the training steps read (see [`resolve_recipe`]).

    Args:
        recipe (`str`): The preset the values started from.
        diversity_weight (`float`): Weight of [`diversity_loss`] in phase 0; 0 is off.
        diversity_teacher_steps, diversity_anchor_step (`int`): [`teacher_grid`]'s `N` and [`teacher_anchor`]'s `a`;
            `a = None`: the student's second sigma ([`anchor_step_for`]; their 10 of 40 at shift 7).
        ida_decay (`float`): [`ida_update`]'s `d`; 1 is off.
        random_exit (`bool`): Train a random step of the phase ([`sample_exit_step`]) instead of its last.
        t_margin, t_lowest, t_highest (`float`): [`margin_t_bounds`]; `(0, 0, 1)` is the paper's `(s, 1]`.
        fake_real_weight (`float`): Weight of the fake-on-real DMD term (active only with real data).
        fake_real_sigmas (`list[float]` or `None`): Fixed real-data sigma per phase; `None`: [`real_sigmas_lightx2v`].
        phase_order (`str`): `"sequential"` or `"alternate"`.
        negative_prompt (`str`): The teacher's negative prompt.
        guidance_scale, guidance_scale_2 (`float` or `None`): Teacher CFG (high-/low-noise expert).
        shift (`float` or `None`): Time shift of the student grid; `None` keeps the teacher scheduler's.
        steps_per_phase (`list[int]` or `None`): `None` keeps the trainer's.
    """

    recipe: str = "paper"
    diversity_weight: float = 0.0
    diversity_teacher_steps: int = 40
    diversity_anchor_step: int | None = None
    ida_decay: float = 1.0
    random_exit: bool = False
    t_margin: float = 0.0
    t_lowest: float = 0.0
    t_highest: float = 1.0
    fake_real_weight: float = 0.1
    fake_real_sigmas: list | None = None
    phase_order: str = "sequential"
    negative_prompt: str = ""
    guidance_scale: float | None = 4.0
    guidance_scale_2: float | None = None
    shift: float | None = None
    steps_per_phase: list | None = None


RECIPE_FIELDS = tuple(f.name for f in fields(RecipeSettings) if f.name != "recipe")


def recipe_defaults(recipe: str, family: str | None = None) -> dict:
    """The preset's values. `"paper"`: this library's defaults (the paper's algorithm). `"lightx2v"`: the choices
    of the authors' Wan2.2 T2V-A14B config that this library supports (full-parameter generators, lr 2e-6 and 4,000
    iterations are not among them)."""
    if recipe not in RECIPES:
        raise ValueError(f"`recipe` must be one of {list(RECIPES)}, got {recipe!r}.")
    if recipe == "paper":
        return {}
    out = {
        "diversity_weight": 0.05,
        "ida_decay": 0.97,
        "random_exit": True,
        "t_margin": 0.02,
        "t_lowest": 0.02,
        "t_highest": 0.98,
        "phase_order": "alternate",
        **LIGHTX2V_GUIDANCE,
    }
    if family in NEGATIVE_PROMPTS:
        out["negative_prompt"] = default_negative_prompt(family)
    if family in WAN_FAMILIES:
        out.update(shift=7.0, steps_per_phase=[2, 2])
    return out


def check_recipe(settings: RecipeSettings) -> None:
    """Raise `ValueError` naming the bad setting and its allowed values."""
    s = settings
    if not s.diversity_weight >= 0:
        raise ValueError(f"`diversity_weight` must be >= 0, got {s.diversity_weight!r}.")
    if s.diversity_teacher_steps < 1:
        raise ValueError(f"`diversity_teacher_steps` must be >= 1, got {s.diversity_teacher_steps!r}.")
    if s.diversity_anchor_step is not None and not 1 <= s.diversity_anchor_step <= s.diversity_teacher_steps:
        raise ValueError(
            f"`diversity_anchor_step` must be in [1, diversity_teacher_steps = {s.diversity_teacher_steps}], "
            f"got {s.diversity_anchor_step!r}."
        )
    if not 0.0 < s.ida_decay <= 1.0:
        raise ValueError(f"`ida_decay` must be in (0, 1] (1 is off), got {s.ida_decay!r}.")
    if not (0.0 <= s.t_margin < 1.0 and 0.0 <= s.t_lowest < s.t_highest <= 1.0):
        raise ValueError(
            "need `t_margin` in [0, 1) and 0 <= `t_lowest` < `t_highest` <= 1, got "
            f"{s.t_margin!r}, {s.t_lowest!r}, {s.t_highest!r}."
        )
    if not s.fake_real_weight >= 0:
        raise ValueError(f"`fake_real_weight` must be >= 0, got {s.fake_real_weight!r}.")
    if s.fake_real_sigmas is not None and any(not 0.0 < x <= 1.0 for x in s.fake_real_sigmas):
        raise ValueError(f"`fake_real_sigmas` must lie in (0, 1], got {s.fake_real_sigmas!r}.")
    if s.phase_order not in ("sequential", "alternate"):
        raise ValueError(f"`phase_order` must be one of ['sequential', 'alternate'], got {s.phase_order!r}.")


def resolve_recipe(recipe: str = "paper", family: str | None = None, explicit: dict | None = None) -> RecipeSettings:
    """The recipe's settings: [`RecipeSettings`]'s defaults, then the preset's ([`recipe_defaults`]), then every
    `explicit` value (the flags the user passed), which always win.

    Example: `resolve_recipe("lightx2v", "qwen-image", {"ida_decay": 1.0})` is their recipe without IDA.
    """
    explicit = dict(explicit or {})
    unknown = sorted(set(explicit) - set(RECIPE_FIELDS))
    if unknown:
        raise ValueError(f"`explicit` has unknown settings {unknown}; allowed: {list(RECIPE_FIELDS)}.")
    settings = RecipeSettings(recipe=recipe, **{**recipe_defaults(recipe, family), **explicit})
    check_recipe(settings)
    return settings


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The destinations of the flags present on the command line `argv` (parsed again with no defaults)."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(namespace))


def resolve_recipe_args(args: argparse.Namespace, explicit: set[str], family: str | None = None) -> RecipeSettings:
    """[`resolve_recipe`] from parsed flags: `args.recipe`, and each recipe setting whose flag is in `explicit`
    (from [`explicit_flags`]) or, for the flags [`add_recipe_args`] adds (default `None`), not `None`."""
    given = {}
    for name in RECIPE_FIELDS:
        if hasattr(args, name) and (
            name in explicit or (name in RECIPE_ONLY_FLAGS and getattr(args, name) is not None)
        ):
            given[name] = getattr(args, name)
    return resolve_recipe(args.recipe, family, given)


RECIPE_ONLY_FLAGS = (
    "diversity_weight",
    "diversity_teacher_steps",
    "diversity_anchor_step",
    "ida_decay",
    "random_exit",
    "t_margin",
    "t_lowest",
    "t_highest",
    "fake_real_weight",
    "fake_real_sigmas",
    "shift",
)


def add_recipe_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add `--recipe` and the recipe's own flags (each default `None`: the preset decides) as one argument group.

    `--phase_order`, `--negative_prompt`, `--guidance_scale(_2)` and `--steps_per_phase` stay the trainer's own
    flags; [`resolve_recipe_args`] lets the preset set them unless they are on the command line.
    """
    g = parser.add_argument_group("recipe", "The training recipe (docs/method.md, 'The authors' recipe').")
    a = g.add_argument
    a(
        "--recipe",
        default="paper",
        choices=RECIPES,
        help="paper: the paper's algorithm; lightx2v: the authors' 2026 "
        "trainer's choices (diversity loss, IDA, random exit, t margin, alternate phases, CFG 4 / 4, the family's "
        "negative prompt, Wan: shift 7 with 2 + 2 steps). Each flag below still overrides the preset.",
    )
    a("--diversity_weight", type=float, default=None, help="Phase-0 diversity loss weight (lightx2v 0.05; 0 off).")
    a("--diversity_teacher_steps", type=int, default=None, help="Teacher Euler steps of its grid (40).")
    a(
        "--diversity_anchor_step",
        type=int,
        default=None,
        help="Teacher step of the anchor sigma_a (default: the student's second sigma; their 10).",
    )
    a("--ida_decay", type=float, default=None, help="IDA: fake <- d fake + (1 - d) generator (lightx2v 0.97; 1 off).")
    a("--random_exit", action="store_const", const=True, default=None, help="Train a random step of the phase.")
    a("--no_random_exit", dest="random_exit", action="store_const", const=False, help="Train the phase's last step.")
    a("--t_margin", type=float, default=None, help="Margin above s, unshifted scale (lightx2v 0.02 = 20 raw steps).")
    a("--t_lowest", type=float, default=None, help="Lowest unshifted t of the losses (lightx2v 0.02).")
    a("--t_highest", type=float, default=None, help="Highest unshifted t of the losses (lightx2v 0.98).")
    a(
        "--shift",
        type=float,
        default=None,
        help="Time shift of the student's sigma grid and the losses' t (lightx2v on Wan: 7; default: the teacher "
        "scheduler's, Qwen-Image's resolution-dependent one).",
    )
    a(
        "--real_data",
        default=None,
        help="Fake-on-real (opt-in, off in both presets): a folder of images (or .pt latents) with .txt captions of "
        "the same name, or a datasets name / save_to_disk path (--real_image_column, --real_caption_column). Encoded "
        "once at the training size (cached in OUTPUT_DIR/real_data_cache); a second fake score per phase learns the "
        "student's one-step outputs from them, and the generator adds its DMD term. Wan: an image is one frame "
        "(train with --num_frames 1, or give encoded videos as .pt). One training size; not with --image.",
    )
    a("--real_image_column", default="image", help="Image column of a --real_data dataset.")
    a("--real_caption_column", default="caption", help="Caption column of a --real_data dataset.")
    a("--fake_real_weight", type=float, default=None, help="Weight of the fake-on-real DMD term (their 0.1).")
    a(
        "--fake_real_sigmas",
        type=float,
        nargs="+",
        default=None,
        help="Fixed sigma per phase the real latents are noised to (default: their choice on the run's grid, "
        "phase 0's second sigma and later phases' first); each in (s, 1], s the end of its phase.",
    )
    return g
