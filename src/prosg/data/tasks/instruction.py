"""Instruction following over templated English rules, byte-tokenized (``name: instruction``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from prosg.data.tasks.base import Task, byte_token_strs, check_bucket_edges, register_task, require
from prosg.data.tokenizers import ByteTokenizer

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


@register_task
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
        require(not bad, f"instruction: unknown rules {bad}; choose from {list(RULES)}")
        require(
            len(set(self.rules)) == len(self.rules) and self.rules,
            f"instruction: rules={self.rules} must be non-empty and distinct",
        )
        require(
            2 <= self.n_keywords <= len(KEYWORDS),
            f"instruction: n_keywords={self.n_keywords} must be in [2, {len(KEYWORDS)}] (size of the keyword list)",
        )
        require(self.answer_weight >= 0 and self.other_weight >= 0, "instruction: weights must be >= 0")
        longest = self._longest_sentence()
        require(
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
