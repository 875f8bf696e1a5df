"""LightningDataModules for the constructed tasks, user JSONL data and stored datasets; collation.

All three are usable from YAML as ``class_path: prosg.data.datamodule.<Name>`` + ``init_args``. Each
exposes ``vocab_size``, ``pad_id``, ``bucket_edges``, ``tasks`` (slice names) and ``max_len`` right
after construction, so a LightningCLI can link them to the model and metrics.

Collated batch (prompt + response concatenated, right-padded):
    input_ids (B, T) long, prompt_len (B,) long, attention_mask (B, T) bool,
    answer_kind (B, T) long, distance (B, T) long, loss_weight (B, T) float  (aligned with input_ids;
    prompt and padding positions: kind 0, distance -1, weight 0; position t's label is
    input_ids[:, t], predicted from logits at t-1), task list[str], n_facts (B,) long, index (B,) long.

DDP: the loaders are plain map-style datasets; Lightning swaps in ``DistributedSampler``. Every
example is generated from its own index, so batches do not depend on worker count or rank layout.
With ``drop_last=False`` (Lightning's default) a split whose size is not divisible by the world
size is padded by repeating its first indices, so those few examples are counted twice in
metrics; choose val/test sizes divisible by the world size for exact numbers (``setup`` warns).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from prosg.data.tasks import (
    GENERATOR_VERSION,
    Task,
    byte_token_strs,
    check_bucket_edges,
    default_bucket_edges,
    generate_example,
    make_task,
)
from prosg.data.tokenizers import load_tokenizer
from prosg.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


def collate(examples: Sequence[dict[str, Any]], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Examples -> a right-padded batch dict of tensors (the batch contract above)."""
    if not examples:
        raise DataError("cannot collate an empty list of examples")
    lens = [len(ex["prompt_ids"]) + len(ex["response_ids"]) for ex in examples]
    t_max = max(lens)
    t_max = int(math.ceil(t_max / pad_to_multiple_of) * pad_to_multiple_of)
    b = len(examples)
    input_ids = torch.full((b, t_max), pad_id, dtype=torch.long)
    answer_kind = torch.zeros((b, t_max), dtype=torch.long)
    distance = torch.full((b, t_max), -1, dtype=torch.long)
    loss_weight = torch.zeros((b, t_max), dtype=torch.float32)
    attention_mask = torch.zeros((b, t_max), dtype=torch.bool)
    prompt_len = torch.empty(b, dtype=torch.long)
    for i, ex in enumerate(examples):
        p, r = len(ex["prompt_ids"]), len(ex["response_ids"])
        input_ids[i, : p + r] = torch.tensor(ex["prompt_ids"] + ex["response_ids"], dtype=torch.long)
        answer_kind[i, p : p + r] = torch.tensor(ex["answer_kind"], dtype=torch.long)
        distance[i, p : p + r] = torch.tensor(ex["distance"], dtype=torch.long)
        loss_weight[i, p : p + r] = torch.tensor(ex["loss_weight"], dtype=torch.float32)
        attention_mask[i, : p + r] = True
        prompt_len[i] = p
    return {
        "input_ids": input_ids,
        "prompt_len": prompt_len,
        "attention_mask": attention_mask,
        "answer_kind": answer_kind,
        "distance": distance,
        "loss_weight": loss_weight,
        "task": [ex["task"] for ex in examples],
        "n_facts": torch.tensor([int(ex["n_facts"]) for ex in examples], dtype=torch.long),
        "index": torch.tensor([int(ex["meta"]["index"]) for ex in examples], dtype=torch.long),
    }


