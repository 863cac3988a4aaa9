"""Say so when G-SGD skips steps: a run whose steps keep being skipped must not look healthy.

Lightning glue only: it reads the optimizer's counters (one host read) and warns on rank zero.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

_NONFINITE = (
    "a gradient or a per-unit sum sum(w * grad) was not finite (a NaN or inf loss, or an overflow); "
    "nothing was written. Check the loss and the data, or lower the learning rate"
)
_COLLAPSE = (
    "the step's path-space factors were not finite although the gradients were: path values have "
    "collapsed (the guard clamped {hits} path value(s) so far); nothing was written, and training does "
    "not recover by itself. Lower the learning rate or the momentum, or resume from an earlier checkpoint"
)


class SkipMonitor:
    """Warns once at the first skipped step, with the reason and the fix, then again (at most once per
    ``window`` steps) whenever more than ``fraction`` of the last ``window`` steps were skipped; the
    windows start after the first skipped step, so one skipped step warns once.

    Args:
        fraction: Share of recent steps, in ``[0, 1)``, above which skipping warns again.
        window: How many recent steps that share is taken over (at least 1).
    """

    def __init__(self, fraction: float, window: int) -> None:
        self.fraction, self.window = fraction, window
        self._first_warned = False
        self._start: tuple[int, ...] | None = None  # (attempted, skipped, collapsed, guard hits) at the window's start
        self._last: tuple[int, ...] | None = None

    def start(self, optimizer: Any) -> None:
        """Take the counters as they stand (a resumed fit starts from its checkpoint's) as the baseline."""
        self._start = self._last = _read(optimizer.counters())

    def check(self, optimizer: Any, *, wait: bool) -> None:
        """Read the counters and warn as the class docstring says.

        Args:
            optimizer: The G-space optimizer.
            wait: Read them even where that waits for an accelerator (the CPU's counters are always read).
        """
        counters = optimizer.counters()
        if not wait and any(t.device.type != "cpu" for t in counters.values()):
            return
        if self._start is None or self._last is None:
            self.start(optimizer)
            return
        now = _read(counters)
        attempted, skipped, collapsed, hits = now
        if not self._first_warned and skipped > self._last[1]:
            self._first_warned = True
            why = _COLLAPSE.format(hits=hits) if collapsed > self._last[2] else _NONFINITE
            rank_zero_warn(f"GSGD skipped a step: {why}. (gsgd/skipped_steps counts skipped steps.)")
            self._start = self._last = now  # the next window starts after the skip just reported
            return
        self._last = now
        n = attempted - self._start[0]
        if n >= self.window:
            k = skipped - self._start[1]
            if k > self.fraction * n:
                rank_zero_warn(
                    f"GSGD skipped {k} of the last {n} steps (gsgd/skipped_steps = {skipped} in all); "
                    "see the first warning for why, and lower the learning rate or the momentum."
                )
            self._start = now


def _read(c: dict[str, Any]) -> tuple[int, ...]:
    """``(attempted, skipped, collapsed, guard hits)`` so far, in one host read."""
    steps, skipped, collapsed, hits = torch.stack(
        [c["steps"], c["skipped_steps"], c["collapsed_steps"], c["guard_hits"]]
    ).tolist()
    return steps + skipped, skipped, collapsed, hits
