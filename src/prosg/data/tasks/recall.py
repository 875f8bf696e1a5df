"""Associative recall with interference, asked so that only the prompt can answer (``name: recall``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from prosg.data.tasks.base import (
    ASK,
    BOS,
    N_SPECIAL,
    SEP,
    SET,
    Task,
    draw_distance,
    check_bucket_edges,
    register_task,
    require,
    synthetic_token_strs,
)


@register_task
@dataclass
class RecallTask(Task):
    """Associative recall of prompt facts across a response that fills the state (MQAR with interference).

    Prompt: ``<bos> k v k v ... <sep>`` with ``n_facts`` distinct keys and, by default, distinct values
    (``distinct_values``). Response: ``response_len // 3`` three-token slots (plus a truncated tail),
    each one of
      - ``<set> k v``: a *local* fact (kind 0, weight ``other_weight``). Local keys are disjoint from the
        prompt's keys; every key has ONE value per example, so each query has one correct answer;
        ``<set>`` slots introduce the local keys one by one, then re-state random ones;
      - ``<ask> k v``, k a local key already set: local answer (kind 1);
      - ``<ask> k v``, k a prompt key: prompt answer (kind 2), distance = index of ``v`` in the response.

    What makes a prompt answer measure memory of the prompt and nothing else (``prosg data audit``
    checks it on generated data): ``n_prompt_queries`` prompt facts are asked (default 1), chosen at
    random, each at most once (nothing to copy from the response), at a distance drawn bucket-first
    inside ``query_distances`` (independent of which fact is asked); local values are drawn
    independently of the prompt's. With distinct prompt values a model that remembers which values
    the prompt held but not their keys scores 1 / n_facts (the value-set ceiling, ``candidates``);
    chance is 1 / n_values. More than one prompt query per example lets later answers be narrowed by
    elimination from earlier ones (the audit flags it): only for analysis.
    """

    name: ClassVar[str] = "recall"

    n_facts: int = 4
    n_keys: int = 16
    n_values: int = 16
    response_len: int = 128
    n_prompt_queries: int = 1
    query_distances: list[int] | None = None
    distinct_values: bool = True
    local_query_rate: float = 0.5
    n_local_keys: int | None = None
    prompt_answer_weight: float = 1.0
    local_answer_weight: float = 1.0
    other_weight: float = 0.0
    bucket_edges: list[int] | None = None

    def __post_init__(self) -> None:
        require(self.n_facts >= 1, f"recall: n_facts={self.n_facts} must be >= 1")
        require(self.n_values >= 2, f"recall: n_values={self.n_values} must be >= 2 (1 value is trivial)")
        require(
            self.n_facts < self.n_keys,
            f"recall: n_facts={self.n_facts} needs n_keys > n_facts (got n_keys={self.n_keys}): prompt keys are "
            "distinct and at least one key must be left for local facts; raise n_keys or lower n_facts",
        )
        require(
            not self.distinct_values or self.n_facts <= self.n_values,
            f"recall: distinct_values needs n_values >= n_facts (got {self.n_values} < {self.n_facts}); raise "
            "n_values or set distinct_values: false",
        )
        n_local = self.local_keys
        require(
            1 <= n_local <= self.n_keys - self.n_facts,
            f"recall: n_local_keys={self.n_local_keys} must be in [1, n_keys - n_facts = {self.n_keys - self.n_facts}] "
            "(local keys are disjoint from the prompt's keys)",
        )
        require(self.response_len >= 3, f"recall: response_len={self.response_len} must be >= 3 (one slot)")
        require(
            0.0 <= self.local_query_rate <= 1.0, f"recall: local_query_rate={self.local_query_rate} must be in [0, 1]"
        )
        require(
            0 <= self.n_prompt_queries <= self.n_facts,
            f"recall: n_prompt_queries={self.n_prompt_queries} must be in [0, n_facts={self.n_facts}]: "
            "each prompt key is asked at most once so its answer cannot be copied from the response",
        )
        for knob in ("prompt_answer_weight", "local_answer_weight", "other_weight"):
            require(getattr(self, knob) >= 0, f"recall: {knob}={getattr(self, knob)} must be >= 0")
        if self.query_distances is not None:
            qd = [int(d) for d in self.query_distances]
            require(
                len(qd) == 2 and 0 <= qd[0] <= qd[1],
                f"recall: query_distances={self.query_distances} must be [min, max] with 0 <= min <= max",
            )
            require(
                qd[1] <= self.response_len - 1,
                f"recall: query_distances max {qd[1]} is beyond the response (response_len={self.response_len}, "
                f"largest distance {self.response_len - 1}); lower it or raise response_len",
            )
            self.query_distances = qd
        if self.bucket_edges is not None:
            self.bucket_edges = check_bucket_edges(self.bucket_edges, "recall: bucket_edges")
        n_eligible = len(self._answer_distances())
        require(
            n_eligible >= self.n_prompt_queries,
            f"recall: only {n_eligible} answer positions (distances 3j+2) fall in query_distances="
            f"{self.distance_range}, fewer than n_prompt_queries={self.n_prompt_queries}; widen query_distances",
        )

    # Knobs left at None resolve here rather than in __post_init__, so dataclasses.replace (overrides,
    # scaling) re-derives them from the new values instead of carrying stale ones.
    @property
    def local_keys(self) -> int:
        return self.n_keys - self.n_facts if self.n_local_keys is None else self.n_local_keys

    @property
    def key_base(self) -> int:
        return N_SPECIAL

    @property
    def value_base(self) -> int:
        return N_SPECIAL + self.n_keys

    @property
    def slice_n(self) -> int:
        return self.n_facts

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + self.n_keys + self.n_values

    @property
    def max_prompt_len(self) -> int:
        return 2 * self.n_facts + 2

    @property
    def max_response_len(self) -> int:
        return self.response_len

    @property
    def distance_range(self) -> list[int]:
        return list(self.query_distances) if self.query_distances is not None else [0, self.response_len - 1]

    @property
    def max_distance(self) -> int:
        return max(self._answer_distances(), default=0)

    def _answer_distances(self) -> list[int]:
        """Distances 3j+2 of the slots a prompt query may take (inside ``query_distances``)."""
        lo, hi = self.distance_range
        return [3 * j + 2 for j in range(self.response_len // 3) if lo <= 3 * j + 2 <= hi]

    def _prompt_query_slots(self, rng: np.random.Generator) -> list[int]:
        """``n_prompt_queries`` distinct slots, each drawn bucket-first among the slots still free."""
        allowed, slots = self._answer_distances(), []
        for _ in range(self.n_prompt_queries):
            d = draw_distance(rng, allowed, self.edges)
            allowed.remove(d)
            slots.append((d - 2) // 3)
        return sorted(slots)

    def shortcut_baselines(self, answer_index: int) -> dict[str, float]:
        n, chance = self.n_facts, 1.0 / self.n_values
        # another prompt fact shares the asked value with probability 0 (distinct) or 1/n_values (iid)
        p_same = 0.0 if self.distinct_values else chance
        value_set = (1 + (n - 1) * p_same) / n
        return {"chance": chance, "value_set": value_set, "elimination": value_set, "last_prompt_value": value_set,
                "most_frequent": chance, "copy_response": chance}

    def generate(self, rng: np.random.Generator) -> dict[str, Any]:
        perm = rng.permutation(self.n_keys)
        prompt_keys = perm[: self.n_facts]
        local_keys = perm[self.n_facts : self.n_facts + self.local_keys]
        if self.distinct_values:
            prompt_vals = rng.permutation(self.n_values)[: self.n_facts]
        else:
            prompt_vals = rng.integers(0, self.n_values, size=self.n_facts)
        local_vals = rng.integers(0, self.n_values, size=self.local_keys)  # independent of the prompt's
        kb, vb = self.key_base, self.value_base

        prompt = [BOS]
        for k, v in zip(prompt_keys, prompt_vals):
            prompt += [kb + int(k), vb + int(v)]
        prompt.append(SEP)

        pq_slots = self._prompt_query_slots(rng)
        asked = rng.permutation(self.n_facts)[: len(pq_slots)]  # which prompt fact each query asks
        pq = {slot: int(f) for slot, f in zip(pq_slots, asked)}

        # All per-slot draws up front (one vectorised call each): scalar Generator calls dominate otherwise.
        n_slots = self.response_len // 3
        n_all = n_slots + (1 if self.response_len % 3 else 0)
        u_query, u_pick = rng.random(n_all), rng.random(n_all)
        intro = rng.permutation(self.local_keys)  # order in which <set> introduces new local keys

        resp: list[int] = []
        kind: list[int] = []
        dist: list[int] = []
        weight: list[float] = []
        n_seen = 0  # local keys intro[:n_seen] have been set in the response
        ow = self.other_weight
        for j in range(n_all):
            if j in pq:
                f = pq[j]
                resp += [ASK, kb + int(prompt_keys[f]), vb + int(prompt_vals[f])]
                kind += [0, 0, 2]
                dist += [-1, -1, len(resp) - 1]
                weight += [ow, ow, self.prompt_answer_weight]
            elif n_seen and j < n_slots and u_query[j] < self.local_query_rate:
                li = int(intro[int(u_pick[j] * n_seen)])
                resp += [ASK, kb + int(local_keys[li]), vb + int(local_vals[li])]
                kind += [0, 0, 1]
                dist += [-1, -1, -1]
                weight += [ow, ow, self.local_answer_weight]
            else:
                # <set> introduces every local key once (random order) before re-stating old ones,
                # so the state has to hold all of them as early as possible.
                if n_seen < self.local_keys:
                    li, n_seen = int(intro[n_seen]), n_seen + 1
                else:
                    li = int(intro[int(u_pick[j] * n_seen)])
                resp += [SET, kb + int(local_keys[li]), vb + int(local_vals[li])]
                kind += [0, 0, 0]
                dist += [-1, -1, -1]
                weight += [ow, ow, ow]
        r = self.response_len  # the tail slot (response_len % 3 tokens) is a truncated <set>
        candidates = [vb + int(v) for v in prompt_vals]
        return self._finish(prompt, resp[:r], kind[:r], dist[:r], weight[:r], self.slice_n, candidates,
                            1.0 / self.n_values)

    def scaled(self, scale: float) -> "RecallTask":
        if scale == 1:
            return self
        r = max(3, int(round(self.response_len * scale)))
        qd = None
        if self.query_distances is not None:
            qd = [self.query_distances[0], min(r - 1, int(round(self.query_distances[1] * scale)))]
        return dataclasses.replace(self, response_len=r, query_distances=qd)

    def token_strs(self, ids: list[int]) -> list[str]:
        return synthetic_token_strs(ids, [("k", self.key_base, self.n_keys), ("v", self.value_base, self.n_values)])
