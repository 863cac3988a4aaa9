"""What ``GSGD`` adds to torch's optimizer ``state_dict``: its step counters and the topology fingerprint."""

from __future__ import annotations

from typing import Any

from lightning_gsgd.step.inputs import StepCounters
from lightning_gsgd.topology.types import Topology, TopologyError

STATE_KEY = "gsgd"

Fingerprint = list[tuple[str, tuple[int, ...]]]


def saved_extra(fingerprint: Fingerprint | None, counters: StepCounters) -> dict[str, Any]:
    """The entry ``state_dict()[STATE_KEY]``: the fingerprint and a copy of every counter."""
    return {
        "fingerprint": fingerprint,
        "counters": {k: v.detach().clone() for k, v in counters.tensors.items()},
    }


def split_extra(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(torch's part, ours)`` of a saved state (ours is ``None`` in a state saved by torch's SGD)."""
    state_dict = dict(state_dict)
    return state_dict, state_dict.pop(STATE_KEY, None)


def saved_fingerprint(extra: dict[str, Any]) -> Fingerprint | None:
    """The fingerprint in a saved entry, normalised to tuples (a checkpoint may hold lists)."""
    fp = extra.get("fingerprint")
    return None if fp is None else [(name, tuple(shape)) for name, shape in fp]


def restore_counters(counters: StepCounters, extra: dict[str, Any]) -> None:
    """Replace every counter by a copy of its saved value."""
    counters.tensors = {k: v.detach().clone() for k, v in extra.get("counters", {}).items()}


def refuse_foreign_state(saved: Fingerprint, topology: Topology) -> None:
    """Raise unless optimizer state saved with fingerprint ``saved`` fits ``topology``."""
    now = topology.fingerprint()
    if saved != now:
        raise TopologyError(f"GSGD: the optimizer state was saved for a different topology (saved {saved}, now {now})")
