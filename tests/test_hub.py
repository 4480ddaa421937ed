"""Experts format and Hub plumbing: config validation, LoRA / full expert files, the Hub cache, push, model card."""

import hashlib
import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, RepoUrl, constants
from peft import LoraConfig
from safetensors import safe_open

from diffusers_pdmd import PhasedDMDScheduler, hub, tiny
from diffusers_pdmd.hub import multiple_adapters
from diffusers_pdmd.pipelines import PhasedMoEPipeline


def add_lora(module, name, seed, targets=("to_q", "to_k", "to_v")):
    with torch.random.fork_rng(devices=[]), multiple_adapters():
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
        module.add_adapter(config, adapter_name=name)


def experts_config(**overrides):
    data = {
        "format_version": 1,
        "family": "wan2.2-t2v-a14b",
        "base_model": "org/base",
        "base_revision": None,
        "phase_boundaries": [0.875],
        "steps_per_phase": [2, 2],
        "method": "phased_dmd",
        "experts": [
            {"phase": 0, "base_transformer": "transformer", "type": "lora", "path": "phase_0"},
            {"phase": 1, "base_transformer": "transformer_2", "type": "lora", "path": "phase_1"},
        ],
    }
    data.update(overrides)
    return data


def test_experts_config_round_trip(tmp_path):
    config = hub.ExpertsConfig.from_dict(experts_config())
    path = config.save(tmp_path)
    assert path.name == hub.CONFIG_NAME
    assert list(json.loads(path.read_text())) == [
        "format_version",
        "family",
        "base_model",
        "base_revision",
        "phase_boundaries",
        "steps_per_phase",
        "method",
        "experts",
    ]
    assert hub.ExpertsConfig.load(tmp_path).to_dict() == experts_config()


def _expert(k, **kw):
    return {"phase": k, "base_transformer": "transformer", "type": "lora", "path": f"phase_{k}", **kw}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"format_version": 2}, "format_version"),
        ({"family": "sdxl"}, "family"),
        ({"base_model": ""}, "base_model"),
        ({"phase_boundaries": [0.5, 0.7]}, "phase_boundaries"),
        ({"phase_boundaries": [1.0]}, "phase_boundaries"),
        ({"steps_per_phase": [2]}, "steps_per_phase"),
        ({"steps_per_phase": [2, 0]}, "steps_per_phase"),
        ({"method": ""}, "method"),
        ({"experts": [_expert(0)]}, "experts"),
        ({"experts": [_expert(0), _expert(0)]}, "experts\\[1\\].phase"),
        ({"experts": [_expert(0), _expert(1, type="dora")]}, "experts\\[1\\].type"),
        ({"experts": [_expert(0), _expert(1, base_transformer="unet")]}, "experts\\[1\\].base_transformer"),
        ({"experts": [_expert(0), _expert(1, path="../../etc")]}, "experts\\[1\\].path"),
        ({"experts": [_expert(0), _expert(1, path="/abs")]}, "experts\\[1\\].path"),
        ({"experts": [_expert(0), _expert(1, type="base")]}, "experts\\[1\\].path"),
        ({"experts": [_expert(0), _expert(1, extra=1)]}, "unknown keys"),
        ({"experts": [_expert(0, type="full"), _expert(1)]}, "full"),
        ({"learning_rate": 1e-4}, "unknown field"),
    ],
)
def test_experts_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        hub.ExpertsConfig.from_dict(experts_config(**overrides))


def test_experts_config_family_specific_slots():
    qwen = experts_config(family="qwen-image")
    with pytest.raises(ValueError, match="experts\\[1\\].base_transformer"):
        hub.ExpertsConfig.from_dict(qwen)  # Qwen-Image has no transformer_2 for a LoRA
    qwen["experts"][1]["type"] = "full"  # a second fully fine-tuned transformer may use the slot
    hub.ExpertsConfig.from_dict(qwen)
    with pytest.raises(ValueError, match="missing"):
        hub.ExpertsConfig.from_dict({"family": "qwen-image"})
    with pytest.raises(ValueError, match="No phased_dmd_config.json"):
        hub.ExpertsConfig.load("/nonexistent")


