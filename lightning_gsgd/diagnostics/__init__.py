"""Diagnostics of the invariant space: path-space metrics (:mod:`.metrics`, :mod:`.chain`) for any
training loop, and the plot command (``python -m lightning_gsgd.diagnostics.plot``).

May import: torch, :mod:`lightning_gsgd.topology`, :mod:`lightning_gsgd.step` and
:mod:`lightning_gsgd.optim` (no Lightning; matplotlib only inside the plot command).
"""