class Collator:
    """Picklable ``collate_fn`` (DataLoader workers may be spawned) bound to a pad id."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate(examples, self.pad_id, self.pad_to_multiple_of)


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


class _BaseDataModule(L.LightningDataModule):
    """Loaders, DDP size check and display helpers shared by the DataModules below."""

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


class ConstructedDataModule(_BaseDataModule):
    """The constructed prompt-forgetting tasks (recall / copy / instruction, or a weighted mixture).

    ``tasks``: one task spec or a list, each ``{name: recall, weight: 1.0, **knobs}`` (see
    ``prosg.data.tasks``). Val/test may differ from train to measure length generalisation of
    memory: ``eval_distance_scale`` makes their responses (and query distances) that many times
    longer, then ``val_overrides`` / ``test_overrides`` set knobs directly (applied to every task that
    has the knob; ``test_overrides`` defaults to ``val_overrides``). ``bucket_edges`` defaults to the
    doubling edges [0, 16, 32, ...] up to the longest response of any split (or, if tasks set
    ``bucket_edges``, the union of those).
    """

    def __init__(
        self,
        tasks: list[dict] | dict | None = None,
        train_size: int = 8192,
        val_size: int = 512,
        test_size: int = 512,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        eval_distance_scale: float = 1.0,
        val_overrides: dict | None = None,
        test_overrides: dict | None = None,
        bucket_edges: list[int] | None = None,
        shuffle: bool = True,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        specs = [{"name": "recall"}] if tasks is None else [tasks] if isinstance(tasks, dict) else list(tasks)
        if not specs:
            raise ConfigError("tasks is empty; give at least one task spec, e.g. [{name: recall}]")
        counts = {"train_size": train_size, "val_size": val_size, "test_size": test_size, "num_workers": num_workers, "seed": seed}
        for knob, v in counts.items():
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{knob}={v!r} must be an int >= 0")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be an int >= 1")
        if not eval_distance_scale > 0:
            raise ConfigError(f"eval_distance_scale={eval_distance_scale} must be > 0 (1 = same as train)")

        self.weights: list[float] = []
        train_tasks: list[Task] = []
        for spec in specs:
            spec = dict(spec)
            w = spec.pop("weight", 1.0)
            if not isinstance(w, (int, float)) or w <= 0:
                raise ConfigError(f"task weight {w!r} in {spec} must be a number > 0")
            self.weights.append(float(w))
            train_tasks.append(make_task(spec))
        val_overrides = dict(val_overrides or {})
        test_overrides = val_overrides if test_overrides is None else dict(test_overrides)
        self.split_tasks: dict[str, list[Task]] = {
            "train": train_tasks,
            "val": self._eval_tasks(train_tasks, eval_distance_scale, val_overrides, "val_overrides"),
            "test": self._eval_tasks(train_tasks, eval_distance_scale, test_overrides, "test_overrides"),
        }
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.shuffle, self.pin_memory = shuffle, pin_memory

        all_tasks = [t for ts in self.split_tasks.values() for t in ts]
        self.vocab_size: int = max(t.vocab_size for t in all_tasks)
        # One pad id per batch: the first task's. Pad positions are masked and weightless, so in a
        # mixture whose tasks pad differently any id < vocab_size would do.
        self.pad_id: int = train_tasks[0].pad_id
        self.tasks: list[str] = list(dict.fromkeys(t.name for t in train_tasks))
        self.max_len: int = max(t.max_prompt_len + t.max_response_len for t in all_tasks)
        self.bucket_edges: list[int] = (
            check_bucket_edges(bucket_edges) if bucket_edges is not None else self._default_edges(all_tasks)
        )
        self._datasets: dict[str, ConstructedDataset] = {}

    @staticmethod
    def _default_edges(tasks: list[Task]) -> list[int]:
        """Union of the tasks' explicit ``bucket_edges`` if any set them, else doubling up to the longest response."""
        explicit = [t.bucket_edges for t in tasks if getattr(t, "bucket_edges", None) is not None]
        if explicit:
            return sorted({e for edges in explicit for e in edges})
        return default_bucket_edges(max(t.max_response_len for t in tasks))

    @staticmethod
    def _eval_tasks(tasks: list[Task], scale: float, overrides: dict, knob: str) -> list[Task]:
        known = set().union(*(t.to_dict() for t in tasks)) - {"name"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"{knob} has knob(s) {unknown} that no task has; valid: {sorted(known)}")
        return [t.scaled(scale).with_overrides(overrides) for t in tasks]

    def setup(self, stage: str | None = None) -> None:
        self._warn_uneven(self.sizes)

    def dataset(self, split: str) -> ConstructedDataset:
        if split not in self._datasets:
            self._datasets[split] = ConstructedDataset(
                self.split_tasks[split], self.weights, self.seed, split, self.sizes[split]
            )
        return self._datasets[split]

    def dataset_info(self) -> dict[str, Any]:
        """What a stored copy must record to be reproduced and decoded (for the manifest)."""
        return {
            "source": "constructed",
            "generator_version": GENERATOR_VERSION,
            "seed": self.seed,
            "weights": self.weights,
            "splits": {s: [t.to_dict() for t in ts] for s, ts in self.split_tasks.items()},
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "bucket_edges": self.bucket_edges,
            "max_len": self.max_len,
            "tasks": self.tasks,
        }

    def split_names(self) -> list[str]:
        """Splits with at least one example."""
        return [s for s in SPLITS if self.sizes[s] > 0]

    @property
    def n_facts_values(self) -> list[int]:
        """The ``n_facts`` slice labels of every configured task, without generating examples."""
        return sorted({t.slice_n for ts in self.split_tasks.values() for t in ts})

    def decode_tokens(self, example: dict[str, Any], ids: list[int]) -> tuple[list[str], str]:
        """Readable strings for ``ids`` of ``example`` and the joiner to print them with."""
        task = self.split_tasks[example["meta"]["split"]][example["meta"]["task_id"]]
        return task.token_strs(ids), task.joiner