def _transformer_inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 16, 16, generator=g),
        "timestep": torch.tensor([0.5]),
        "encoder_hidden_states": torch.randn(1, 4, 16, generator=g),
        "img_shapes": [[(1, 4, 4)]],
        "return_dict": False,
    }


def test_lora_expert_file_round_trip_and_diffusers_compatibility(tmp_path):
    transformer = tiny.build_components("qwen-image")["transformer"]
    add_lora(transformer, "phase_0", seed=1)
    add_lora(transformer, "phase_1", seed=2)
    path = hub.save_lora_expert(transformer, "phase_1", tmp_path / "phase_1")
    assert path == tmp_path / "phase_1" / "pytorch_lora_weights.safetensors"
    with safe_open(path, "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert not any("phase_" in k for k in keys)  # the adapter name is not part of the keys
    lora_config = json.loads(metadata["lora_adapter_metadata"])
    # The scale (alpha 8 / rank 4) is in the weights; the metadata says scaling 1.
    assert lora_config["transformer.r"] == 4 and lora_config["transformer.lora_alpha"] == 4

    transformer.set_adapter("phase_1")
    expected = transformer(**_transformer_inputs())[0]
    fresh = tiny.build_components("qwen-image")["transformer"]
    hub.load_lora_expert(fresh, path.parent, "expert")
    assert fresh.peft_config["expert"].r == 4 and fresh.peft_config["expert"].lora_alpha == 4
    torch.testing.assert_close(fresh(**_transformer_inputs())[0], expected)
    with pytest.raises(ValueError, match="already"):
        hub.load_lora_expert(fresh, path, "expert")
    with pytest.raises(ValueError, match="adapter_name"):
        hub.save_lora_expert(fresh, "missing", tmp_path / "x")

    # diffusers' own LoRA loader reads the file as it is.
    pipe = tiny.build_pipeline("qwen-image")
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="mine")
    torch.testing.assert_close(pipe.transformer(**_transformer_inputs())[0], expected)


def test_full_expert_drops_lora_layers(tmp_path):
    components = tiny.build_components("qwen-image")
    transformer = components["transformer"]
    reference = {k: v.clone() for k, v in transformer.state_dict().items()}
    add_lora(transformer, "a", seed=0)
    assert hub.base_state_dict(transformer).keys() == reference.keys()
    hub.save_full_expert(transformer, tmp_path / "full")
    loaded = hub.load_full_expert(type(transformer), tmp_path / "full")
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, reference[key])
    transformer.fuse_lora()
    with pytest.raises(ValueError, match="fused"):
        hub.save_full_expert(transformer, tmp_path / "fused")


def test_resolve_repo_local_and_invalid(tmp_path):
    assert hub.resolve_repo(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="neither a local directory nor a valid Hub repo id"):
        hub.resolve_repo("not a/repo/id")


# ---------------------------------------------------------------------------------------------- the Hub cache


