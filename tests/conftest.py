import os

import torch


# Tiny models run fastest on one thread, and `make test` runs two test processes on two cores.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
