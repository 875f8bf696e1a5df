"""``ConstructedDataModule``: the constructed tasks of ``prosg.data.tasks``, generated on the fly."""

from __future__ import annotations

from typing import Any

from prosg.data.loaders import SPLITS, BaseDataModule, ConstructedDataset
from prosg.data.tasks import GENERATOR_VERSION, Task, check_bucket_edges, make_task
from prosg.errors import ConfigError


class ConstructedDataModule(BaseDataModule):
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
            "train": [t.for_split("train") for t in train_tasks],
            "val": self._eval_tasks(train_tasks, eval_distance_scale, val_overrides, "val_overrides", "val"),
            "test": self._eval_tasks(train_tasks, eval_distance_scale, test_overrides, "test_overrides", "test"),
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
            check_bucket_edges(bucket_edges) if bucket_edges is not None else self._default_edges()
        )
        self._datasets: dict[str, ConstructedDataset] = {}

    def _default_edges(self) -> list[int]:
        """Each task's explicit ``bucket_edges`` (union), else doubling edges up to the longest distance
        generated, with each training task's longest distance + 1 as an edge (it replaces a doubling
        edge within 25 % of it), so the buckets past it hold only distances training never asked."""
        # plain-text tasks score nothing at a distance: their lengths leave the buckets alone
        scored = {s: [t for t in ts if t.prompt_answers] or ts for s, ts in self.split_tasks.items()}
        tasks = [t for ts in scored.values() for t in ts]
        if any(getattr(t, "bucket_edges", None) is not None for t in tasks):
            return sorted({e for t in tasks for e in t.edges})
        edges = sorted({e for t in tasks for e in t.edges})
        top = edges[-1]
        for b in sorted({t.edges[-1] for t in scored["train"]}):
            if b < top:
                edges = [e for e in edges if e in (0, top) or max(e, b) / min(e, b) >= 1.25] + [b]
        return sorted(set(edges))

    @staticmethod
    def _eval_tasks(tasks: list[Task], scale: float, overrides: dict, knob: str, split: str) -> list[Task]:
        known = set().union(*(t.to_dict() for t in tasks)) - {"name"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"{knob} has knob(s) {unknown} that no task has; valid: {sorted(known)}")
        return [t.scaled(scale).with_overrides(overrides).for_split(split) for t in tasks]

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

    def token_names(self, ids: list[int]) -> list[str]:
        """Readable names of ``ids`` (``k3``, ``v5``, ``<ask>``) in the first training task's vocabulary."""
        return self.split_tasks["train"][0].token_strs(ids)