def put_in_hub_cache(cache, repo_id, folder, commit):
    """Lays `folder` out as huggingface_hub caches a snapshot: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(HfApi, "repo_info", lambda *a, **k: pytest.fail("the Hub was contacted"))
    return cache


def _qwen_experts_pipeline(base_model):
    components = tiny.build_components("qwen-image")
    add_lora(components["transformer"], "hi", seed=1)
    add_lora(components["transformer"], "lo", seed=2)
    scheduler = PhasedDMDScheduler.from_config(
        components["scheduler"].config, phase_boundaries=[0.6], steps_per_phase=[1, 1]
    )
    pipe = PhasedMoEPipeline(
        **{**components, "scheduler": scheduler},
        experts=[("transformer", "hi"), ("transformer", "lo")],
        base_model=base_model,
    )
    return pipe


def _images(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat", height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_from_pretrained_resolves_experts_and_base_from_the_hub_cache(tmp_path, offline_cache):
    base_sha, experts_sha = "a" * 40, "b" * 40
    put_in_hub_cache(offline_cache, "org/base", tiny.save_pipeline("qwen-image", tmp_path / "base"), base_sha)
    pipe = _qwen_experts_pipeline("org/base")
    expected = _images(pipe)
    pipe.save_pretrained(tmp_path / "experts", experts_only=True, base_revision=base_sha)
    put_in_hub_cache(offline_cache, "org/experts", tmp_path / "experts", experts_sha)

    for loaded in (
        PhasedMoEPipeline.from_pretrained("org/experts"),
        PhasedMoEPipeline.from_pretrained("org/experts", revision=experts_sha),
        PhasedMoEPipeline.from_pretrained("org/base", experts="org/experts"),
    ):
        assert str(offline_cache) in str(loaded.transformer.config._name_or_path)
        assert loaded.config.base_model == "org/base" and loaded.config.base_revision == base_sha
        np.testing.assert_allclose(_images(loaded), expected, atol=1e-6, rtol=0)

    with pytest.raises(Exception, match="(?i)cannot find|not found|offline"):
        PhasedMoEPipeline.from_pretrained("org/missing")


def test_from_pretrained_honours_cache_dir_and_local_files_only(tmp_path, monkeypatch):
    monkeypatch.setattr(HfApi, "repo_info", lambda *a, **k: pytest.fail("the Hub was contacted"))
    cache = tmp_path / "elsewhere"
    put_in_hub_cache(cache, "org/base", tiny.save_pipeline("qwen-image", tmp_path / "base"), "c" * 40)
    pipe = _qwen_experts_pipeline("org/base")
    pipe.save_pretrained(tmp_path / "experts", experts_only=True)
    loaded = PhasedMoEPipeline.from_pretrained(tmp_path / "experts", cache_dir=cache, local_files_only=True)
    np.testing.assert_allclose(_images(loaded), _images(pipe), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- push, model card


def test_push_experts_to_hub_uploads_without_leaking_the_token(tmp_path, monkeypatch, capsys, caplog):
    token = "hf_SECRETtoken0123456789"
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, "token": self.token, **kwargs}
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = {"token": self.token, **kwargs}
        calls["files"] = sorted(
            str(p.relative_to(kwargs["folder_path"])) for p in tmp_path.joinpath("experts").rglob("*") if p.is_file()
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    caplog.set_level(logging.DEBUG)
    pipe = _qwen_experts_pipeline("org/base")
    pipe.save_pretrained(tmp_path / "experts", experts_only=True)

    url = hub.push_experts_to_hub(
        tmp_path / "experts", "org/experts", token=token, private=True, ignore_patterns=["logs/*"]
    )
    assert url == "https://huggingface.co/org/experts"
    assert calls["create_repo"]["token"] == token and calls["create_repo"]["private"] is True
    assert calls["create_repo"]["exist_ok"] is True
    assert calls["upload_folder"]["repo_id"] == "org/experts" and "logs/*" in calls["upload_folder"]["ignore_patterns"]
    assert "README.md" in calls["files"] and "phased_dmd_config.json" in calls["files"]
    assert "phase_0/pytorch_lora_weights.safetensors" in calls["files"]
    captured = capsys.readouterr()
    assert token not in captured.out + captured.err + caplog.text
    assert "org/experts" in (tmp_path / "experts" / "README.md").read_text()

    with pytest.raises(ValueError, match="phased_dmd_config.json"):
        hub.push_experts_to_hub(tmp_path, "org/experts", token=token)


def test_model_card(tmp_path):
    config = hub.ExpertsConfig.from_dict(experts_config())
    card = hub.write_model_card(
        tmp_path,
        config,
        repo_id="org/wan-phased",
        training_figures={"generator updates": 1000, "batch size": 64},
        validation_images=["grid.png"],
        extra_text="Trained on a test.",
    )
    text = (tmp_path / "README.md").read_text()
    assert text == str(card)
    assert card.data.base_model == "org/base" and card.data.library_name == "diffusers"
    assert {"phased-dmd", "few-step", "distillation", "lora", "text-to-video"} <= set(card.data.tags)
    assert 'PhasedMoEPipeline.from_pretrained("org/wan-phased"' in text and ".frames[0]" in text
    assert "| generator updates | 1000 |" in text and "![sample](grid.png)" in text and "Trained on a test." in text
    qwen = hub.ExpertsConfig.from_dict(
        experts_config(family="qwen-image", base_model=str(tmp_path), experts=[_expert(0), _expert(1)])
    )
    card = hub.write_model_card(tmp_path, qwen)
    assert card.data.base_model is None  # a local path is not Hub metadata
    assert "text-to-image" in card.data.tags and ".images[0]" in str(card)
    i2v = hub.ExpertsConfig.from_dict(experts_config(family="wan2.2-i2v-a14b"))
    card = hub.write_model_card(tmp_path, i2v, repo_id="org/i2v-phased")
    assert card.data.pipeline_tag == "image-to-video" and "text-to-video" not in card.data.tags
    assert "image=image" in str(card) and "load_image(" in str(card)  # the pipeline needs the first frame


def _python_block(markdown: str) -> str:
    blocks = [b.split("\n", 1)[1] for b in markdown.split("```")[1::2] if b.startswith("python")]
    assert len(blocks) == 1, blocks
    return blocks[0]


def test_model_card_snippet_runs_on_the_folder_it_describes(tmp_path, monkeypatch):
    base_dir = tiny.save_pipeline("qwen-image", tmp_path / "base")
    _qwen_experts_pipeline(str(base_dir)).save_pretrained(tmp_path / "experts", experts_only=True)
    config = hub.ExpertsConfig.load(tmp_path / "experts")
    hub.write_model_card(tmp_path / "experts", config, prompt='a "quoted" digit seven', sample_size=(32, 32, None))
    text = (tmp_path / "experts" / "README.md").read_text()
    snippet = _python_block(text)
    # Not pushed: the folder's absolute path, never its basename posing as a repo id; the run's prompt and size.
    assert f'from_pretrained("{(tmp_path / "experts").resolve()}"' in snippet
    assert 'pipe("a \\"quoted\\" digit seven", height=32, width=32,' in snippet
    # A local base is not "downloaded"; the snippet picks the GPU only where there is one.
    assert "is downloaded" not in text and f"the local folder `{base_dir}`" in text
    assert 'if torch.cuda.is_available() else ("cpu", torch.float32)' in snippet
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})  # as written: on this machine, the CPU
    assert (tmp_path / "sample.png").is_file()


def test_push_puts_the_repo_id_into_a_card_written_before_the_repo_existed(tmp_path, monkeypatch):
    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **k: RepoUrl(f"https://huggingface.co/me/{repo_id}")
    )
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **k: None)
    _qwen_experts_pipeline("org/base").save_pretrained(tmp_path / "experts", experts_only=True)
    hub.write_model_card(tmp_path / "experts", hub.ExpertsConfig.load(tmp_path / "experts"))
    hub.push_experts_to_hub(tmp_path / "experts", "experts")  # no namespace: the Hub puts it in the user's
    text = (tmp_path / "experts" / "README.md").read_text()
    assert 'from_pretrained("me/experts"' in text and str(tmp_path) not in text


def test_base_model_reference(tmp_path, offline_cache, caplog):
    sha = "c" * 40
    put_in_hub_cache(offline_cache, "org/base", tiny.save_pipeline("qwen-image", tmp_path / "base"), sha)
    snapshot = offline_cache / "models--org--base" / "snapshots" / sha
    assert hub.base_model_reference(str(snapshot)) == ("org/base", sha)  # a Hub cache snapshot: id and commit
    assert hub.base_model_reference(str(snapshot), "main") == ("org/base", "main")
    assert hub.base_model_reference("org/base", "v1") == ("org/base", "v1")
    assert hub.base_model_reference(str(tmp_path / "base"), None, "org/named") == ("org/named", None)
    with caplog.at_level(logging.WARNING):
        assert hub.base_model_reference(str(tmp_path / "base")) == (str((tmp_path / "base").resolve()), None)
    assert "--base_model_id" in caplog.text
    with pytest.raises(ValueError, match="--base_model_id"):
        hub.base_model_reference(str(tmp_path / "base"), None, "not a repo id!")


def test_unresolvable_base_model_says_how_to_pass_the_base(tmp_path, offline_cache):
    base = tiny.save_pipeline("qwen-image", tmp_path / "base")
    pipe = _qwen_experts_pipeline("/nowhere/on/this/machine/base")
    pipe.save_pretrained(tmp_path / "experts", experts_only=True)
    with pytest.raises(ValueError, match=r"`base_model` '/nowhere.*phased_dmd_config.json.*experts="):
        PhasedMoEPipeline.from_pretrained(tmp_path / "experts")
    config = json.loads((tmp_path / "experts" / "phased_dmd_config.json").read_text())
    (tmp_path / "experts" / "phased_dmd_config.json").write_text(json.dumps({**config, "base_model": "org/absent"}))
    with pytest.raises(ValueError, match=r"`base_model` 'org/absent'.*cannot be resolved.*experts="):
        PhasedMoEPipeline.from_pretrained(tmp_path / "experts")
    # The way the message gives works.
    loaded = PhasedMoEPipeline.from_pretrained(base, experts=tmp_path / "experts")
    np.testing.assert_allclose(_images(loaded), _images(pipe), atol=1e-6, rtol=0)


def test_released_lora_file_from_a_hub_repo_of_several(tmp_path, offline_cache):
    from safetensors.torch import save_file

    base = tiny.save_pipeline("qwen-image", tmp_path / "base")
    to_q = tiny.build_pipeline("qwen-image").transformer.transformer_blocks[0].attn.to_q
    release = tmp_path / "release"
    release.mkdir()
    for steps in (4, 8):
        g = torch.Generator().manual_seed(steps)
        save_file(
            {
                "transformer_blocks.0.attn.to_q.lora_down.weight": torch.randn(2, to_q.in_features, generator=g),
                "transformer_blocks.0.attn.to_q.lora_up.weight": torch.randn(to_q.out_features, 2, generator=g),
                "transformer_blocks.0.attn.to_q.alpha": torch.tensor(2.0),
            },
            release / f"Qwen-Image-Lightning-{steps}steps-V1.0.safetensors",
        )
    put_in_hub_cache(offline_cache, "org/lightning", release, "d" * 40)
    with pytest.raises(ValueError, match="several LoRA files"):
        PhasedMoEPipeline.from_pretrained(base, experts="org/lightning")
    pipe = PhasedMoEPipeline.from_pretrained(
        base, experts="org/lightning", experts_weight_name="Qwen-Image-Lightning-8steps-V1.0.safetensors"
    )
    assert pipe.config.method == "qwen-image-lightning-8steps" and list(pipe.scheduler.config.steps_per_phase) == [8]


# issue 20 item 5: the scale alpha / rank is in the weights of the files we write, so a loader that ignores the
# safetensors metadata (ComfyUI: `W + up @ down` when there is no `.alpha` key) gives the trained weights too.
# Scales that are not 1 (and not all powers of two): plain, per-module patterns, rsLoRA.
SCALE_CASES = {
    "qwen-image": ("qwen-image", {"r": 8, "lora_alpha": 2.0}),
    "wan2.2-t2v-a14b": ("wan2.2-t2v-a14b", {"r": 4, "lora_alpha": 3.0}),
    "qwen-image-patterns": (
        "qwen-image",
        {"r": 4, "lora_alpha": 8.0, "rank_pattern": {"to_k": 2}, "alpha_pattern": {"to_v": 3.0, "to_k": 1.0}},
    ),
    "wan2.2-t2v-a14b-rslora": ("wan2.2-t2v-a14b", {"r": 4, "lora_alpha": 3.0, "use_rslora": True}),
}


def _trained(family, lora_kwargs, name="phase_0", seed=5, slot="transformer"):
    transformer = tiny.build_components(family)[slot]
    with torch.random.fork_rng(devices=[]), multiple_adapters():
        torch.manual_seed(seed)
        config = LoraConfig(target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False, **lora_kwargs)
        transformer.add_adapter(config, adapter_name=name)
    return transformer


def _peft_merged(transformer, adapter):
    """module -> W + peft's delta of `adapter` (`get_delta_weight`: scaling * B @ A)."""
    return {
        name: layer.get_base_layer().weight + layer.get_delta_weight(adapter)
        for name, layer in transformer.named_modules()
        if hasattr(layer, "lora_A") and adapter in layer.lora_A
    }


