"""What the G-space optimizers add to torch's ``state_dict``: step counters, the topology fingerprint and
which optimizer saved the state; and their counters read as Python numbers."""

from __future__ import annotations

from typing import Any

from lightning_gsgd.step.inputs import StepCounters
from lightning_gsgd.topology.types import Topology, TopologyError

STATE_KEY = "gsgd"

Fingerprint = list[tuple[str, tuple[int, ...]]]

# Who saved a state, by its ``kind`` (GSGD's state from before the marker existed has none).
_SAVED_BY = {"sgd": "GSGD", "adam": "GAdam/GAdamW"}


class CounterProperty:
    """A step counter of ``optimizer.counters()`` read as a Python ``int`` (on an accelerator the read
    waits for the device; log ``counters()`` to avoid that)."""

    def __init__(self, key: str, doc: str) -> None:
        self.key = key
        self.__doc__ = doc

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return int(obj.counters()[self.key])


class SavedState:
    """The checks a G-space optimizer adds around torch's ``state_dict`` / ``load_state_dict``.

    The saved entry ``state_dict()[STATE_KEY]`` holds the topology fingerprint, the counters and the
    optimizer ``kind``. Loading refuses state saved by another G-space optimizer or for another topology
    (checked at once when bound, else at the next :meth:`check_bind`).

    Args:
        name: The optimizer's name, for messages.
        kind: This optimizer's kind (``"sgd"``, ``"adam"``).
        own_moments_only: Refuse non-empty state without this ``kind`` (torch's own optimizer state too):
            for Adam, whose moments must be in path coordinates. GSGD accepts torch SGD's state.
    """

    def __init__(self, name: str, kind: str, *, own_moments_only: bool) -> None:
        self.name, self.kind, self.own_moments_only = name, kind, own_moments_only
        self.pending: Fingerprint | None = None

    def check_bind(self, topology: Topology) -> None:
        """Refuse a topology that does not fit state loaded before it was bound."""
        if self.pending is not None:
            refuse_foreign_state(self.pending, topology, self.name)
        self.pending = None

    def extra(self, topology: Topology | None, counters: StepCounters) -> dict[str, Any]:
        """The entry to save under :data:`STATE_KEY`."""
        return {
            "fingerprint": topology.fingerprint() if topology is not None else self.pending,
            "counters": {k: v.detach().clone() for k, v in counters.tensors.items()},
            "kind": self.kind,
        }

    def accept(self, state_dict: dict[str, Any], topology: Topology | None) -> tuple[dict[str, Any], Any]:
        """Check a state to load; returns ``(torch's part, the saved entry or None)``.

        Raises:
            TopologyError: The state was saved by another optimizer or for another topology.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop(STATE_KEY, None)
        kind = groups_kind(state_dict) if extra is None else extra.get("kind", "sgd")
        has_state = any(state_dict.get("state", {}).values())
        if kind is not None and kind != self.kind or self.own_moments_only and has_state and kind is None:
            saved_by = _SAVED_BY.get(kind, "torch.optim.Adam/AdamW or another optimizer")
            raise TopologyError(
                f"{self.name}: this optimizer state was saved by {saved_by}, not by {_SAVED_BY[self.kind]}; its "
                "buffers or moments are not in path coordinates for it. Start the optimizer afresh "
                "(load only the model weights)."
            )
        fp = None if extra is None else extra.get("fingerprint")
        if fp is not None:
            fp = [(name, tuple(shape)) for name, shape in fp]
            if topology is not None:
                refuse_foreign_state(fp, topology, self.name)
            else:
                self.pending = fp
        return state_dict, extra


def groups_kind(state_dict: dict[str, Any]) -> str | None:
    """The kind of G-space optimizer whose parameter groups ``state_dict`` holds, else ``None``.

    torch's distributed optimizer state dicts (``get_optimizer_state_dict``, which Lightning's
    ``ModelParallelStrategy`` saves) keep only ``state`` and ``param_groups``, so the :data:`STATE_KEY` entry
    is gone; the groups still carry ``min_ratio``, which torch's optimizers do not have, and Adam's ``betas``.
    """
    groups = state_dict.get("param_groups") or []
    if not groups or not all("min_ratio" in g for g in groups):
        return None
    return "adam" if all("betas" in g for g in groups) else "sgd"


def restore_counters(counters: StepCounters, extra: dict[str, Any] | None) -> None:
    """Replace every counter by a copy of its saved value (nothing when no entry was saved)."""
    if extra is not None:
        counters.tensors = {k: v.detach().clone() for k, v in extra.get("counters", {}).items()}


def refuse_foreign_state(saved: Fingerprint, topology: Topology, name: str = "GSGD") -> None:
    """Raise unless optimizer state saved with fingerprint ``saved`` fits ``topology``."""
    now = topology.fingerprint()
    if saved != now:
        raise TopologyError(
            f"{name}: the optimizer state was saved for a different topology (saved {saved}, now {now})"
        )


# The counters every G-space optimizer has (class attributes: ``steps = STEPS``).
GUARD_HITS = CounterProperty("guard_hits", "Total number of free tau path values the guard clamped.")
SKIPPED_STEPS = CounterProperty(
    "skipped_steps", "Steps skipped as a whole because a gradient, a per-unit sum or a per-unit factor was not finite."
)
COLLAPSED_STEPS = CounterProperty(
    "collapsed_steps",
    "Skipped steps whose loss gradient was finite but whose per-unit sums or factors were not: path values the "
    'guard drove towards zero have collapsed (docs/math.md, "Skipped steps and the guard").',
)
STEPS = CounterProperty("steps", "Number of steps taken, skipped ones excluded.")
