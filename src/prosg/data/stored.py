"""``StoredDataModule``: a dataset written to disk by ``prosg data build`` (format: ``prosg.data.store``)."""

from __future__ import annotations

from typing import Any

from prosg.data.loaders import BaseDataModule, ListDataset
from prosg.data.store import read_dataset, read_manifest
from prosg.data.tasks import Task, check_bucket_edges, make_task, tokenizer_token_strs
from prosg.data.tokenizers import load_tokenizer
from prosg.errors import ConfigError


class StoredDataModule(BaseDataModule):
    """A dataset written by ``prosg data build`` / ``write_dataset``, checksums verified on load.

    The linked facts come from the manifest, so they are known at construction; the examples are
    read (and verified) in ``setup``. ``n_facts_values`` is read off the examples only for a set
    written from bare examples (the manifest of a constructed or JSONL source determines it).
    """

    def __init__(self, path: str, batch_size: int = 32, num_workers: int = 0, verify: bool = True,
                 shuffle: bool = True, bucket_edges: list[int] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.path = path
        self.manifest = read_manifest(path)
        self.batch_size, self.num_workers, self.verify, self.shuffle = batch_size, num_workers, verify, shuffle
        info = self.manifest["info"]
        self.vocab_size: int = int(info["vocab_size"])
        self.pad_id: int = int(info["pad_id"])
        self.max_len: int = int(info["max_len"])
        self.tasks: list[str] = list(info["tasks"])
        self.bucket_edges: list[int] = check_bucket_edges(
            bucket_edges if bucket_edges is not None else info["bucket_edges"]
        )
        # The task configs of every split of a constructed source (None for other sources).
        self.split_tasks: dict[str, list[Task]] | None = (
            {s: [make_task(d) for d in ds] for s, ds in info["splits"].items()}
            if info.get("source") == "constructed" else None
        )
        self._data: dict[str, list[dict[str, Any]]] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self._data:
            self._data = read_dataset(self.path, verify=self.verify)
        self._warn_uneven({s: len(v) for s, v in self._data.items()})

    def dataset(self, split: str) -> ListDataset:
        if not self._data:
            self.setup()
        if split not in self._data:
            raise ConfigError(
                f"{self.path} has no {split} split (has {sorted(self._data)}); rebuild with --splits including {split}"
            )
        return ListDataset(self._data[split])

    def split_names(self) -> list[str]:
        return list(self.manifest["counts"])

    @property
    def n_facts_values(self) -> list[int]:
        """As the source DataModule declared them: its tasks' slice labels, 0 for JSONL lines."""
        if self.split_tasks is not None:
            return sorted({t.slice_n for ts in self.split_tasks.values() for t in ts})
        if self.manifest["info"].get("source") == "jsonl":
            return [0]
        return super().n_facts_values  # bare examples: only the data knows

    def dataset_info(self) -> dict[str, Any]:
        return dict(self.manifest["info"])

    def decode_tokens(self, example: dict[str, Any], ids: list[int]) -> tuple[list[str], str]:
        info = self.manifest["info"]
        if self.split_tasks is not None:
            task = self.split_tasks[example["meta"]["split"]][example["meta"]["task_id"]]
            return task.token_strs(ids), task.joiner
        if info.get("source") == "jsonl":
            return tokenizer_token_strs(load_tokenizer(info.get("tokenizer")), ids), ""
        return [str(i) for i in ids], " "