def _metadata_blind_merge(base, file):
    """What a loader that reads no metadata applies (ComfyUI without `.alpha` keys): W + B @ A per module."""
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    merged = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            merged[module] = base[f"{module}.weight"] + b @ a
    return merged


def _scale_case(case):
    family, kwargs = SCALE_CASES[case]
    return _trained(family, kwargs)


@pytest.mark.parametrize("case", list(SCALE_CASES))
def test_lora_file_weights_carry_the_scale_for_a_metadata_blind_loader(case, tmp_path):
    transformer = _scale_case(case)
    scalings = {n: m.scaling["phase_0"] for n, m in transformer.named_modules() if hasattr(m, "lora_A")}
    assert len(set(scalings.values())) > 1 if "patterns" in case else all(s != 1 for s in scalings.values())
    file = hub.save_lora_expert(transformer, "phase_0", tmp_path / "phase_0")
    expected = _peft_merged(transformer, "phase_0")
    base = hub.base_state_dict(transformer)
    blind = _metadata_blind_merge(base, file)
    assert blind.keys() == expected.keys()
    for module in expected:
        torch.testing.assert_close(blind[module], expected[module], msg=module)
    # The metadata gives scaling 1 for every module, so diffusers (which reads it) applies the same weights.
    _, config = hub.read_lora_file(file)
    tensors = {k.removeprefix("transformer."): v for k, v in hub.read_lora_file(file)[0].items()}
    assert set(hub.lora_file_scalings(tensors, config).values()) == {1.0}


