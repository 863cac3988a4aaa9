"""``torch.optim.Optimizer`` classes: :class:`~.gsgd.GSGD`, the :class:`~.path_sgd.PathSGD` baseline and
:func:`~.baselines.skeleton_sgd`; argument checks and the state they add to torch's ``state_dict``.

Each class validates its arguments, keeps its hyper-parameters in ``defaults`` and calls the step
package; the math is not here.

May import: torch, :mod:`lightning_gsgd.topology` and :mod:`lightning_gsgd.step` (no Lightning).
"""
