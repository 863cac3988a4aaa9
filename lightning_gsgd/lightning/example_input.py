"""Find an example input for topology detection: ``example_input_array`` or the first training batch.

Lightning glue only: no G-SGD math here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

_HOW_TO_FIX = (
    "set self.example_input_array in your LightningModule's __init__ to a batch that its forward accepts "
    "(e.g. torch.zeros(2, n_features))"
)


def example_input(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """An input batch for ``pl_module``'s forward, on the module's device and in its precision.

    ``pl_module.example_input_array`` when set; otherwise the input part of the first training batch
    (its first element if the batch is a tuple or list, the batch itself if it is a tensor), built
    from the first samples of the training dataset so that no sampler, data order or random state
    changes.

    Raises:
        MisconfigurationException: There is no ``example_input_array`` and no input can be taken
            from the training data.
    """
    x = pl_module.example_input_array
    if x is None:
        batch = trainer.strategy.batch_to_device(_first_training_batch(trainer))
        x = _input_of(batch)
    else:
        x = trainer.strategy.batch_to_device(x)
    return trainer.precision_plugin.convert_input(x)


def _first_training_batch(trainer: pl.Trainer) -> Any:
    trainer.fit_loop.setup_data()
    loaders = trainer.train_dataloader
    loader = _first_loader(loaders)
    if loader is None:
        raise MisconfigurationException(
            f"GSGDCallback needs an example input to find the model's ReLU chains and found no training "
            f"DataLoader to take one from; {_HOW_TO_FIX}."
        )
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise MisconfigurationException(
            "GSGDCallback needs an example input to find the model's ReLU chains and cannot take one from an "
            f"IterableDataset without consuming it; {_HOW_TO_FIX}."
        )
    with isolate_rng():  # a dataset's random augmentation must not shift the training run's random state
        if loader.batch_size is None and loader.batch_sampler is None:
            if isinstance(loader.sampler, BatchSampler):
                # DataLoader(ds, sampler=BatchSampler(...), batch_size=None): the dataset is indexed with
                # a list of indices per batch. Build that list here rather than drawing from the sampler,
                # whose iteration could advance its own generator and change the data order.
                n = min(loader.sampler.batch_size, len(dataset))  # type: ignore[arg-type]
                return loader.collate_fn(dataset[list(range(n))])
            return loader.collate_fn(dataset[0])  # the dataset yields whole batches
        n = min(loader.batch_size or 1, len(dataset))  # type: ignore[arg-type]
        return loader.collate_fn([dataset[i] for i in range(n)])


def _first_loader(loaders: Any) -> DataLoader | None:
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, Sequence) and not isinstance(loaders, str):
        for item in loaders:
            found = _first_loader(item)
            if found is not None:
                return found
    return None


def _input_of(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise MisconfigurationException(
        f"GSGDCallback cannot tell which part of a {type(batch).__name__} batch is the model's input; {_HOW_TO_FIX}."
    )
