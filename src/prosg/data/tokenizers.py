"""Tokenizers from local files only: byte-level (built in), HF ``tokenizer.json``, RWKV World."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


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
