"""Copy a random symbol sequence once, at a controlled distance after the prompt (``name: copy``)."""

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
    draw_distance,
    check_bucket_edges,
    register_task,
    require,
    synthetic_token_strs,
)


@register_task
@dataclass
class CopyTask(Task):
    """Copy: prompt ``<bos> s_1..s_n <sep>``; response ``filler <sep> s_1..s_c`` with c = ``copy_len``.

    The filler is ``gap`` random symbols (kind 0, weight ``other_weight``: work that fills the state,
    drawn independently of the prompt); the reproduction starts at a distance drawn bucket-first
    inside ``gap_range``. Each reproduced symbol is a prompt answer (kind 2, distance = index in the
    response). The sequence is reproduced once, so nothing can be copied from the response; only
    the first ``copy_len`` (default half) symbols are reproduced because knowing which symbols the
    prompt held narrows the later ones by elimination (down to certainty at the last one): the
    audit reports that narrowing, which grows along the reproduction but stays small for c ≤ n/2.
    """

    name: ClassVar[str] = "copy"

    seq_len: int = 16
    n_symbols: int = 16
    copy_len: int | None = None
    gap_range: list[int] | None = None
    answer_weight: float = 1.0
    other_weight: float = 0.0
    sep_weight: float = 1.0
    bucket_edges: list[int] | None = None

    def __post_init__(self) -> None:
        require(self.seq_len >= 1, f"copy: seq_len={self.seq_len} must be >= 1")
        require(self.n_symbols >= 2, f"copy: n_symbols={self.n_symbols} must be >= 2")
        require(1 <= self.n_copy <= self.seq_len, f"copy: copy_len={self.copy_len} must be in [1, seq_len={self.seq_len}]")
        require(min(self.answer_weight, self.other_weight, self.sep_weight) >= 0, "copy: weights must be >= 0")
        if self.gap_range is not None:
            g = [int(x) for x in self.gap_range]
            require(len(g) == 2 and 0 <= g[0] <= g[1], f"copy: gap_range={self.gap_range} must be [min, max], 0 <= min <= max")
            self.gap_range = g
        if self.bucket_edges is not None:
            self.bucket_edges = check_bucket_edges(self.bucket_edges, "copy: bucket_edges")

    @property
    def n_copy(self) -> int:
        return max(1, self.seq_len // 2) if self.copy_len is None else self.copy_len

    @property
    def gaps(self) -> list[int]:
        return list(self.gap_range) if self.gap_range is not None else [0, 4 * self.seq_len]

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
        return self.gaps[1] + 1 + self.n_copy

    def shortcut_baselines(self, answer_index: int) -> dict[str, float]:
        n, v, i = self.seq_len, self.n_symbols, answer_index
        value_set = (1 + (n - 1) / v) / n  # the symbol itself, plus others equal to it by chance
        # elimination: the prompt's symbols minus the i already reproduced
        return {"chance": 1 / v, "value_set": value_set, "elimination": (1 + (n - i - 1) / v) / (n - i),
                "last_prompt_value": 1 / v + (1 - 1 / v) * (i == n - 1), "most_frequent": 1 / v,
                "copy_response": 1 / v}

    def generate(self, rng: np.random.Generator) -> dict[str, Any]:
        seq = [N_SPECIAL + int(s) for s in rng.integers(0, self.n_symbols, size=self.seq_len)]
        lo, hi = self.gaps
        gap = draw_distance(rng, list(range(lo, hi + 1)), self.edges)
        filler = [N_SPECIAL + int(s) for s in rng.integers(0, self.n_symbols, size=gap)]
        c = self.n_copy
        resp = filler + [SEP] + seq[:c]
        kind = [0] * (gap + 1) + [2] * c
        weight = [self.other_weight] * gap + [self.sep_weight] + [self.answer_weight] * c
        dist = [i if k == 2 else -1 for i, k in enumerate(kind)]
        return self._finish([BOS] + seq + [SEP], resp, kind, dist, weight, self.slice_n, seq, 1 / self.n_symbols)

    def scaled(self, scale: float) -> "CopyTask":
        if scale == 1:
            return self
        lo, hi = self.gaps
        return dataclasses.replace(self, gap_range=[lo, int(round(hi * scale))])

    def token_strs(self, ids: list[int]) -> list[str]:
        return synthetic_token_strs(ids, [("s", N_SPECIAL, self.n_symbols)])
