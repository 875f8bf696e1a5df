"""Constructed prompt-forgetting tasks: procedural, seeded, deterministic.

Example ``i`` of a split is generated from ``np.random.default_rng([seed, split_id, i])`` alone, so
the same (seed, split, i) gives the same example on any machine, worker count or DDP layout; no RNG
is shared between examples. Each task is a small dataclass config validated at construction
(``ConfigError`` names the knob and the fix). ``Task.generate(rng)`` returns an example in the
batch contract (see ``prosg.data.datamodule.collate``):

    prompt_ids, response_ids: list[int]
    answer_kind: list[int]   0 = not scored, 1 = local answer, 2 = prompt answer  (len R)
    distance:    list[int]   index in the response for prompt answers, -1 elsewhere (len R)
    loss_weight: list[float] cross-entropy weight for predicting this response token (len R)
    task: str, n_facts: int, meta: dict

Synthetic token vocabulary (``recall``, ``copy``): ids 0..4 are specials (``<pad> <bos> <sep>
<set> <ask>``), then the task's symbols (keys then values for recall). ``instruction`` is text,
tokenized by ``ByteTokenizer`` (ids 0..259, pad 256).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from prosg.data.tokenizers import ByteTokenizer
from prosg.errors import ConfigError

# Bump when any generator's output for a given (config, seed, split, index) changes.
GENERATOR_VERSION = "1"

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


def default_bucket_edges(response_len: int, first: int = 16) -> list[int]:
    """Doubling distance edges [0, 16, 32, 64, ...] clipped so the last edge is ``response_len``."""
    edges, e = [0], first
    while e < response_len:
        edges.append(e)
        e *= 2
    edges.append(max(response_len, 1))
    return edges


def check_bucket_edges(edges: list[int], knob: str = "bucket_edges") -> list[int]:
    """Validate distance bucket edges: >= 2 strictly increasing non-negative ints."""
    edges = [int(e) for e in edges]
    if len(edges) < 2 or edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(
            f"{knob}={edges} must be >= 2 strictly increasing non-negative ints, e.g. [0, 16, 32, 64, 128]"
        )
    return edges


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


class Task:
    """Base of the task configs: vocabulary facts, generation, token rendering."""

    name: ClassVar[str]
    joiner: ClassVar[str] = " "  # how ``token_strs`` are joined for display

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
    def edges(self) -> list[int]:
        """This task's distance bucket edges (explicit ``bucket_edges`` or the doubling default)."""
        explicit = getattr(self, "bucket_edges", None)
        return list(explicit) if explicit is not None else default_bucket_edges(self.max_response_len)

    def scaled(self, scale: float) -> "Task":
        """The same task with its response (and query distances) ``scale`` times longer."""
        raise NotImplementedError

    def token_strs(self, ids: list[int]) -> list[str]:
        """Readable string per token id (for ``prosg data show``)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable knobs, with ``name``; ``make_task`` inverts it."""
        return {"name": self.name, **dataclasses.asdict(self)}

    def with_overrides(self, overrides: dict[str, Any]) -> "Task":
        """A copy with the knobs in ``overrides`` that this task has (re-validated)."""
        mine = {k: v for k, v in overrides.items() if k in {f.name for f in dataclasses.fields(self)}}
        return dataclasses.replace(self, **mine) if mine else self

    def _finish(self, prompt: list[int], response: list[int], kind: list[int], dist: list[int],
                weight: list[float], n_facts: int) -> dict[str, Any]:
        return {
            "prompt_ids": [int(t) for t in prompt],
            "response_ids": [int(t) for t in response],
            "answer_kind": [int(k) for k in kind],
            "distance": [int(d) for d in dist],
            "loss_weight": [float(w) for w in weight],
            "task": self.name,
            "n_facts": int(n_facts),
        }


def _synthetic_token_strs(ids: list[int], groups: list[tuple[str, int, int]]) -> list[str]:
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