def _tokenizer_strs(tok: Any, ids: list[int]) -> list[str]:
    """Per-token display strings; byte-level tokenizers keep multi-byte characters whole."""
    from prosg.data.tokenizers import ByteTokenizer

    if isinstance(tok, ByteTokenizer):
        return byte_token_strs(ids, {v: k for k, v in tok.special_ids.items()})
    return [tok.decode([i]) for i in ids]


class JSONLDataModule(_BaseDataModule):
    """User data: JSONL lines ``{"prompt": str, "response": str}``, validated eagerly in ``setup``.

    Optional per-line fields: ``task`` (slice name, default ``"jsonl"``), ``answer_kind`` (0, 1 or 2
    for every response token; default 1 = scored as a local answer; 2 = prompt answer, distance =
    index in the response) and ``loss_weight`` (number >= 0, default 1). Prompts are
    ``<bos> prompt <sep>`` when the tokenizer has those ids and ``add_special_tokens``.
    ``max_prompt_len`` / ``max_response_len`` count tokens (prompt specials included); ``overlong:
    truncate`` keeps the head (prompt: head + ``<sep>``). ``empty_prompt: skip`` drops such lines.
    """

    def __init__(
        self,
        train_path: str,
        val_path: str | None = None,
        test_path: str | None = None,
        tokenizer: str | None = None,
        max_prompt_len: int = 1024,
        max_response_len: int = 1024,
        overlong: str = "error",
        empty_prompt: str = "error",
        batch_size: int = 8,
        num_workers: int = 0,
        add_special_tokens: bool = True,
        bucket_edges: list[int] | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if overlong not in ("error", "truncate"):
            raise ConfigError(f"overlong={overlong!r}; use 'error' or 'truncate'")
        if empty_prompt not in ("error", "skip"):
            raise ConfigError(f"empty_prompt={empty_prompt!r}; use 'error' or 'skip'")
        if max_prompt_len < 3 or max_response_len < 1:
            raise ConfigError(
                f"max_prompt_len={max_prompt_len} must be >= 3 and max_response_len={max_response_len} >= 1"
            )
        if batch_size < 1 or num_workers < 0:
            raise ConfigError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")
        self.paths = {"train": train_path, "val": val_path, "test": test_path}
        self.tokenizer_spec = tokenizer
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_prompt_len, self.max_response_len = max_prompt_len, max_response_len
        self.overlong, self.empty_prompt = overlong, empty_prompt
        self.batch_size, self.num_workers, self.shuffle = batch_size, num_workers, shuffle
        self.add_special_tokens = add_special_tokens
        self.vocab_size: int = int(self.tokenizer.vocab_size)
        self.pad_id: int = int(getattr(self.tokenizer, "pad_id", None) or 0)
        self.max_len: int = max_prompt_len + max_response_len
        self.bucket_edges: list[int] = (
            check_bucket_edges(bucket_edges) if bucket_edges is not None else default_bucket_edges(max_response_len)
        )
        self.tasks: list[str] = ["jsonl"]  # updated with per-line task names once loaded
        self._data: dict[str, list[dict[str, Any]]] = {}
        self.skipped: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        by_stage = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        wanted = by_stage.get(stage or "", SPLITS)
        for split in wanted:
            if self.paths[split] is not None and split not in self._data:
                self._data[split] = self._read(split)
        self.tasks = list(dict.fromkeys(ex["task"] for exs in self._data.values() for ex in exs)) or self.tasks
        self._warn_uneven({s: len(v) for s, v in self._data.items()})

    def dataset(self, split: str) -> ListDataset:
        if self.paths[split] is None:
            raise ConfigError(f"no {split}_path configured for JSONLDataModule; set {split}_path: to a .jsonl file")
        if split not in self._data:
            self._data[split] = self._read(split)
        return ListDataset(self._data[split])

    def split_names(self) -> list[str]:
        return [s for s in SPLITS if self.paths[s] is not None]

    def _read(self, split: str) -> list[dict[str, Any]]:
        path = Path(self.paths[split])
        if not path.is_file():
            raise DataError(f"{split}_path {str(path)!r} does not exist; point {split}_path at a JSONL file")
        out: list[dict[str, Any]] = []
        skipped = 0
        with path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                ex = self._parse_line(path, lineno, line, index=len(out))
                if ex is None:
                    skipped += 1
                else:
                    out.append(ex)
        if not out:
            raise DataError(
                f"{path}: no usable examples ({skipped} skipped); add lines {{\"prompt\": ..., \"response\": ...}}"
            )
        self.skipped[split] = skipped
        return out

    def _parse_line(self, path: Path, lineno: int, line: str, index: int) -> dict[str, Any] | None:
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: bad JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
            ) from None
        if not isinstance(rec, dict):
            raise DataError(
                f"{where}: expected a JSON object {{\"prompt\": ..., \"response\": ...}}, got {type(rec).__name__}"
            )
        for key in ("prompt", "response"):
            if key not in rec:
                raise DataError(f"{where}: missing key {key!r}; each line needs \"prompt\" and \"response\" strings")
            if not isinstance(rec[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(rec[key]).__name__}")
        task = rec.get("task", "jsonl")
        kind = rec.get("answer_kind", 1)
        weight = rec.get("loss_weight", 1.0)
        if not isinstance(task, str) or not task:
            raise DataError(f"{where}: optional 'task' must be a non-empty string, got {task!r}")
        if kind not in (0, 1, 2) or isinstance(kind, bool):
            raise DataError(f"{where}: optional 'answer_kind' must be 0, 1 or 2, got {kind!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise DataError(f"{where}: optional 'loss_weight' must be a number >= 0, got {weight!r}")
        if not rec["prompt"].strip():
            if self.empty_prompt == "skip":
                return None
            raise DataError(f"{where}: empty prompt; fill it in, or set empty_prompt: skip to drop such lines")
        if not rec["response"]:
            raise DataError(f"{where}: empty response, nothing to score; remove the line or give it a response")

        tok = self.tokenizer
        bos = getattr(tok, "bos_id", None) if self.add_special_tokens else None
        sep = getattr(tok, "sep_id", None) if self.add_special_tokens else None
        body = tok.encode(rec["prompt"])
        prompt = ([bos] if bos is not None else []) + body + ([sep] if sep is not None else [])
        response = tok.encode(rec["response"])
        if len(prompt) > self.max_prompt_len:
            if self.overlong == "error":
                raise DataError(
                    f"{where}: prompt is {len(prompt)} tokens, over max_prompt_len={self.max_prompt_len}; "
                    "raise max_prompt_len or set overlong: truncate"
                )
            keep = self.max_prompt_len - (sep is not None)
            prompt = prompt[:keep] + ([sep] if sep is not None else [])
        if len(response) > self.max_response_len:
            if self.overlong == "error":
                raise DataError(
                    f"{where}: response is {len(response)} tokens, over max_response_len={self.max_response_len}; "
                    "raise max_response_len or set overlong: truncate"
                )
            response = response[: self.max_response_len]
        r = len(response)
        return {
            "prompt_ids": prompt,
            "response_ids": response,
            "answer_kind": [kind] * r,
            "distance": list(range(r)) if kind == 2 else [-1] * r,
            "loss_weight": [float(weight)] * r,
            "task": task,
            "n_facts": 0,
            "meta": {"source": str(path), "line": lineno, "index": index},
        }

    def dataset_info(self) -> dict[str, Any]:
        return {
            "source": "jsonl",
            "paths": self.paths,
            "tokenizer": self.tokenizer_spec,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "bucket_edges": self.bucket_edges,
            "max_len": self.max_len,
            "tasks": self.tasks,
        }

    def decode_tokens(self, example: dict[str, Any], ids: list[int]) -> tuple[list[str], str]:
        return _tokenizer_strs(self.tokenizer, ids), ""


class StoredDataModule(_BaseDataModule):
    """A dataset written by ``prosg data build`` / ``write_dataset``, checksums verified on load."""

    def __init__(self, path: str, batch_size: int = 32, num_workers: int = 0, verify: bool = True,
                 shuffle: bool = True, bucket_edges: list[int] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        from prosg.data.store import read_manifest

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
        self._data: dict[str, list[dict[str, Any]]] = {}
        self._split_tasks: dict[str, list[Task]] | None = None

    def setup(self, stage: str | None = None) -> None:
        from prosg.data.store import read_dataset

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

    def dataset_info(self) -> dict[str, Any]:
        return dict(self.manifest["info"])

    def decode_tokens(self, example: dict[str, Any], ids: list[int]) -> tuple[list[str], str]:
        info = self.manifest["info"]
        if info.get("source") == "constructed":
            if self._split_tasks is None:
                self._split_tasks = {s: [make_task(d) for d in ds] for s, ds in info["splits"].items()}
            task = self._split_tasks[example["meta"]["split"]][example["meta"]["task_id"]]
            return task.token_strs(ids), task.joiner
        if info.get("source") == "jsonl":
            return _tokenizer_strs(load_tokenizer(info.get("tokenizer")), ids), ""
        return [str(i) for i in ids], " "
