"""Test-session settings."""

import sys
from pathlib import Path

import pytest
import torch

# The test models are tiny: torch's intra-op worker threads only add contention on the 2-core CI
# machine (measured: the default run took 144 s with the default thread count under load, 33 s with one).
torch.set_num_threads(1)

# The examples import their sibling modules (``from _data import digits``) the way they do when run as
# scripts (``python examples/NAME.py`` puts examples/ first on sys.path); tests import them the same way.
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's bundled 8x8 digits as float32 inputs in [0, 1] and integer labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