@dataclass
class RecallTask(Task):
    """Multi-query associative recall with interference (MQAR over a fill-the-state response).

    Prompt: ``<bos> k v k v ... <sep>`` with ``n_facts`` distinct keys. Response: ``response_len // 3``
    three-token slots (plus a truncated tail when ``response_len % 3``), each one of
      - ``<set> k v``: a *local* fact (weight ``other_weight``, kind 0). Local keys come from the same
        key vocabulary but are disjoint from this example's prompt keys; each key (prompt or local)
        has exactly ONE value per example, so every query has exactly one correct answer in what
        precedes it. ``<set>`` slots introduce the local keys one by one (random order) and, once all
        are set, re-state random ones (same value);
      - ``<ask> k v`` with k a local key already set in the response: local answer (kind 1);
      - ``<ask> k v`` with k a prompt key: prompt answer (kind 2), distance = index of ``v`` in the
        response. Each prompt key is asked at most once, so a prompt answer can never be read off
        the response.
    Prompt queries land on slots stratified over the distance buckets inside ``query_distances``
    (inclusive [min, max]; default the whole response), so every bucket is covered. Answer
    distances are ``3j + 2`` for slot j; ``n_prompt_queries`` defaults to ``n_facts`` (each fact asked
    once). Interference grows with ``n_local_keys`` (default: every key not in the prompt) and
    ``local_query_rate`` (fraction of non-prompt slots that are local queries). Chance accuracy on
    an answer is ``1 / n_values``.
    """

    name: ClassVar[str] = "recall"

    n_facts: int = 4
    n_keys: int = 16
    n_values: int = 16
    response_len: int = 128
    n_prompt_queries: int | None = None
    query_distances: list[int] | None = None
    local_query_rate: float = 0.5
    n_local_keys: int | None = None
    prompt_answer_weight: float = 1.0
    local_answer_weight: float = 1.0
    other_weight: float = 0.0
    bucket_edges: list[int] | None = None

    def __post_init__(self) -> None:
        _require(self.n_facts >= 1, f"recall: n_facts={self.n_facts} must be >= 1")
        _require(self.n_values >= 2, f"recall: n_values={self.n_values} must be >= 2 (1 value is trivial)")
        _require(
            self.n_facts < self.n_keys,
            f"recall: n_facts={self.n_facts} needs n_keys > n_facts (got n_keys={self.n_keys}): prompt keys are "
            "distinct and at least one key must be left for local facts; raise n_keys or lower n_facts",
        )
        n_local = self.local_keys
        _require(
            1 <= n_local <= self.n_keys - self.n_facts,
            f"recall: n_local_keys={self.n_local_keys} must be in [1, n_keys - n_facts = {self.n_keys - self.n_facts}] "
            "(local keys are disjoint from the prompt's keys)",
        )
        _require(self.response_len >= 3, f"recall: response_len={self.response_len} must be >= 3 (one slot)")
        _require(
            0.0 <= self.local_query_rate <= 1.0, f"recall: local_query_rate={self.local_query_rate} must be in [0, 1]"
        )
        _require(
            0 <= self.n_queries <= self.n_facts,
            f"recall: n_prompt_queries={self.n_prompt_queries} must be in [0, n_facts={self.n_facts}]: "
            "each prompt key is asked at most once so its answer cannot be copied from the response",
        )
        for knob in ("prompt_answer_weight", "local_answer_weight", "other_weight"):
            _require(getattr(self, knob) >= 0, f"recall: {knob}={getattr(self, knob)} must be >= 0")
        if self.query_distances is not None:
            qd = [int(d) for d in self.query_distances]
            _require(
                len(qd) == 2 and 0 <= qd[0] <= qd[1],
                f"recall: query_distances={self.query_distances} must be [min, max] with 0 <= min <= max",
            )
            _require(
                qd[1] <= self.response_len - 1,
                f"recall: query_distances max {qd[1]} is beyond the response (response_len={self.response_len}, "
                f"largest distance {self.response_len - 1}); lower it or raise response_len",
            )
            self.query_distances = qd
        if self.bucket_edges is not None:
            self.bucket_edges = check_bucket_edges(self.bucket_edges, "recall: bucket_edges")
        self._strata = self._slot_strata()
        n_eligible = sum(len(g) for g in self._strata)
        _require(
            n_eligible >= self.n_queries,
            f"recall: only {n_eligible} answer positions (distances 3j+2) fall in query_distances="
            f"{self.distance_range}, fewer than n_prompt_queries={self.n_prompt_queries}; widen query_distances",
        )

    # Knobs left at None resolve here rather than in __post_init__, so dataclasses.replace (overrides,
    # scaling) re-derives them from the new values instead of carrying stale ones.
    @property
    def n_queries(self) -> int:
        return self.n_facts if self.n_prompt_queries is None else self.n_prompt_queries

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

    def _eligible_slots(self) -> list[int]:
        lo, hi = self.distance_range
        return [j for j in range(self.response_len // 3) if lo <= 3 * j + 2 <= hi]

    def _slot_strata(self) -> list[list[int]]:
        """Eligible slots grouped by distance bucket; distances past the last edge form one more group."""
        edges = self.edges
        groups: dict[int, list[int]] = {}
        for j in self._eligible_slots():
            d = 3 * j + 2
            b = int(np.searchsorted(edges, d, side="right")) - 1
            groups.setdefault(b, []).append(j)
        return [groups[b] for b in sorted(groups)]

    def _prompt_query_slots(self, rng: np.random.Generator) -> list[int]:
        """n_prompt_queries distinct slots, spread so each bucket gets an equal share (random remainder)."""
        strata = self._strata
        q, g = self.n_queries, len(strata)
        if q == 0:
            return []
        counts = [q // g] * g
        for b in rng.permutation(g)[: q % g]:
            counts[int(b)] += 1
        # A bucket narrower than its share passes the excess on to buckets with room.
        spill = 0
        for b in range(g):
            if counts[b] > len(strata[b]):
                spill += counts[b] - len(strata[b])
                counts[b] = len(strata[b])
        for b in rng.permutation(g):
            take = min(spill, len(strata[int(b)]) - counts[int(b)])
            counts[int(b)] += take
            spill -= take
        slots: list[int] = []
        for b in range(g):
            if counts[b]:
                slots.extend(int(strata[b][i]) for i in rng.permutation(len(strata[b]))[: counts[b]])
        return sorted(slots)

    def generate(self, rng: np.random.Generator) -> dict[str, Any]:
        perm = rng.permutation(self.n_keys)
        prompt_keys = perm[: self.n_facts]
        local_keys = perm[self.n_facts : self.n_facts + self.local_keys]
        values = rng.integers(0, self.n_values, size=self.n_facts + self.local_keys)
        prompt_vals, local_vals = values[: self.n_facts], values[self.n_facts :]
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
        return self._finish(prompt, resp[:r], kind[:r], dist[:r], weight[:r], self.slice_n)

    def scaled(self, scale: float) -> "RecallTask":
        if scale == 1:
            return self
        r = max(3, int(round(self.response_len * scale)))
        qd = None
        if self.query_distances is not None:
            qd = [self.query_distances[0], min(r - 1, int(round(self.query_distances[1] * scale)))]
        return dataclasses.replace(self, response_len=r, query_distances=qd)

    def token_strs(self, ids: list[int]) -> list[str]:
        return _synthetic_token_strs(ids, [("k", self.key_base, self.n_keys), ("v", self.value_base, self.n_values)])


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
        _require(self.seq_len >= 1, f"copy: seq_len={self.seq_len} must be >= 1")
        _require(self.n_repeats >= 1, f"copy: n_repeats={self.n_repeats} must be >= 1")
        _require(self.n_symbols >= 2, f"copy: n_symbols={self.n_symbols} must be >= 2")
        _require(self.answer_weight >= 0 and self.sep_weight >= 0, "copy: answer_weight and sep_weight must be >= 0")
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
        return _synthetic_token_strs(ids, [("s", N_SPECIAL, self.n_symbols)])


# Small closed word lists: keywords never occur as filler, so a keyword can only come from the prompt.
KEYWORDS = (
    "river", "lantern", "garden", "mirror", "violin", "harbor", "candle", "forest",
    "castle", "pepper", "rocket", "meadow", "pillow", "island", "ribbon", "glacier",
    "saddle", "comet", "orchard", "bridge", "tunnel", "marble", "falcon", "kettle",
)
ADJECTIVES = ("quiet", "bright", "old", "small", "green", "heavy", "gentle", "cold", "busy", "tall", "warm", "empty")
NOUNS = ("dog", "teacher", "cloud", "window", "farmer", "city", "child", "road", "bird", "doctor", "train", "stone")
VERBS = ("sees", "finds", "passes", "follows", "paints", "remembers", "watches", "carries", "leaves", "visits")
PREPS = ("near", "behind", "under", "beside", "past")
ENDINGS = ("!", "?", ".", ";")
OPENERS = ("Today,", "Suddenly,", "Meanwhile,", "Again,", "Still,", "Later,")
RULES = ("keyword", "ending", "opener")

# Sentence bodies; {kw} is the keyword slot (a filler noun when the keyword rule is off).
TEMPLATES = (
    "the {adj} {noun} {verb} the {kw}",
    "one {kw} {verb} the {adj} {noun}",
    "the {noun} {verb} that {adj} {kw} {prep} the {noun2}",
    "{prep} the {kw}, the {noun} {verb} the {noun2}",
)


@dataclass
class InstructionTask(Task):
    """Instruction following: templated English rules in the prompt, a long response obeying them.

    Rules (``rules`` knob, any of ``keyword``, ``ending``, ``opener``): use a keyword in every sentence,
    end every sentence with a given mark, start every sentence with a given word. The response is
    whole template sentences (at most ``response_len`` bytes, byte-tokenized); the bytes of each
    keyword, opener and end mark are prompt answers (kind 2, distance = byte index in the response,
    weight ``answer_weight``); all other bytes are kind 0 with weight ``other_weight``.
    ``n_facts`` is the number of rules.
    """

    name: ClassVar[str] = "instruction"
    joiner: ClassVar[str] = ""

    response_len: int = 256
    rules: list[str] = field(default_factory=lambda: ["keyword", "ending"])
    n_keywords: int = 16
    answer_weight: float = 1.0
    other_weight: float = 1.0
    bucket_edges: list[int] | None = None

    def __post_init__(self) -> None:
        self.rules = list(self.rules)
        bad = [r for r in self.rules if r not in RULES]
        _require(not bad, f"instruction: unknown rules {bad}; choose from {list(RULES)}")
        _require(
            len(set(self.rules)) == len(self.rules) and self.rules,
            f"instruction: rules={self.rules} must be non-empty and distinct",
        )
        _require(
            2 <= self.n_keywords <= len(KEYWORDS),
            f"instruction: n_keywords={self.n_keywords} must be in [2, {len(KEYWORDS)}] (size of the keyword list)",
        )
        _require(self.answer_weight >= 0 and self.other_weight >= 0, "instruction: weights must be >= 0")
        longest = self._longest_sentence()
        _require(
            self.response_len >= longest,
            f"instruction: response_len={self.response_len} is shorter than the longest sentence ({longest} bytes); "
            f"raise response_len to at least {longest}",
        )
        if self.bucket_edges is not None:
            self.bucket_edges = check_bucket_edges(self.bucket_edges, "instruction: bucket_edges")

    @property
    def tokenizer(self) -> ByteTokenizer:
        return ByteTokenizer()

    @property
    def slice_n(self) -> int:
        return len(self.rules)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def max_prompt_len(self) -> int:
        longest = {
            "keyword": max(len(w) for w in KEYWORDS[: self.n_keywords]),
            "ending": max(len(e) for e in ENDINGS),
            "opener": max(len(o) for o in OPENERS),
        }
        return 2 + len(self._instruction_text({r: "x" * longest[r] for r in self.rules}).encode())

    @property
    def max_response_len(self) -> int:
        return self.response_len

    def _longest_sentence(self) -> int:
        w = lambda xs: max(len(x) for x in xs)  # noqa: E731
        kw = w(KEYWORDS[: self.n_keywords] + NOUNS)
        body = max(len(t.format(adj="", noun="", noun2="", verb="", prep="", kw="")) for t in TEMPLATES)
        return body + w(ADJECTIVES) + 2 * w(NOUNS) + w(VERBS) + w(PREPS) + kw + w(OPENERS) + 1 + w(ENDINGS)

    def _instruction_text(self, choice: dict[str, str]) -> str:
        parts = ["Follow these rules in your answer."]
        if "keyword" in choice:
            parts.append(f"Use the word '{choice['keyword']}' in every sentence.")
        if "ending" in choice:
            parts.append(f"End every sentence with '{choice['ending']}'.")
        if "opener" in choice:
            parts.append(f"Start every sentence with '{choice['opener']}'.")
        return " ".join(parts)

    def _sentence(self, rng: np.random.Generator, choice: dict[str, str]) -> list[tuple[str, bool]]:
        """One sentence as (text, scored) segments."""
        pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
        template = pick(TEMPLATES)
        words = {
            "adj": pick(ADJECTIVES), "noun": pick(NOUNS), "noun2": pick(NOUNS), "verb": pick(VERBS), "prep": pick(PREPS)
        }
        body = template.format(kw="\x00", **words)  # \x00 marks the keyword slot
        if "opener" in choice:
            segs: list[tuple[str, bool]] = [(choice["opener"], True), (" ", False)]
        else:
            segs, body = [], body[0].upper() + body[1:]
        before, after = body.split("\x00")
        kw, scored = (choice["keyword"], True) if "keyword" in choice else (pick(NOUNS), False)
        segs += [(before, False), (kw, scored), (after, False)]
        segs.append((choice["ending"], True) if "ending" in choice else (".", False))
        return [s for s in segs if s[0]]

    def generate(self, rng: np.random.Generator) -> dict[str, Any]:
        tok = self.tokenizer
        pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
        pools = {"keyword": KEYWORDS[: self.n_keywords], "ending": ENDINGS, "opener": OPENERS}
        choice = {r: pick(pools[r]) for r in self.rules}
        prompt = [tok.bos_id] + tok.encode(self._instruction_text(choice)) + [tok.sep_id]

        resp: list[int] = []
        kind: list[int] = []
        while True:
            segs = self._sentence(rng, choice)
            if resp:
                segs = [(" ", False)] + segs
            ids = [(tok.encode(text), scored) for text, scored in segs]
            if len(resp) + sum(len(i) for i, _ in ids) > self.response_len:
                break
            for i, scored in ids:
                resp += i
                kind += [2 if scored else 0] * len(i)
        dist = [i if k == 2 else -1 for i, k in enumerate(kind)]
        weight = [self.answer_weight if k == 2 else self.other_weight for k in kind]
        ex = self._finish(prompt, resp, kind, dist, weight, self.slice_n)
        ex["meta"] = {"rules": dict(choice)}
        return ex

    def scaled(self, scale: float) -> "InstructionTask":
        if scale == 1:
            return self
        return dataclasses.replace(self, response_len=int(round(self.response_len * scale)))

    def token_strs(self, ids: list[int]) -> list[str]:
        return byte_token_strs(ids, {v: k for k, v in self.tokenizer.special_ids.items()})


TASKS: dict[str, type[Task]] = {"recall": RecallTask, "copy": CopyTask, "instruction": InstructionTask}


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
