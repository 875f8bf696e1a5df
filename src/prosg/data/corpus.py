"""English text every Python install carries: the CPython documentation topics (``pydoc_data.topics``).

The corpus is ``pydoc_data.topics.topics``: the ~80 topics of the Python Language Reference and
library docs that ``help("topic")`` prints (``assignment``, ``specialnames``, ``types``, ...), about
465k characters in CPython 3.11, shipped in the standard library (never downloaded). Each topic is
one document, cleaned to prose: paragraphs (blank-line separated) that read as English are kept —
at least ``MIN_WORDS`` words, ending like a sentence, mostly letters, no grammar rules (``::=``),
interpreter sessions (``>>>``) or code lines — with whitespace collapsed, ``*emphasis*`` markers and
bullets dropped and typographic quotes and dashes made ASCII; a document is its paragraphs joined by
newlines. pydoc repeats sections between topics (``augassign`` is part of ``assignment``), so topics
that share a paragraph form one document (each paragraph kept once). Documents go to ``test`` /
``val`` / ``train`` in the order of the sha256 of their first topic name (test until it holds
``HELD_OUT`` of the characters, then val, the rest train; a document that would overfill a held-out
split trains): no paragraph is shared between splits, and the split does not depend on dict order. The topics differ between Python
versions: ``corpus_info`` records the version and the sha256 of every split's text.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import unicodedata

SOURCE = "pydoc_data.topics"
MIN_WORDS = 5
MIN_LETTERS = 0.78  # letters among a kept paragraph's non-space characters (code sits well below)
HELD_OUT = 0.05  # share of the characters in each of test and val
# grammar rules, interpreter sessions, braces, statement headers (``for x in y:``), import lines
CODE = re.compile(r"::=|>>>|[{}]|^\s*(def|class|for|if|elif|else|while|with|try|except|finally)\b[^.]*:\s*$"
                  r"|^\s*(import \w+|from [\w.]+ import)", re.MULTILINE)
ASCII = {"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2014": " - ", "\u2013": "-", "\u2026": "...",
         "\u00a0": " "}


def to_ascii(text: str) -> str:
    """Typographic quotes, dashes and ellipses as ASCII; other accents stripped, what is left dropped."""
    for k, v in ASCII.items():
        text = text.replace(k, v)
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def prose(paragraph: str) -> str | None:
    """One paragraph as a line of prose, or None when it is code, grammar, a heading or too short."""
    if CODE.search(paragraph):
        return None
    text = " ".join(to_ascii(paragraph).split())
    text = re.sub(r"^\* ", "", text)  # a bullet
    text = re.sub(r"\*(\S[^*]*?)\*", r"\1", text)  # *emphasis* -> emphasis
    text = re.sub(r"\s*\[\d+\]", "", text)  # footnote marks
    chars = [c for c in text if not c.isspace()]
    words = re.findall(r"[A-Za-z]{2,}", text)
    if len(words) < MIN_WORDS or not text.endswith((".", ":", "?", "!", ".)")):
        return None
    if sum(c.isalpha() for c in chars) < MIN_LETTERS * len(chars):
        return None
    return text


def clean(document: str) -> str:
    """A topic's prose paragraphs joined by newlines ('' when none is left)."""
    kept = (prose(p) for p in re.split(r"\n\s*\n", document))
    return "\n".join(p for p in kept if p)


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def groups(docs: dict[str, list[str]]) -> list[list[str]]:
    """Topics joined when they share a paragraph (pydoc repeats sections: ``augassign`` inside ``assignment``),
    so that splitting by group shares no text; each group's topics sorted, groups by their first topic."""
    parent = {name: name for name in docs}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    owner: dict[str, str] = {}
    for name in sorted(docs):
        for para in docs[name]:
            if para in owner:
                parent[root(name)] = root(owner[para])
            owner.setdefault(para, name)
    out: dict[str, list[str]] = {}
    for name in sorted(docs):
        out.setdefault(root(name), []).append(name)
    return sorted(out.values())


@functools.lru_cache(maxsize=1)
def documents() -> dict[str, dict[str, str]]:
    """split -> {group name: cleaned text}, the split assignment described in the module docstring."""
    import pydoc_data.topics

    paragraphs = {name: [p for p in clean(text).split("\n") if p] for name, text in pydoc_data.topics.topics.items()}
    paragraphs = {k: v for k, v in paragraphs.items() if v}
    docs = {}
    for group in groups(paragraphs):
        unique = dict.fromkeys(p for name in group for p in paragraphs[name])  # first occurrence, in order
        docs["+".join(group)] = "\n".join(unique)
    total = sum(len(v) for v in docs.values())
    out: dict[str, dict[str, str]] = {"test": {}, "val": {}, "train": {}}
    held = {"test": 0, "val": 0}
    for name in sorted(docs, key=lambda g: _key(g.split("+")[0])):
        room = lambda s: held[s] < HELD_OUT * total and held[s] + len(docs[name]) <= 1.5 * HELD_OUT * total  # noqa: E731,B023
        split = next((s for s in ("test", "val") if room(s)), "train")  # a document too big to hold out trains
        held[split] = held.get(split, 0) + len(docs[name])
        out[split][name] = docs[name]
    return out


@functools.lru_cache(maxsize=4)
def split_bytes(split: str) -> bytes:
    """``split_text(split)`` as ASCII bytes, encoded once (the text task slices it for every example)."""
    return split_text(split).encode("ascii")


@functools.lru_cache(maxsize=4)
def split_text(split: str) -> str:
    """The text of one split ('train', 'val' or 'test'): its documents in name order, newline-joined."""
    docs = documents()
    if split not in docs:
        from prosg.errors import ConfigError

        raise ConfigError(f"corpus split {split!r} unknown; use one of {list(docs)}")
    return "\n".join(docs[split][name] for name in sorted(docs[split]))


def corpus_info() -> dict:
    """What a checkpoint's provenance records: source, Python version, per split topics, characters, sha256."""
    return {
        "source": f"{SOURCE} (CPython documentation topics, stdlib), cleaned to prose by prosg.data.corpus",
        "python": sys.version.split()[0],
        "splits": {
            s: {"topics": sum(len(g.split("+")) for g in documents()[s]), "chars": len(split_text(s)),
                "sha256": hashlib.sha256(split_text(s).encode()).hexdigest()}
            for s in ("train", "val", "test")
        },
    }