@pytest.mark.parametrize("case", list(SCALE_CASES))
def test_diffusers_loader_of_the_new_file_gives_the_trained_outputs(case, tmp_path):
    family = SCALE_CASES[case][0]
    transformer = _scale_case(case)
    transformer.set_adapter("phase_0")
    inputs = _transformer_inputs() if family == "qwen-image" else _wan_inputs()
    expected = transformer(**inputs)[0]
    file = hub.save_lora_expert(transformer, "phase_0", tmp_path / "phase_0")
    # diffusers' own loader, on the transformer and through the family pipeline ...
    fresh = tiny.build_components(family)["transformer"]
    fresh.load_lora_adapter(str(file.parent), weight_name=file.name, prefix="transformer", adapter_name="mine")
    torch.testing.assert_close(fresh(**inputs)[0], expected)
    pipe = tiny.build_pipeline(family)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="mine")
    torch.testing.assert_close(pipe.transformer(**inputs)[0], expected)
    # ... and ours, whose merged weights are peft's of the trained adapter.
    ours = tiny.build_components(family)["transformer"]
    hub.load_lora_expert(ours, file.parent, "expert")
    torch.testing.assert_close(ours(**inputs)[0], expected)
    loaded = _peft_merged(ours, "expert")
    for module, weight in _peft_merged(transformer, "phase_0").items():
        torch.testing.assert_close(loaded[module], weight)
    # Saving the loaded expert again writes the same file (its scaling is 1 now).
    again = hub.save_lora_expert(ours, "expert", tmp_path / "again")
    a, b = hub.read_lora_file(file), hub.read_lora_file(again)
    assert a[1] == b[1] and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def _wan_inputs():
    g = torch.Generator().manual_seed(0)
    config = tiny.build_components("wan2.2-t2v-a14b")["transformer"].config
    return {
        "hidden_states": torch.randn(1, config.in_channels, 2, 4, 4, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 4, config.text_dim, generator=g),
        "return_dict": False,
    }


