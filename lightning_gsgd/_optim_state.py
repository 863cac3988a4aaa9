"""``GSGD``'s counters and saved state: the step counters and what ``state_dict`` adds to torch's state.

:class:`GSGDStateMixin` comes before ``torch.optim.Optimizer`` among ``GSGD``'s bases, so its
``state_dict`` and ``load_state_dict`` wrap torch's (``super()``). It relies on attributes
``GSGD.__init__`` sets: ``_counters``, ``topology`` and ``_pending_fingerprint``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_gsgd.topology import Topology, TopologyError

_STATE_KEY = "gsgd"


class GSGDStateMixin:
    """Counters (:attr:`guard_hits`, :attr:`skipped_steps`, :attr:`steps`) and their persistence."""

    _counters: dict[str, Tensor]
    topology: Topology | None
    _pending_fingerprint: list[Any] | None

    # ------------------------------------------------------------------ counters
    def _counter(self, name: str, device: torch.device) -> Tensor:
        t = self._counters.get(name)
        if t is None:
            t = torch.zeros((), dtype=torch.int64, device=device)
            self._counters[name] = t
        elif t.device != device:
            t = t.to(device)
            self._counters[name] = t
        return t

    @property
    def guard_hits(self) -> Tensor:
        """Total number of tau path values the guard clamped (a 0-d int64 tensor)."""
        return self._counters.get("guard_hits", torch.zeros((), dtype=torch.int64))

    @property
    def skipped_steps(self) -> Tensor:
        """Steps skipped because a gradient or a per-unit factor was not finite (a 0-d int64 tensor)."""
        return self._counters.get("skipped_steps", torch.zeros((), dtype=torch.int64))

    @property
    def steps(self) -> Tensor:
        """Number of steps taken, skipped ones excluded (a 0-d int64 tensor)."""
        return self._counters.get("steps", torch.zeros((), dtype=torch.int64))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus G-SGD counters and the topology fingerprint."""
        sd = super().state_dict()  # type: ignore[misc]
        fp = self.topology.fingerprint() if self.topology is not None else self._pending_fingerprint
        sd[_STATE_KEY] = {
            "fingerprint": fp,
            "counters": {k: v.detach().clone() for k, v in self._counters.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state saved by :meth:`state_dict`; refuses state saved for another topology.

        Raises:
            TopologyError: The saved fingerprint (chain layer names and shapes) differs.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop(_STATE_KEY, None)
        if extra is not None:
            saved_fp = extra.get("fingerprint")
            if saved_fp is not None:
                saved_fp = [(name, tuple(shape)) for name, shape in saved_fp]
                if self.topology is not None:
                    refuse_foreign_state(saved_fp, self.topology)
                else:
                    self._pending_fingerprint = saved_fp
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if extra is not None:
            self._counters = {k: v.detach().clone() for k, v in extra.get("counters", {}).items()}


def refuse_foreign_state(saved: list[tuple[str, tuple[int, ...]]], topology: Topology) -> None:
    """Raise unless optimizer state saved with fingerprint ``saved`` fits ``topology``."""
    now = topology.fingerprint()
    if saved != now:
        raise TopologyError(f"GSGD: the optimizer state was saved for a different topology (saved {saved}, now {now})")
