"""Test-session settings."""

import sys
from pathlib import Path

import torch

# The test models are tiny: torch's intra-op worker threads only add contention on the 2-core CI
# machine (measured: the default run took 144 s with the default thread count under load, 33 s with one).
torch.set_num_threads(1)

# The examples import their sibling modules (``from _data import digits``) the way they do when run as
# scripts (``python examples/NAME.py`` puts examples/ first on sys.path); tests import them the same way.
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