def _write_old_format(transformer, adapter_name, out_dir):
    """A file as `save_lora_expert` wrote it before the scale went into the weights: B as trained, the adapter's
    own `LoraConfig` (its alpha) in the metadata."""
    from diffusers.loaders.lora_base import LoraBaseMixin
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    metadata = {f"transformer.{k}": v for k, v in transformer.peft_config[adapter_name].to_dict().items()}
    LoraBaseMixin.write_lora_layers(
        state_dict={f"transformer.{k}": v.detach().contiguous() for k, v in layers.items()},
        save_directory=str(out_dir),
        is_main_process=True,
        weight_name=hub.LORA_WEIGHT_NAME,
        save_function=None,
        safe_serialization=True,
        lora_adapter_metadata=metadata,
    )
    return out_dir / hub.LORA_WEIGHT_NAME


@pytest.mark.parametrize("case", ["qwen-image", "qwen-image-patterns"])
def test_files_of_earlier_versions_still_load_in_diffusers(case, tmp_path):
    """Files written before the scale went into the weights (scale only in the metadata) load right: diffusers,
    `hub.load_lora_expert` and the pipeline read their metadata."""
    transformer = _scale_case(case)
    transformer.set_adapter("phase_0")
    expected = transformer(**_transformer_inputs())[0]
    file = _write_old_format(transformer, "phase_0", tmp_path / "phase_0")
    pipe = tiny.build_pipeline("qwen-image")
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="mine")
    torch.testing.assert_close(pipe.transformer(**_transformer_inputs())[0], expected)
    ours = tiny.build_components("qwen-image")["transformer"]
    hub.load_lora_expert(ours, file.parent, "expert")
    torch.testing.assert_close(ours(**_transformer_inputs())[0], expected)
    # Saved again, it is a new-format file: scale in the weights.
    new = hub.save_lora_expert(ours, "expert", tmp_path / "new")
    blind = _metadata_blind_merge(hub.base_state_dict(ours), new)
    for module, weight in _peft_merged(transformer, "phase_0").items():
        torch.testing.assert_close(blind[module], weight)


