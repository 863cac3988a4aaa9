"""Lightning glue only: :class:`~.callback.GSGDCallback`, :class:`~.mixin.GSGDMixin`, the strategy and
module checks, the example input, the optimizer swap and the diagnostics logger. No G-SGD math here.

May import: everything (Lightning included). Nothing else in the package imports this subpackage,
except ``lightning_gsgd.__getattr__`` on first use of ``GSGDCallback`` / ``GSGDMixin``.
"""
