"""One training run of the study, through Lightning: ``RunConfig`` in, a JSON-ready result out.

Initialization is identical across methods for a given seed: the model is built under
``torch.manual_seed(seed)`` (inside ``torch.random.fork_rng``, so the caller's generator is left
alone); skeleton methods then get ``init_skeleton_``; the invariance experiment then rescales
every hidden unit by factors ``exp(U(-s, s))`` drawn from a generator seeded with ``seed`` (the
same factors for every method), and, on a topology of the exact BatchNorm mode, every row of the
layers whose rows go only into BatchNorm (S2) by further factors from the same generator. The
training order comes from :class:`StudyData` with ``seed``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from experiments.study.data import Splits, StudyData, load_splits
from experiments.study.methods import Method, bn_mode_of, get_method, gsgd_callback
from experiments.study.models import build_model
from experiments.study.module import StudyModule
from lightning_gsgd import Topology, detect_topology, init_skeleton_, random_unit_factors, rescale_hidden_units_
from lightning_gsgd.topology.skeleton import rescale_normalized_rows_

RESCALE_SEED_OFFSET = 1_000_003  # factors' generator seed = seed + offset (independent of the init stream)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run (and nothing else: equal configs give equal results).

    Attributes:
        method: A key of :data:`experiments.study.methods.METHODS`.
        lr: Learning rate (peak lr with the cosine schedule).
        seed: Seeds the initialization, the rescaling factors and the training order.
        dataset: ``"mnist1d"``, ``"digits"`` or ``"mnist"``.
        model: A key of :data:`experiments.study.models.MODELS`.
        model_kwargs: Keyword arguments of the model, as sorted ``(name, value)`` pairs.
        momentum: Momentum.
        weight_decay: Weight decay.
        schedule: ``"constant"`` or ``"cosine"``.
        epochs: Training epochs.
        batch_size: Training batch size.
        rescale_spread: ``s`` of the rescaling factors ``exp(U(-s, s))``; 0 for none.
        limit_train_batches: Batches per epoch (``None``: all); for smoke tests.
        gsgd_kwargs: Extra ``GSGDCallback`` arguments, as sorted ``(name, value)`` pairs.
    """

    method: str
    lr: float
    seed: int = 0
    dataset: str = "mnist1d"
    model: str = "mlp2"
    model_kwargs: tuple[tuple[str, Any], ...] = ()
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    epochs: int = 30
    batch_size: int = 128
    rescale_spread: float = 0.0
    limit_train_batches: int | None = None
    gsgd_kwargs: tuple[tuple[str, Any], ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (kwargs as dicts)."""
        d = dataclasses.asdict(self)
        d["model_kwargs"] = dict(self.model_kwargs)
        d["gsgd_kwargs"] = dict(self.gsgd_kwargs)
        return d

    def run_id(self) -> str:
        """A stable short hash of the config (used to skip runs already stored)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def kw(**kwargs: Any) -> tuple[tuple[str, Any], ...]:
    """Keyword arguments as the sorted, hashable pairs :class:`RunConfig` stores."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))


def initial_model(cfg: RunConfig, splits: Splits) -> tuple[nn.Module, Topology | None]:
    """The run's model with its initial weights, and its topology when the method needs one.

    Raises:
        lightning_gsgd.TopologyError: The method needs a topology and none can be detected.
    """
    method = get_method(cfg.method)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, splits.n_features, splits.n_classes, **dict(cfg.model_kwargs))
    mode = bn_mode_of(method, dict(cfg.gsgd_kwargs))
    topology = None
    if method.needs_topology:
        # the callback's BN mode, so that a BN model is detected here as the callback sees it
        topology = detect_topology(model, splits.x_train[:2], bn_mode=mode)
    if method.skeleton:
        assert topology is not None
        init_skeleton_(topology)
    if cfg.rescale_spread > 0:
        # the factors come from the run's BN mode, not the method's: every method gets the same start
        run_mode = dict(cfg.gsgd_kwargs).get("bn_mode", "sgd")
        scaled = topology
        if scaled is None or mode != run_mode:
            scaled = detect_topology(model, splits.x_train[:2], bn_mode=run_mode)
        gen = torch.Generator().manual_seed(cfg.seed + RESCALE_SEED_OFFSET)
        rescale_hidden_units_(scaled, random_unit_factors(scaled, cfg.rescale_spread, gen))
        rescale_normalized_rows_(scaled, cfg.rescale_spread, gen)
    return model, topology


def _callbacks(cfg: RunConfig, method: Method) -> list[L.Callback]:
    if not method.converted:
        return []
    return [gsgd_callback(**{**dict(cfg.gsgd_kwargs), "bn_mode": bn_mode_of(method, dict(cfg.gsgd_kwargs))})]


def run_one(cfg: RunConfig, accelerator: str = "auto") -> dict[str, Any]:
    """Train and test one configuration through Lightning.

    Args:
        cfg: The run.
        accelerator: Lightning accelerator (the study's numbers come from ``"cpu"``).

    Returns:
        ``{"id", "config", "history", "val_loss", "val_acc", "test_loss", "test_acc", "diverged",
        "optimizer", "wall_s", "fit_s", "steps", "threads", "loadavg"}`` plus G-SGD counters when the
        optimizer has them.

    Raises:
        RuntimeError: The callback of a G-space method (``gsgd``, ``gadam``, ``gadamw``) is missing or
            did not turn the optimizer into ``GSGD``, ``GAdam`` or ``GAdamW``.
    """
    t0 = time.perf_counter()
    method = get_method(cfg.method)
    splits = load_splits(cfg.dataset)
    data = StudyData(splits, batch_size=cfg.batch_size, seed=cfg.seed)
    model, topology = initial_model(cfg, splits)
    steps_per_epoch = data.steps_per_epoch()
    if cfg.limit_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.limit_train_batches)
    module = StudyModule(
        model,
        method,
        cfg.lr,
        cfg.momentum,
        cfg.weight_decay,
        cfg.schedule,
        total_steps=steps_per_epoch * cfg.epochs,
        topology=topology,
    )
    # The callback detects the topology on this batch. Without it, it would take one from the training
    # loader, whose dataset is indexed by the BatchSampler with index lists: it would get one sample
    # without its batch dimension, which the BN ResNet's forward cannot take.
    module.example_input_array = splits.x_train[:2]
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=cfg.epochs,
        limit_train_batches=cfg.limit_train_batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=_callbacks(cfg, method),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        tf = time.perf_counter()
        trainer.fit(module, datamodule=data)
        fit_s = time.perf_counter() - tf
        opt = trainer.optimizers[0]
        if method.converted and type(opt).__name__ != method.trained_with:
            raise RuntimeError(f"{cfg.method} run trained with {type(opt).__name__}: the callback did not convert it")
        trainer.test(module, datamodule=data, verbose=False)
    last = module.history[-1] if module.history else {}
    result: dict[str, Any] = {
        "id": cfg.run_id(),
        "config": cfg.to_dict(),
        "history": module.history,
        "val_loss": last.get("val_loss", math.nan),
        "val_acc": last.get("val_acc", math.nan),
        "test_loss": module.test_metrics.get("test_loss", math.nan),
        "test_acc": module.test_metrics.get("test_acc", math.nan),
        "diverged": module.diverged or not math.isfinite(last.get("val_loss", math.nan)),
        "optimizer": type(opt).__name__,
        "steps": int(trainer.global_step),
        "fit_s": fit_s,
        "wall_s": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg()[0],
    }
    for counter in ("guard_hits", "skipped_steps"):
        value = getattr(opt, counter, None)  # G-space optimizers count these; torch's do not
        if isinstance(value, int):
            result[counter] = value
    return result