@pytest.mark.parametrize("old_format", [False, True])
@pytest.mark.parametrize("case", ["qwen-image", "qwen-image-patterns", "wan2.2-t2v-a14b-rslora"])
def test_trainer_loads_earlier_experts_as_the_function_they_hold(case, old_format, tmp_path):
    """`--train_phase k` loads phases < k from `--output_dir` into adapters made with the run's rank and alpha: the
    adapters compute what the files hold (new files: scale 1 in the metadata; earlier ones: the trained alpha), and
    with the trained rank / alpha the adapter gets back the trained tensors exactly (scales that are powers of two)."""
    from types import SimpleNamespace

    from diffusers_pdmd.training import adapters as ad
    from diffusers_pdmd.training.resume import load_earlier_experts

    family, kwargs = SCALE_CASES[case]
    trained = _scale_case(case)
    trained.set_adapter("phase_0")
    inputs = _transformer_inputs() if family == "qwen-image" else _wan_inputs()
    expected = trained(**inputs)[0]
    folder = tmp_path / "out"
    (_write_old_format if old_format else hub.save_lora_expert)(trained, "phase_0", folder / "phase_0")
    hub.ExpertsConfig(
        family=family,
        base_model="org/base",
        phase_boundaries=[0.875],
        steps_per_phase=[1, 1],
        method="phased_dmd",
        experts=[
            {"phase": 0, "base_transformer": "transformer", "type": "lora", "path": "phase_0"},
            {"phase": 1, "base_transformer": "transformer", "type": "lora", "path": "phase_1"},  # not written yet
        ],
    ).save(folder)

    for run_kwargs in (kwargs, {"r": kwargs["r"], "lora_alpha": 4.0}):  # the trained flags, or another alpha
        model = tiny.build_components(family)["transformer"]
        with multiple_adapters():
            model.add_adapter(
                LoraConfig(target_modules=["to_q", "to_k", "to_v"], **run_kwargs), adapter_name="phase_0"
            )
        if "rank_pattern" in kwargs and run_kwargs is not kwargs:
            continue  # another rank pattern is another shape: not loadable (an error, as before)
        d = SimpleNamespace(
            plan=SimpleNamespace(num_phases=2), models={"transformer": model}, expert_base=["transformer"]
        )
        load_earlier_experts(d, folder, skip=[])
        model.set_adapter("phase_0")
        torch.testing.assert_close(model(**inputs)[0], expected)
        if run_kwargs is kwargs:
            mine, theirs = ad.adapter_state_dict(model, "phase_0"), ad.adapter_state_dict(trained, "phase_0")
            exact = all(math.log2(s).is_integer() for s in hub.adapter_scalings(trained, "phase_0").values())
            for key in theirs:
                if exact or old_format:
                    torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0)
                else:
                    torch.testing.assert_close(mine[key], theirs[key])
