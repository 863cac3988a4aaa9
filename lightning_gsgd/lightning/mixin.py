"""``GSGDMixin``: a LightningModule that trains with G-SGD without adding a callback to the Trainer.

Lightning glue only: no G-SGD math here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_gsgd.lightning.callback import GSGDCallback


class GSGDMixin:
    """Mix into a LightningModule to train it with G-SGD wherever it is fit.

    The mixin contributes a :class:`~lightning_gsgd.GSGDCallback` through ``configure_callbacks``, so
    the module gets everything the callback does with no change to the Trainer: a ``GSGD`` returned
    from ``configure_optimizers`` (or built from bare parameters by the Lightning CLI's
    ``--optimizer lightning_gsgd.GSGD``) is bound to the module at the start of ``fit``, before the
    first step and before ``Tuner.lr_find``'s range test; a ``torch.optim.SGD`` is replaced by
    ``GSGD``; the skeleton is initialized on a fresh fit; the ``gsgd/`` diagnostics go to the Trainer's
    loggers (``docs/diagnostics.md``). A ``GSGDCallback`` passed to the Trainer
    takes precedence over the mixin's (so ``--trainer.callbacks`` flags still apply).

    Override :meth:`configure_gsgd` to change the callback's arguments. If your module overrides
    ``configure_callbacks``, include ``super().configure_callbacks()`` in what it returns.

    Example::

        class Net(GSGDMixin, LightningModule):  # GSGDMixin first
            def configure_gsgd(self):
                return GSGDCallback(skeleton_init=True, min_coverage=0.5)

            def configure_optimizers(self):
                return GSGD(self.parameters(), lr=0.05, momentum=0.9)
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if pl.LightningModule in mro and mro.index(pl.LightningModule) < mro.index(GSGDMixin):
            raise TypeError(
                f"{cls.__name__}: list GSGDMixin before LightningModule in the base classes "
                f"(class {cls.__name__}(GSGDMixin, LightningModule)), or its hooks are never called."
            )

    def configure_gsgd(self) -> GSGDCallback:
        """The callback that applies G-SGD to this module; override to pass arguments.

        Returns:
            A new :class:`~lightning_gsgd.GSGDCallback`.
        """
        return GSGDCallback()

    def configure_callbacks(self) -> Sequence[Callback] | Callback:
        """The module's other callbacks plus :meth:`configure_gsgd`'s, unless the Trainer already has one."""
        inherited = super().configure_callbacks()  # type: ignore[misc]
        callbacks = [inherited] if isinstance(inherited, Callback) else list(inherited or [])
        trainer = self.trainer  # type: ignore[attr-defined]
        present = list(trainer.callbacks) + callbacks
        if not any(isinstance(cb, GSGDCallback) for cb in present):
            callbacks.append(self.configure_gsgd())
        return callbacks
