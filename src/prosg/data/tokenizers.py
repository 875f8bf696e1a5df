"""Tokenizers from local files only: byte-level (built in), HF ``tokenizer.json``, RWKV World."""

from __future__ import annotations

import ast
import fnmatch
import json
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

from prosg.errors import DataError


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and ``prosg generate`` need from a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Text -> token ids."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text (invalid UTF-8 replaced)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus special ids from 256: the built-in default."""

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>")

    def __init__(self) -> None:
        self.vocab_size = 256 + len(self.SPECIALS)
        self.special_ids = {name: 256 + i for i, name in enumerate(self.SPECIALS)}
        self.pad_id = self.special_ids["<pad>"]
        self.bos_id = self.special_ids["<bos>"]
        self.eos_id = self.special_ids["<eos>"]
        self.sep_id = self.special_ids["<sep>"]

    def encode(self, text: str) -> list[int]:
        """Text -> UTF-8 byte ids."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Byte ids -> text; special ids are dropped."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


_ACCEPTED = (
    "None or 'byte' (built-in byte tokenizer), a tokenizer.json file or a directory containing one "
    "(HF tokenizers), or an rwkv_vocab*.txt file (RWKV World, e.g. rwkv_vocab_v20230424.txt)"
)


class _TrieNode:
    """One byte of a token prefix; ``id`` is set where a whole token ends."""

    __slots__ = ("children", "id")

    def __init__(self) -> None:
        self.children: dict[int, _TrieNode] = {}
        self.id: int | None = None


class WorldTokenizer:
    """RWKV World tokenizer: greedy longest byte match over a local ``rwkv_vocab_v20230424.txt``.

    Each vocab line is ``<id> <python str or bytes literal> <byte length>``; strings count as
    their UTF-8 bytes. Id 0 is end-of-text/pad (not in the file). Decoding drops id 0 and shows
    ids missing from the vocab as U+FFFD, so sampled ids past the vocab never crash generation.
    """

    def __init__(self, vocab_path: str | os.PathLike) -> None:
        self.path = Path(vocab_path)
        self.pad_id = self.eos_id = 0
        self.id_to_bytes: dict[int, bytes] = {}
        self._root = _TrieNode()
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read RWKV World vocab {self.path}: {e}; pass a UTF-8 rwkv_vocab*.txt file") from e
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                self._add(*self._parse(line, lineno), lineno)
        if not self.id_to_bytes:
            raise DataError(f"RWKV World vocab {self.path} has no tokens; pass a non-empty rwkv_vocab*.txt file")
        self.vocab_size = max(self.id_to_bytes) + 1

    def _parse(self, line: str, lineno: int) -> tuple[int, bytes]:
        where = f"{self.path}:{lineno}"
        # The literal may itself contain spaces: the id ends at the first space, the length starts after the last.
        first, last = line.find(" "), line.rfind(" ")
        if first < 0 or last <= first:
            raise DataError(
                f"{where}: expected '<id> <literal> <byte length>', got {line!r}; fix or re-download the vocab"
            )
        try:
            idx, length = int(line[:first]), int(line[last + 1 :])
            token = ast.literal_eval(line[first + 1 : last])
        except (ValueError, SyntaxError) as e:
            raise DataError(f"{where}: cannot parse {line!r} ({e}); fix or re-download the vocab") from e
        if isinstance(token, str):
            token = token.encode("utf-8")
        if not isinstance(token, bytes) or not token:
            raise DataError(f"{where}: token must be a non-empty str or bytes literal, got {token!r}")
        if len(token) != length:
            raise DataError(
                f"{where}: token {token!r} has {len(token)} bytes but the line says {length}; "
                "the vocab file is corrupt, re-download it"
            )
        return idx, token

    def _add(self, idx: int, token: bytes, lineno: int) -> None:
        where = f"{self.path}:{lineno}"
        if idx <= 0:
            raise DataError(f"{where}: id {idx} is invalid; ids start at 1 (0 is end-of-text)")
        if idx in self.id_to_bytes:
            raise DataError(f"{where}: id {idx} appears twice; the vocab file is corrupt, re-download it")
        node = self._root
        for byte in token:
            node = node.children.setdefault(byte, _TrieNode())
        if node.id is not None:
            raise DataError(f"{where}: token {token!r} already has id {node.id}; the vocab file is corrupt")
        node.id = idx
        self.id_to_bytes[idx] = token

    def encode_bytes(self, data: bytes) -> list[int]:
        """Bytes -> ids, taking the longest vocab token at each position."""
        ids: list[int] = []
        i, n = 0, len(data)
        while i < n:
            node, best, end = self._root, None, i
            for j in range(i, n):
                node = node.children.get(data[j])
                if node is None:
                    break
                if node.id is not None:
                    best, end = node.id, j + 1
            if best is None:
                raise DataError(
                    f"byte 0x{data[i]:02x} at offset {i} has no token in {self.path}; "
                    "a World vocab must contain all 256 single bytes"
                )
            ids.append(best)
            i = end
        return ids

    def encode(self, text: str) -> list[int]:
        """Text -> ids (greedy longest match over its UTF-8 bytes)."""
        return self.encode_bytes(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Ids -> text: id 0 dropped, unknown ids as U+FFFD, invalid UTF-8 replaced."""
        unknown = "\ufffd".encode("utf-8")
        data = b"".join(self.id_to_bytes.get(int(i), unknown) for i in ids if int(i) != 0)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A local HF ``tokenizer.json`` (the ``tokenizers`` library); never touches the network.

    ``pad_id``/``eos_id``/``bos_id`` come from a ``tokenizer_config.json`` beside the file, else
    from the tokenizer's padding setting and common token names; None where undefined.
    """

    _FALLBACK = {
        "pad": ("<pad>", "<|pad|>", "[PAD]"),
        "eos": ("</s>", "<|endoftext|>", "<eos>", "<|eos|>", "<|end_of_text|>"),
        "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>"),
    }

    def __init__(self, path: str | os.PathLike, add_special_tokens: bool = False) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        self.path = path / "tokenizer.json" if path.is_dir() else path
        if not self.path.is_file():
            raise DataError(f"{self.path} does not exist; pass a local tokenizer.json or a directory containing one")
        try:
            self._tok = _HFTokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust side raises plain Exception on malformed JSON
            raise DataError(f"cannot load {self.path} as a HF tokenizer.json ({e}); pass a valid tokenizer.json") from e
        self.add_special_tokens = add_special_tokens
        # Added tokens may sit past the model vocab; the largest id decides the embedding size.
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        config = self._read_config(self.path.parent / "tokenizer_config.json")
        ids = {role: self._special_id(role, config) for role in self._FALLBACK}
        padding = self._tok.padding
        if ids["pad"] is None and padding is not None:
            ids["pad"] = padding.get("pad_id")
        self.pad_id: int | None = ids["pad"]
        self.eos_id: int | None = ids["eos"]
        self.bos_id: int | None = ids["bos"]

    @staticmethod
    def _read_config(path: Path) -> dict:
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read {path}: {e}; fix it or delete it to fall back to token names") from e

    def _special_id(self, role: str, config: dict) -> int | None:
        token = config.get(f"{role}_token")
        if isinstance(token, dict):  # {"content": "</s>", ...} in newer configs
            token = token.get("content")
        names = (token,) if isinstance(token, str) else self._FALLBACK[role]
        for name in names:
            idx = self._tok.token_to_id(name)
            if idx is not None:
                return idx
        return None

    def encode(self, text: str) -> list[int]:
        """Text -> ids (no special tokens unless ``add_special_tokens``)."""
        return self._tok.encode(text, add_special_tokens=self.add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        """Ids -> text; special tokens are skipped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(spec: str | os.PathLike | None) -> Tokenizer:
    """``None``/"byte" -> ByteTokenizer; tokenizer.json (or its dir) -> HF; rwkv_vocab*.txt -> World."""
    if spec is None or str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return HFTokenizer(path)
    if path.is_file() and path.suffix == ".json":
        return HFTokenizer(path)
    if path.is_file() and fnmatch.fnmatch(path.name, "rwkv_vocab*.txt"):
        return WorldTokenizer(path)
    problem = "does not exist" if not path.exists() else "is not a recognised tokenizer file or directory"
    raise DataError(
        f"tokenizer {str(spec)!r} {problem}; accepted: {_ACCEPTED}. Files are read locally only, never downloaded"
    )
