"""English text for language modelling (``name: text``): random byte windows of a corpus split."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from prosg.data.tasks.base import ByteTask, register_task, require

CORPORA = ("pydoc",)  # prosg.data.corpus: the CPython documentation topics every Python install carries


@register_task
@dataclass
class TextTask(ByteTask):
    """A window of ``window_len`` bytes of English prose, every byte trained (byte-tokenized).

    Prompt: ``<bos> <sep>`` (nothing to remember); response: the window, starting at a word, from
    the split of the corpus the example belongs to (``prosg.data.corpus``: train / val / test hold
    different documents), so mixed with ``instruction`` it teaches a byte-level model English while
    the instruction examples teach it to follow the prompt. ``corpus_split`` null (default) = the
    split being generated. Nothing is a prompt answer: the task is skipped by the shortcut audit and
    by the distance metrics, and reported by its loss / perplexity.
    """

    name: ClassVar[str] = "text"
    prompt_answers: ClassVar[bool] = False

    window_len: int = 256
    corpus: str = "pydoc"
    corpus_split: str | None = None

    def __post_init__(self) -> None:
        require(self.window_len >= 1, f"text: window_len={self.window_len} must be >= 1")
        require(self.corpus in CORPORA, f"text: corpus={self.corpus!r}; choose one of {list(CORPORA)}")
        require(self.corpus_split in (None, "train", "val", "test"),
                f"text: corpus_split={self.corpus_split!r}; use null (the split generated), train, val or test")

    @property
    def slice_n(self) -> int:
        return 0

    @property
    def max_prompt_len(self) -> int:
        return 2

    @property
    def max_response_len(self) -> int:
        return self.window_len

    def text(self) -> bytes:
        """The corpus split this task reads, as ASCII bytes."""
        from prosg.data.corpus import split_bytes

        return split_bytes(self.corpus_split or "train")

    def generate(self, rng: np.random.Generator) -> dict[str, Any]:
        tok = self.tokenizer
        data = self.text()
        start = int(rng.integers(max(1, len(data) - self.window_len + 1)))
        # begin at a word: skip to just after the next space or newline (if one is near)
        for j in range(start, min(start + 32, len(data) - 1)):
            if data[j] in b" \n":
                start = j + 1 if len(data) - (j + 1) >= self.window_len else start
                break
        resp = list(data[start : start + self.window_len])
        n = len(resp)
        return self._finish([tok.bos_id, tok.sep_id], resp, [0] * n, [-1] * n, [1.0] * n, 0, [], math.nan)

    def scaled(self, scale: float) -> "TextTask":
        return self if scale == 1 else dataclasses.replace(self, window_len=max(1, int(round(self.window_len * scale))))

    def for_split(self, split: str) -> "TextTask":
        return self if self.corpus_split is not None else dataclasses.replace(self, corpus_split=split)

    def shortcut_baselines(self, answer_index: int) -> dict[str, float]:
        return {}  # never asked: a text example has no prompt answers
