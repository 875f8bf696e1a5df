"""Copy a random symbol sequence several times (``name: copy``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from prosg.data.tasks.base import (
    BOS,
    N_SPECIAL,
    SEP,
    Task,
    check_bucket_edges,
    register_task,
    require,
    synthetic_token_strs,
)


@register_task
@dataclass
class CopyTask(Task):
    """Copy: prompt ``<bos> s_1..s_n <sep>``; response ``(s_1..s_n <sep>) * n_repeats``.

    Every symbol of the response is a prompt answer (kind 2: the prompt is its source, even though
    later repetitions could also be copied from earlier ones); distance = index in the response, so
    the repetition index is ``distance // (seq_len + 1)`` (``meta["period"]``). Separators are
    kind 0 with weight ``sep_weight``.
    """

    name: ClassVar[str] = "copy"

    seq_len: int = 16
    n_repeats: int = 4
    n_symbols: int = 16
    answer_weight: float = 1.0
    sep_weight: float = 1.0
    bucket_edges: list[int] | None = None

    def __post_init__(self) -> None:
        require(self.seq_len >= 1, f"copy: seq_len={self.seq_len} must be >= 1")
        require(self.n_repeats >= 1, f"copy: n_repeats={self.n_repeats} must be >= 1")
        require(self.n_symbols >= 2, f"copy: n_symbols={self.n_symbols} must be >= 2")
        require(self.answer_weight >= 0 and self.sep_weight >= 0, "copy: answer_weight and sep_weight must be >= 0")
        if self.bucket_edges is not None:
            self.bucket_edges = check_bucket_edges(self.bucket_edges, "copy: bucket_edges")

    @property
    def slice_n(self) -> int:
        return self.seq_len

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + self.n_symbols

    @property
    def max_prompt_len(self) -> int:
        return self.seq_len + 2

    @property
    def max_response_len(self) -> int:
        return self.n_repeats * (self.seq_len + 1)

    def generate(self, rng: np.random.Generator) -> dict[str, Any]:
        seq = [N_SPECIAL + int(s) for s in rng.integers(0, self.n_symbols, size=self.seq_len)]
        period = seq + [SEP]
        resp = period * self.n_repeats
        kind = ([2] * self.seq_len + [0]) * self.n_repeats
        weight = ([self.answer_weight] * self.seq_len + [self.sep_weight]) * self.n_repeats
        dist = [i if k == 2 else -1 for i, k in enumerate(kind)]
        ex = self._finish([BOS] + seq + [SEP], resp, kind, dist, weight, self.slice_n)
        ex["meta"] = {"period": self.seq_len + 1}
        return ex

    def scaled(self, scale: float) -> "CopyTask":
        if scale == 1:
            return self
        return dataclasses.replace(self, n_repeats=max(1, int(round(self.n_repeats * scale))))

    def token_strs(self, ids: list[int]) -> list[str]:
        return synthetic_token_strs(ids, [("s", N_SPECIAL, self.n_symbols)])
