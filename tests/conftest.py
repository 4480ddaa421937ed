import os

import pytest
import torch


# Tiny models run fastest on one thread, and `make test` runs two test processes on two cores.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    """Every test runs offline (nothing may reach the Hub) and on one torch thread, even if an earlier test changed
    either."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fixed_device_memory(monkeypatch):
    """`expert_swap_mode="auto"` reads the free device memory (the host's RAM on the CPU), which other processes
    change: the tests see a fixed 64 of 128 GiB free, so "auto" always resolves the same way (tests of the rule
    inject their own figures)."""
    monkeypatch.setattr("diffusers_pdmd.pipelines.expert_swap.device_memory", lambda device=None: (64 * 2**30, 2**37))


@pytest.fixture(autouse=True)
def _attention_backend_restored():
    """diffusers' `set_attention_backend` also sets the process-wide active backend (the training scripts call it for
    `--attention_backend`): restore it after each test, so no test sees another's."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry.get_active_backend()[0]
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """accelerate keeps its state (mixed precision among it) per process: a script run by an earlier test in the same
    worker must not decide the precision of the next one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
