"""Datasets, the resumable train loader and the DataModule base the ProSG DataModules share.

Every DataModule (``prosg.data.ConstructedDataModule``, ``JSONLDataModule``, ``StoredDataModule``)
is usable from YAML as ``class_path: prosg.data.<Name>`` + ``init_args``, and exposes
``vocab_size``, ``pad_id``, ``bucket_edges``, ``tasks`` (slice names), ``n_facts_values`` and
``max_len`` right after construction (no ``setup`` needed), so a LightningCLI can link them to the
model and metrics at instantiation.

DDP: the loaders are plain map-style datasets; Lightning swaps in ``DistributedSampler``. Every
example is generated from its own index, so batches do not depend on worker count or rank layout.
With ``drop_last=False`` (Lightning's default) a split whose size is not divisible by the world
size is padded by repeating its first indices, so those few examples are counted twice in
metrics; choose val/test sizes divisible by the world size for exact numbers (``setup`` warns).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from prosg.data.collate import Collator
from prosg.data.tasks import Task, generate_example

SPLITS = ("train", "val", "test")


class ConstructedDataset(Dataset):
    """Map-style split of a task mixture: ``ds[i]`` generates example i on the fly, deterministically."""

    def __init__(self, tasks: list[Task], weights: list[float], seed: int, split: str, size: int) -> None:
        self.tasks, self.weights, self.seed, self.split, self.size = tasks, weights, seed, split, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"example {index} out of range for {self.split} split of size {self.size}")
        return generate_example(self.tasks, self.weights, self.seed, self.split, index)


class ListDataset(Dataset):
    """Map-style dataset over examples already in memory (JSONL or stored data)."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position Lightning stores in checkpoints (it has ``state_dict``).

    Each epoch's shuffle is seeded by (seed, epoch) instead of the global RNG, and a resumed
    run skips the batches the interrupted one already consumed, so training resumed from a
    mid-epoch checkpoint sees exactly the batches the uninterrupted run would have seen.
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self._epoch, self._served, self._skip = 0, 0, 0

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self.sampler, RandomSampler) and self.sampler.generator is not None:
            self.sampler.generator.manual_seed(self.seed * 1_000_003 + self._epoch)
        elif isinstance(self.sampler, DistributedSampler):  # under DDP: the data seed, not seed_everything
            self.sampler.seed = self.seed * 1_000_003  # Lightning calls set_epoch for the epoch part
        skip, self._skip = self._skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i < skip:  # already trained on before the checkpoint
                continue
            self._served = i + 1
            yield batch
        self._epoch, self._served = self._epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """Epoch and batches served so far (saved by Lightning in every checkpoint)."""
        return {"epoch": self._epoch, "served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``: the next iteration skips the batches already served."""
        self._epoch, self._skip = int(state["epoch"]), int(state["served"])


class BaseDataModule(L.LightningDataModule):
    """Loaders, DDP size check and display helpers shared by the ProSG DataModules."""

    batch_size: int
    num_workers: int
    pad_id: int

    def dataset(self, split: str) -> Dataset:
        """The map-style dataset of ``split`` ("train", "val" or "test")."""
        raise NotImplementedError

    def split_names(self) -> list[str]:
        """Splits that have examples."""
        raise NotImplementedError

    def _loader(self, split: str, shuffle: bool) -> DataLoader | list:
        if split != "train" and split not in self.split_names():
            return []  # no such split configured: Lightning then skips that loop
        ds = self.dataset(split)
        common = dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=Collator(self.pad_id),
            persistent_workers=self.num_workers > 0,
            pin_memory=getattr(self, "pin_memory", False),
        )
        if split == "train":
            sampler = RandomSampler(ds, generator=torch.Generator()) if shuffle else None
            return ResumableDataLoader(ds, sampler=sampler, seed=int(getattr(self, "seed", 0)), **common)
        return DataLoader(ds, shuffle=shuffle, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=getattr(self, "shuffle", True))

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader("test", shuffle=False)

    def _warn_uneven(self, sizes: dict[str, int]) -> None:
        trainer = getattr(self, "trainer", None)
        world = getattr(trainer, "world_size", 1) if trainer is not None else 1
        for split in ("val", "test"):
            n = sizes.get(split, 0)
            if world > 1 and n % world:
                warnings.warn(
                    f"{split} split has {n} examples, not divisible by world size {world}: DistributedSampler "
                    f"repeats {world - n % world} example(s), so metrics count them twice; use a {split} size "
                    f"divisible by {world} for exact numbers",
                    stacklevel=2,
                )

    @property
    def n_facts_values(self) -> list[int]:
        """Every ``n_facts`` slice label the data can hold (declares the metric slices)."""
        return sorted({int(ex["n_facts"]) for s in self.split_names() for ex in self.examples(s)})

    def examples(self, split: str) -> Iterator[dict[str, Any]]:
        """Every example of ``split`` in index order (for writing to disk)."""
        ds = self.dataset(split)
        for i in range(len(ds)):
            yield ds[i]
