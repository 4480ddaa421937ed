import json

import pytest
import torch

from diffusers_pdmd.training import checkpoint as ckpt


def _opt():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_optimizer_roundtrip_continues_identically(tmp_path):
    model, opt = _opt()
    tensors, meta = ckpt.flatten_optimizer(opt.state_dict(), "gen_0")
    ckpt.save_checkpoint(tmp_path, 1, {"optimizers": tensors}, {"gen_0": meta})  # JSON: no tensor left in meta
    files, state = ckpt.load_checkpoint(tmp_path / "checkpoint-1")
    tensors, meta = files["optimizers"], state["gen_0"]
    model2 = torch.nn.Linear(3, 2)
    model2.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt.unflatten_optimizer(tensors, meta, "gen_0"))
    x = torch.randn(4, 3)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    torch.testing.assert_close(model.weight, model2.weight, rtol=0, atol=0)


def test_rng_roundtrip():
    gen = torch.Generator().manual_seed(3)
    tensors, meta = ckpt.rng_state({"noise": gen})
    json.dumps(meta)
    a = (torch.rand(3), torch.rand(2, generator=gen))
    ckpt.set_rng_state(tensors, meta, {"noise": gen})
    b = (torch.rand(3), torch.rand(2, generator=gen))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_save_is_atomic_and_latest_skips_incomplete(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, {"w": {"a": torch.ones(2)}}, {"global_step": 1})
    # a crash while writing step 2 leaves only its hidden temporary folder, or a folder with no state file
    (tmp_path / ".checkpoint-2.tmp").mkdir()
    (tmp_path / "checkpoint-3").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert ckpt.resolve_resume(tmp_path, "latest").name == "checkpoint-1"
    files, state = ckpt.load_checkpoint(tmp_path / "checkpoint-1")
    assert state == {"global_step": 1} and torch.equal(files["w"]["a"], torch.ones(2))
    # rewriting an existing step replaces it whole
    ckpt.save_checkpoint(tmp_path, 1, {"w": {"a": torch.zeros(2)}}, {"global_step": 1})
    assert torch.equal(ckpt.load_checkpoint(tmp_path / "checkpoint-1")[0]["w"]["a"], torch.zeros(2))
    assert not list(tmp_path.glob(".checkpoint-1*"))


def test_prune_and_errors(tmp_path):
    for step in (1, 2, 3, 10):
        ckpt.save_checkpoint(tmp_path, step, {}, {"global_step": step})
    ckpt.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-10"]
    assert ckpt.resolve_resume(tmp_path / "empty", "latest") is None
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        ckpt.resolve_resume(tmp_path, "checkpoint-99")
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        ckpt.load_checkpoint(tmp_path)
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))
