"""What every constructed task shares: the ``Task`` base, per-example RNG, specials, the registry.

Also the distance bucket-edge helpers and the token-display helpers (synthetic ids, bytes, any
tokenizer). ``make_task`` builds a task from ``{name: ..., **knobs}`` through ``TASKS``, which each
task module fills with ``@register_task``; ``generate_example`` draws example ``index`` of a split.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from typing import Any, ClassVar

import numpy as np

from prosg.data.tokenizers import ByteTokenizer, Tokenizer
from prosg.errors import ConfigError

# Bump when any generator's output for a given (config, seed, split, index) changes.
GENERATOR_VERSION = "2"  # 2: one controlled prompt query per example, distinct prompt values, value sets

SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "predict": 3}

# Synthetic specials shared by recall and copy, so a mixture of the two shares one vocabulary.
PAD, BOS, SEP, SET, ASK = 0, 1, 2, 3, 4
SPECIAL_NAMES = ("<pad>", "<bos>", "<sep>", "<set>", "<ask>")
N_SPECIAL = len(SPECIAL_NAMES)


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The private RNG of example ``index`` of ``split``: depends on nothing else."""
    if split not in SPLIT_IDS:
        raise ConfigError(f"unknown split {split!r}; use one of {list(SPLIT_IDS)}")
    if index < 0 or seed < 0:
        raise ConfigError(f"seed ({seed}) and example index ({index}) must be >= 0")
    return np.random.default_rng([int(seed), SPLIT_IDS[split], int(index)])


def default_bucket_edges(end: int, first: int = 16) -> list[int]:
    """Doubling distance edges [0, 16, 32, 64, ...] up to ``end``; a doubling edge within 25 % of
    ``end`` is dropped, so the last bucket is never a sliver."""
    edges, e = [0], first
    while e < end:
        edges.append(e)
        e *= 2
    if len(edges) > 1 and end / edges[-1] < 1.25:
        edges.pop()
    edges.append(max(end, 1))
    return edges


def check_bucket_edges(edges: list[int], knob: str = "bucket_edges") -> list[int]:
    """Validate distance bucket edges: >= 2 strictly increasing non-negative ints."""
    edges = [int(e) for e in edges]
    if len(edges) < 2 or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(
            f"{knob}={edges} must be >= 2 strictly increasing non-negative ints, e.g. [0, 16, 32, 64, 128]"
        )
    return edges


def require(cond: bool, msg: str) -> None:
    """Raise ``ConfigError(msg)`` unless ``cond`` (knob validation in the tasks' ``__post_init__``)."""
    if not cond:
        raise ConfigError(msg)


class Task:
    """Base of the task configs: vocabulary facts, generation, token rendering."""

    name: ClassVar[str]
    joiner: ClassVar[str] = " "  # how ``token_strs`` are joined for display
    prompt_answers: ClassVar[bool] = True  # False: plain text, nothing scored against the prompt (no distances)

    def generate(self, rng: np.random.Generator) -> dict[str, Any]:
        """One example (without ``meta``) drawn from ``rng``."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def slice_n(self) -> int:
        """The example's ``n_facts`` slice label: how much the prompt holds."""
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        return PAD

    @property
    def max_prompt_len(self) -> int:
        raise NotImplementedError

    @property
    def max_response_len(self) -> int:
        raise NotImplementedError

    @property
    def max_distance(self) -> int:
        """The largest distance a scored prompt answer can have (edges end just past it)."""
        return self.max_response_len - 1

    @property
    def edges(self) -> list[int]:
        """Distance bucket edges: explicit ``bucket_edges``, or doubling up to the distances generated."""
        explicit = getattr(self, "bucket_edges", None)
        return list(explicit) if explicit is not None else default_bucket_edges(self.max_distance + 1)

    def shortcut_baselines(self, answer_index: int) -> dict[str, float]:
        """Expected accuracy of each shortcut solver (``prosg.data.audit``) on the ``answer_index``-th
        prompt answer of an example, if nothing but the prompt decides it (the analytic baseline)."""
        raise NotImplementedError

    def scaled(self, scale: float) -> "Task":
        """The same task with its response (and query distances) ``scale`` times longer."""
        raise NotImplementedError

    def token_strs(self, ids: list[int]) -> list[str]:
        """Readable string per token id (for ``prosg data show``)."""
        raise NotImplementedError

    def for_split(self, split: str) -> "Task":
        """The task as ``split`` generates it (a text task reads that split of its corpus); default: itself."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable knobs, with ``name``; ``make_task`` inverts it."""
        return {"name": self.name, **dataclasses.asdict(self)}

    def with_overrides(self, overrides: dict[str, Any]) -> "Task":
        """A copy with the knobs in ``overrides`` that this task has (re-validated)."""
        mine = {k: v for k, v in overrides.items() if k in {f.name for f in dataclasses.fields(self)}}
        return dataclasses.replace(self, **mine) if mine else self

    def _finish(self, prompt: list[int], response: list[int], kind: list[int], dist: list[int],
                weight: list[float], n_facts: int, candidates: list[int], chance: float) -> dict[str, Any]:
        return {
            "prompt_ids": [int(t) for t in prompt],
            "response_ids": [int(t) for t in response],
            "answer_kind": [int(k) for k in kind],
            "distance": [int(d) for d in dist],
            "loss_weight": [float(w) for w in weight],
            "task": self.name,
            "n_facts": int(n_facts),
            "candidates": [int(c) for c in candidates],
            "chance": float(chance),
        }


