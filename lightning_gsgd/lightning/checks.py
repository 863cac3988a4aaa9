"""Refuse Lightning set-ups that G-SGD does not support, each with one sentence that names the fix.

Lightning glue only: no G-SGD math here.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    Strategy,
    XLAStrategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException

# Checked before the allow-list: DeepSpeedStrategy and XLAStrategy subclass DDPStrategy, and
# SingleDeviceXLAStrategy subclasses SingleDeviceStrategy.
_DENIED: tuple[tuple[type, str], ...] = (
    (
        FSDPStrategy,
        "GSGDCallback does not support FSDPStrategy: FSDP1 flattens the weights into flat parameters and G-SGD "
        "needs each layer's rows; use ModelParallelStrategy (FSDP2: fully_shard in configure_model), or "
        "strategy='ddp', instead.",
    ),
    (
        DeepSpeedStrategy,
        "GSGDCallback does not support DeepSpeedStrategy: DeepSpeed shards parameters and optimizer state and "
        "steps its own optimizer, which breaks G-SGD's per-unit structure; use ModelParallelStrategy (FSDP2: "
        "fully_shard in configure_model), or strategy='ddp', instead.",
    ),
    (
        XLAStrategy,
        "GSGDCallback does not support XLA (TPU) strategies: G-SGD is only tested on CPU and CUDA; use "
        "accelerator='cpu' or accelerator='gpu' with strategy='ddp' instead.",
    ),
    (
        SingleDeviceXLAStrategy,
        "GSGDCallback does not support XLA (TPU) devices: G-SGD is only tested on CPU and CUDA; use "
        "accelerator='cpu' or accelerator='gpu' instead.",
    ),
)


def check_strategy(strategy: Strategy) -> None:
    """Raise if G-SGD cannot run under ``strategy``.

    Supported: single-device strategies, :class:`DDPStrategy` (``ddp``, ``ddp_spawn``,
    ``ddp_fork``, ``ddp_notebook``) without post-local SGD, and :class:`ModelParallelStrategy` with
    ``tensor_parallel_size=1`` (FSDP2: ``fully_shard`` over the data-parallel mesh).

    Raises:
        MisconfigurationException: The strategy is FSDP1 or DeepSpeed, uses tensor parallelism, is an
            XLA strategy, averages weights (post-local SGD), or is not one of the above.
    """
    for cls, message in _DENIED:
        if isinstance(strategy, cls):
            raise MisconfigurationException(message)
    if isinstance(strategy, ModelParallelStrategy):
        mesh = strategy.device_mesh  # set up before the setup hook runs
        if mesh["tensor_parallel"].size() > 1:
            raise MisconfigurationException(
                "GSGDCallback supports ModelParallelStrategy with FSDP2 only (tensor_parallel_size=1): tensor "
                "parallelism splits weights by columns too; use ModelParallelStrategy(tensor_parallel_size=1)."
            )
        return
    if isinstance(strategy, DDPStrategy):
        if _uses_post_local_sgd(strategy):
            raise MisconfigurationException(
                "GSGDCallback does not support post-local SGD (DDPStrategy(ddp_comm_state=PostLocalSGDState(...))): "
                "replicas then step on local gradients and average weights, so they leave G-SGD's path space; "
                "drop the ddp_comm_state, ddp_comm_hook and model_averaging_period arguments of DDPStrategy."
            )
        return
    if isinstance(strategy, SingleDeviceStrategy):
        return
    raise MisconfigurationException(
        f"GSGDCallback supports single-device, DDP and ModelParallelStrategy (FSDP2) strategies only, not "
        f"{type(strategy).__name__}; use strategy='auto' on one device, strategy='ddp' on several, or "
        "ModelParallelStrategy to shard."
    )


def shards_weights(strategy: Strategy) -> bool:
    """Whether ``strategy`` shards the weights with FSDP2 in ``configure_model`` (``ModelParallelStrategy``)."""
    return isinstance(strategy, ModelParallelStrategy)


def _uses_post_local_sgd(strategy: DDPStrategy) -> bool:
    state = getattr(strategy, "_ddp_comm_state", None)
    if state is None:
        return False
    try:
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(state, PostLocalSGDState)


def check_automatic_optimization(pl_module: pl.LightningModule) -> None:
    """Raise unless ``pl_module`` uses automatic optimization.

    Raises:
        MisconfigurationException: ``pl_module.automatic_optimization`` is False.
    """
    if not pl_module.automatic_optimization:
        raise MisconfigurationException(
            f"GSGDCallback needs automatic optimization, but {type(pl_module).__name__}.automatic_optimization "
            "is False; set it to True, or (for manual optimization) build "
            "lightning_gsgd.GSGD(params, topology=lightning_gsgd.detect_topology(model, example_input)) yourself "
            "and step it in training_step."
        )


def check_single_optimizer(optimizers: list[Any]) -> Any:
    """Return the one optimizer Lightning's automatic optimization uses.

    Raises:
        MisconfigurationException: ``configure_optimizers`` returned no optimizer or several.
    """
    if len(optimizers) != 1:
        raise MisconfigurationException(
            f"GSGDCallback needs exactly one optimizer, but configure_optimizers returned {len(optimizers)}; "
            "return a single torch.optim.SGD or lightning_gsgd.GSGD over all the model's parameters."
        )
    return optimizers[0]
