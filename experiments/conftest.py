"""Test settings of the experiments' own tests (the same as ``tests/conftest.py``'s)."""

import torch

# The study's smoke tests train tiny models: torch's intra-op threads only add contention on 2 cores.
torch.set_num_threads(1)