class ByteTask(Task):
    """A task written as text and tokenized as UTF-8 bytes (``ByteTokenizer``: ids 0..259, pad 256)."""

    joiner: ClassVar[str] = ""

    @property
    def tokenizer(self) -> ByteTokenizer:
        return ByteTokenizer()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    def token_strs(self, ids: list[int]) -> list[str]:
        return byte_token_strs(ids, {v: k for k, v in self.tokenizer.special_ids.items()})


def draw_distance(rng: np.random.Generator, allowed: list[int], edges: list[int]) -> int:
    """One of ``allowed`` distances: a distance bucket uniformly, then a distance in it uniformly.

    So every bucket is equally covered and nothing about the example (which fact, which query)
    correlates with the distance; distances past the last edge form one more bucket.
    """
    groups = _bucket_groups(tuple(allowed), tuple(edges))
    group = groups[int(rng.integers(len(groups)))]
    return group[int(rng.integers(len(group)))]


@functools.lru_cache(maxsize=256)
def _bucket_groups(allowed: tuple[int, ...], edges: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    # the distances of each non-empty bucket, buckets in order (cached: every example asks the same)
    groups: dict[int, list[int]] = {}
    for d in allowed:
        groups.setdefault(bisect.bisect_right(edges, d) - 1, []).append(int(d))
    return tuple(tuple(groups[b]) for b in sorted(groups))


def synthetic_token_strs(ids: list[int], groups: list[tuple[str, int, int]]) -> list[str]:
    """Names for synthetic ids: specials by name, then ``prefix+offset`` within each (prefix, lo, n) group."""
    out = []
    for t in ids:
        if 0 <= t < N_SPECIAL:
            out.append(SPECIAL_NAMES[t])
            continue
        for prefix, lo, n in groups:
            if lo <= t < lo + n:
                out.append(f"{prefix}{t - lo}")
                break
        else:
            out.append(f"<{t}?>")
    return out


def byte_token_strs(ids: list[int], special_names: dict[int, str]) -> list[str]:
    """One string per byte id: a multi-byte UTF-8 character goes on its first byte, '' on the rest."""
    out = [""] * len(ids)
    i = 0
    while i < len(ids):
        t = ids[i]
        if t >= 256:
            out[i], i = special_names.get(t, f"<{t}?>"), i + 1
            continue
        n = 1 if t < 0xC0 else 2 if t < 0xE0 else 3 if t < 0xF0 else 4  # UTF-8 sequence length from the lead byte
        chunk = ids[i : i + n]
        if len(chunk) < n or any(not 0x80 <= c < 0xC0 for c in chunk[1:]):
            n, chunk = 1, [t]  # not a valid sequence: show the lone byte as a replacement char
        out[i] = bytes(chunk).decode("utf-8", errors="replace")
        i += n
    return out


def tokenizer_token_strs(tok: Tokenizer, ids: list[int]) -> list[str]:
    """Per-token display strings of ``tok``'s ids; byte-level tokenizers keep multi-byte characters whole."""
    if isinstance(tok, ByteTokenizer):
        return byte_token_strs(ids, {v: k for k, v in tok.special_ids.items()})
    return [tok.decode([i]) for i in ids]


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: ``make_task`` builds ``cls`` for ``{name: cls.name, ...}``."""
    if cls.name in TASKS:
        raise ValueError(f"task name {cls.name!r} is already registered by {TASKS[cls.name].__qualname__}")
    TASKS[cls.name] = cls
    return cls


def make_task(spec: dict[str, Any]) -> Task:
    """Build a task config from ``{"name": "recall", **knobs}`` (validated; ConfigError on bad knobs)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"a task spec must be a mapping like {{name: recall, n_facts: 4}}, got {spec!r}")
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in TASKS:
        raise ConfigError(f"task name {name!r} unknown; set name: to one of {sorted(TASKS)}")
    cls = TASKS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"{name}: unknown knob(s) {unknown}; valid knobs: {sorted(known)}")
    try:
        return cls(**spec)
    except TypeError as e:  # e.g. a string where a number belongs
        raise ConfigError(f"{name}: a knob has the wrong type ({e}); check the values in {spec}") from e


def generate_example(tasks: list[Task], weights: list[float], seed: int, split: str, index: int,
                     task_ids: list[int] | None = None) -> dict[str, Any]:
    """Example ``index`` of ``split``: pick a task by weight, then generate, all from the example's own RNG."""
    rng = example_rng(seed, split, index)
    j = 0
    if len(tasks) > 1:
        cum = np.cumsum(weights) / math.fsum(weights)
        j = min(int(np.searchsorted(cum, rng.random(), side="right")), len(tasks) - 1)
    ex = tasks[j].generate(rng)
    meta = ex.get("meta", {})
    ex["meta"] = {
        "seed": int(seed), "split": split, "index": int(index),
        "task_id": int(task_ids[j] if task_ids is not None else j),
        "generator_version": GENERATOR_VERSION, **meta,
    }
    return ex
