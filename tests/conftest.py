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
