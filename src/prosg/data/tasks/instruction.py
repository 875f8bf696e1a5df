"""Instructions in English whose effect is needed once, at a controlled distance (``name: instruction``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from prosg.data.tasks.base import (
    ByteTask,
    check_bucket_edges,
    default_bucket_edges,
    draw_distance,
    register_task,
    require,
)

# Closed word lists. Names have distinct first letters, so the first byte of a name decides it;
# names and triggers never occur in filler, and no filler word ends in "ed", so the only "named "
# in a response is the one before the scored name.
NAMES = (
    "falcon", "comet", "lantern", "violin", "harbor", "orchard", "pepper", "meadow",
    "island", "ribbon", "saddle", "tunnel", "garden", "kettle", "bridge", "amber",
)
TRIGGERS = ("dog", "cat", "bird", "horse", "goat", "fox", "owl", "frog", "boat", "robot")
ADJECTIVES = ("quiet", "bright", "old", "small", "green", "heavy", "gentle", "cold", "busy", "tall", "warm", "empty")
NOUNS = ("teacher", "cloud", "window", "farmer", "city", "child", "road", "doctor", "train", "stone", "tree", "house")
VERBS = ("sees", "finds", "passes", "follows", "paints", "remembers", "watches", "carries", "leaves", "visits")
PREPS = ("near", "behind", "under", "beside", "past")
TEMPLATES = (
    "the {adj} {noun} {verb} the {noun2}",
    "one {noun} {verb} the {adj} {noun2}",
    "the {noun} {verb} that {adj} {noun2} {prep} the {noun3}",
    "{prep} the {noun}, the {noun2} {verb} the {noun3}",
)
SHORT = ("It rains.", "Time passes.", "All is calm.", "Night falls.", "Wind blows.")
CUE = "named "  # the trigger sentence: "The <adj> <trigger> named <name> <verb> the <noun>."


@register_task
@dataclass
class InstructionTask(ByteTask):
    """Naming instructions in the prompt, one of them needed once, late in a story (byte-tokenized).

    Prompt: ``In your story, the dog is named falcon, the bird is named comet.`` (``n_facts`` rules,
    distinct triggers, names from a pool of ``n_keywords`` with distinct first letters). Response:
    filler sentences that mention no trigger and no name, then one sentence about one trigger,
    chosen at random: ``The old bird named comet sees the cloud.``, then more filler up to
    ``response_len`` bytes. The first byte of the name is the prompt answer (kind 2, distance =
    its byte index in the response, drawn bucket-first inside ``query_distances``); nothing before
    it in the response says which name: the rule is triggered once, late, and its evidence appears
    nowhere else. The rest of the name follows from its first letter (kind 0, trained with
    ``other_weight``). Chance is 1 / n_keywords; the value-set ceiling (remembering the names but
    not which trigger has which) is 1 / n_facts.
    """

    name: ClassVar[str] = "instruction"

    n_facts: int = 2
    n_keywords: int = 16
    response_len: int = 256
    query_distances: list[int] | None = None
    answer_weight: float = 1.0
    other_weight: float = 1.0
    bucket_edges: list[int] | None = None

    def __post_init__(self) -> None:
        require(
            2 <= self.n_keywords <= len(NAMES),
            f"instruction: n_keywords={self.n_keywords} must be in [2, {len(NAMES)}] (size of the name list)",
        )
        require(
            1 <= self.n_facts <= min(self.n_keywords, len(TRIGGERS)),
            f"instruction: n_facts={self.n_facts} must be in [1, {min(self.n_keywords, len(TRIGGERS))}] "
            "(one trigger and one distinct name per rule)",
        )
        require(self.answer_weight >= 0 and self.other_weight >= 0, "instruction: weights must be >= 0")
        if self.query_distances is not None:
            qd = [int(d) for d in self.query_distances]
            require(len(qd) == 2 and 0 <= qd[0] <= qd[1],
                    f"instruction: query_distances={self.query_distances} must be [min, max], 0 <= min <= max")
            self.query_distances = qd
        lo, hi = self.distance_range
        require(
            self.response_len >= hi + self._longest_sentence(),
            f"instruction: response_len={self.response_len} leaves no room for the named sentence after distance {hi} "
            f"(needs >= {hi + self._longest_sentence()}); raise response_len or lower query_distances",
        )
        if self.bucket_edges is not None:
            self.bucket_edges = check_bucket_edges(self.bucket_edges, "instruction: bucket_edges")

    @property
    def distance_range(self) -> list[int]:
        default = [len("The "), max(len("The "), self.response_len - self._longest_sentence())]
        return list(self.query_distances) if self.query_distances is not None else default

    @property
    def max_distance(self) -> int:
        return self.distance_range[1]

    @property
    def edges(self) -> list[int]:
        explicit = self.bucket_edges
        # no name can land before byte ~18 ("The old dog named "): the first bucket is [0, 32)
        return list(explicit) if explicit is not None else default_bucket_edges(self.max_distance + 1, first=32)

    @property
    def slice_n(self) -> int:
        return self.n_facts

    @property
    def max_prompt_len(self) -> int:
        longest = max(len(t) for t in TRIGGERS) + max(len(n) for n in NAMES)
        return 2 + len(self._instruction_text([("x" * longest, "")] * self.n_facts).encode())

    @property
    def max_response_len(self) -> int:
        return self.response_len

    @staticmethod
    def _longest_sentence() -> int:
        w = lambda xs: max(len(x) for x in xs)  # noqa: E731
        filler = max(len(t.format(adj="", noun="", noun2="", noun3="", verb="", prep="")) for t in TEMPLATES)
        filler += w(ADJECTIVES) + 3 * w(NOUNS) + w(VERBS) + w(PREPS)
        named = len("The   named   the .") + w(ADJECTIVES) + w(TRIGGERS) + w(NAMES) + w(VERBS) + w(NOUNS)
        return max(filler, named) + 2  # ". " joining it to the previous sentence

    @staticmethod
    def _instruction_text(rules: list[tuple[str, str]]) -> str:
        return "In your story, " + ", ".join(f"the {t} is named {n}" for t, n in rules) + "."

    def shortcut_baselines(self, answer_index: int) -> dict[str, float]:
        chance, value_set = 1 / self.n_keywords, 1 / self.n_facts
        return {"chance": chance, "value_set": value_set, "elimination": value_set, "last_prompt_value": value_set,
                "most_frequent": chance, "copy_response": chance}

    def _filler(self, rng: np.random.Generator) -> str:
        pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
        text = pick(TEMPLATES).format(adj=pick(ADJECTIVES), noun=pick(NOUNS), noun2=pick(NOUNS), noun3=pick(NOUNS),
                                      verb=pick(VERBS), prep=pick(PREPS))
        return text[0].upper() + text[1:] + "."

    def generate(self, rng: np.random.Generator) -> dict[str, Any]:
        tok = self.tokenizer
        pool = NAMES[: self.n_keywords]
        triggers = [TRIGGERS[int(i)] for i in rng.permutation(len(TRIGGERS))[: self.n_facts]]
        names = [pool[int(i)] for i in rng.permutation(len(pool))[: self.n_facts]]
        prompt = [tok.bos_id] + tok.encode(self._instruction_text(list(zip(triggers, names)))) + [tok.sep_id]

        asked = int(rng.integers(self.n_facts))
        lo, hi = self.distance_range
        target = draw_distance(rng, list(range(lo, hi + 1)), self.edges)
        pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
        adjs, verb, noun = [pick(ADJECTIVES)], pick(VERBS), pick(NOUNS)
        head = lambda: f"The {' '.join(adjs)} {triggers[asked]} {CUE}"  # noqa: E731
        text = ""
        # filler sentences, then short ones, then more adjectives before the trigger: the name's first
        # byte lands at the largest distance <= the target that they can reach (within a few bytes)
        for make in (lambda: self._filler(rng), lambda: pick(SHORT)):
            while True:
                nxt = make()
                joined = f"{text} {nxt}" if text else nxt
                if len(joined) + 1 + len(head()) > target:
                    break
                text = joined
        while True:
            adjs.append(pick(ADJECTIVES))
            if len(text) + bool(text) + len(head()) > target:
                adjs.pop()
                break
        text = f"{text} {head()}" if text else head()
        d = len(text)  # the name's first byte
        text += f"{names[asked]} {verb} the {noun}."
        while True:
            nxt = f"{text} {self._filler(rng)}"
            if len(nxt) > self.response_len:
                break
            text = nxt
        resp = tok.encode(text)  # ASCII only: one byte per character
        kind = [0] * len(resp)
        kind[d] = 2
        dist = [d if k == 2 else -1 for k in kind]
        weight = [self.answer_weight if k == 2 else self.other_weight for k in kind]
        candidates = [tok.encode(n)[0] for n in names]
        ex = self._finish(prompt, resp, kind, dist, weight, self.slice_n, candidates, 1 / self.n_keywords)
        ex["meta"] = {"rules": dict(zip(triggers, names)), "asked": triggers[asked]}
        return ex

    def scaled(self, scale: float) -> "InstructionTask":
        if scale == 1:
            return self
        r = int(round(self.response_len * scale))
        qd = None
        if self.query_distances is not None:
            lo, hi = self.query_distances
            qd = [lo, int(round(hi * scale))]
        return dataclasses.replace(self, response_len=r, query_distances=qd)
