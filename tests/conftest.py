"""Test-session settings."""

import torch

# The test models are tiny: torch's intra-op worker threads only add contention on the 2-core CI
# machine (measured: the default run took 144 s with the default thread count under load, 33 s with one).
torch.set_num_threads(1)
