"""The flags resolved once into `Settings` / `Recipe` (training/settings.py)."""

import dataclasses

import pytest

from diffusers_pdmd.training.cli import build_parser
from diffusers_pdmd.training.settings import Recipe, Settings, resolve


REQUIRED = ["--pretrained_model_name_or_path", "x", "--prompts", "p"]


def _settings(*extra, video=False):
    return resolve(build_parser("t", video=video).parse_args([*REQUIRED, *extra]))


def test_resolved_defaults():
    s = _settings()
    assert s.recipe.learning_rate == 5e-5 and s.recipe.fake_learning_rate == 5e-5  # LoRA fake: the expert's LR
    assert _settings("--fake_full_finetune").recipe.fake_learning_rate == 4e-7  # the paper's full-parameter fake
    assert _settings("--fake_full_finetune", "--fake_learning_rate", "1e-6").recipe.fake_learning_rate == 1e-6
    assert s.fake_lora_rank == s.lora_rank == 64 and _settings("--fake_lora_rank", "8").fake_lora_rank == 8
    assert s.recipe.guidance_scale_2 is None and s.validation_prompts == [] and s.image is None
    assert s.recipe.needs_negative and not _settings("--guidance_scale", "1").recipe.needs_negative
    assert _settings("--guidance_scale", "1", "--guidance_scale_2", "3", video=True).recipe.needs_negative


def test_sizes_are_parsed_once():
    assert _settings().sizes == [(1024, 1024, None)] and not _settings().video
    assert _settings("--resolutions", "928x1664", "64x32").sizes == [(928, 1664, None), (64, 32, None)]
    video = _settings("--resolutions", "81x480x832", video=True)
    assert video.video and video.sizes == [(480, 832, 81)]
    assert _settings(video=True).sizes == [(480, 832, 81)]


def test_every_field_is_a_flag_or_resolved():
    """A field named as no flag would silently read nothing: each field of the two is a flag of the Wan2.2 parser
    (the larger one), or one of the values `resolve` works out."""
    flags = {a.dest for a in build_parser("t", video=True)._actions}
    resolved = {"recipe", "flags", "video", "sizes", "fake_lora_rank", "fake_on_real"}
    for cls in (Settings, Recipe):
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in flags | resolved]
        assert missing == [], cls.__name__


def test_settings_are_plain_frozen_values():
    s = _settings("--hub_token", "hf_secret")
    assert resolve(s) is s
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.recipe.learning_rate = 1.0
    assert "hf_secret" not in repr(s)  # a logged or printed Settings never shows the token
