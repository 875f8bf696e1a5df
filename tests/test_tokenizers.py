"""Tokenizers from local files: RWKV World vocab parsing and greedy matching, HF tokenizer.json, load_tokenizer."""

from __future__ import annotations

import json

import pytest

from prosg.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, WorldTokenizer, load_tokenizer
from prosg.errors import DataError

TEXTS = [
    "hello world, help!",
    "naïve café — Ångström",
    "你好世界，今天是美好的一天。",
    "emoji 😀🤖 and mixed 日本語 text\n\ttabs",
    "",
]

# Multi-byte tokens (id, literal as written in the file); ids >= 300 leave room for the 256 bytes.
MULTI = [
    (300, "'he'"),
    (301, "'hel'"),
    (302, "'hello'"),
    (303, "' world'"),
    (304, "'你好'"),
    (305, r"b'\xe4\xb8'"),  # a partial UTF-8 sequence, as the real vocab has
    (306, "'é'"),
    (307, "'a b'"),  # a space inside the literal
    (310, "'\\n\\t'"),
]


def byte_line(b: int) -> str:
    """The vocab line for single byte b, written as the real file does: str if printable ASCII, else bytes."""
    lit = repr(chr(b)) if 32 <= b < 127 else repr(bytes([b]))
    return f"{b + 1} {lit} 1"


def write_vocab(path, extra_lines: list[str] | None = None):
    import ast

    lines = [byte_line(b) for b in range(256)]
    for idx, lit in MULTI:
        value = ast.literal_eval(lit)
        n = len(value.encode("utf-8") if isinstance(value, str) else value)
        lines.append(f"{idx} {lit} {n}")
    lines += extra_lines or []
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def world(tmp_path):
    return WorldTokenizer(write_vocab(tmp_path / "rwkv_vocab_v20230424.txt"))


def test_world_round_trip(world):
    assert world.vocab_size == 311 and world.pad_id == world.eos_id == 0
    for text in TEXTS:
        ids = world.encode(text)
        assert all(0 < i < world.vocab_size for i in ids)
        assert world.decode(ids) == text
    assert isinstance(world, Tokenizer)


def test_world_greedy_longest_match(world):
    b = lambda ch: ord(ch) + 1  # noqa: E731 - single-byte id
    assert world.encode("hello") == [302]
    assert world.encode("help") == [301, b("p")]
    assert world.encode("hehello world") == [300, 302, 303]
    assert world.encode("a b") == [307]
    # 你好 is one token; 世 = e4 b8 96 -> the partial token e4b8 then the single byte 0x96.
    assert world.encode("你好世") == [304, 305, 0x96 + 1]
    assert world.encode("é") == [306]
    assert world.encode("\n\t\n") == [310, b("\n")]
    # Without the longest-match rule "hello" would start with "he" or "hel".
    assert len(world.encode("hello hello")) == 3


def test_world_decode_specials(world):
    assert world.decode([0, 302, 0]) == "hello"  # end-of-text dropped
    assert world.decode([302, 999]) == "hello\ufffd"  # id outside the vocab
    assert world.decode([305]) == "\ufffd"  # half a character: replaced, no exception


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ("400 'abc' 4", "has 3 bytes but the line says 4"),
        ("400 'abc", "expected '<id> <literal> <byte length>'"),
        ("400 'abc 3", "cannot parse"),
        ("x 'abc' 3", "cannot parse"),
        ("400 123 3", "non-empty str or bytes"),
        ("302 'zzz' 3", "id 302 appears twice"),
        ("401 'hello' 5", "already has id 302"),
        ("0 'q' 1", "id 0 is invalid"),
    ],
)
def test_world_corrupt_vocab_names_line(tmp_path, bad_line, match):
    path = write_vocab(tmp_path / "rwkv_vocab_v20230424.txt", ["500 'ok' 2", bad_line])
    line_no = 256 + len(MULTI) + 2
    with pytest.raises(DataError, match=match) as err:
        WorldTokenizer(path)
    assert f"rwkv_vocab_v20230424.txt:{line_no}:" in str(err.value)


def test_world_missing_byte(tmp_path):
    path = tmp_path / "rwkv_vocab_small.txt"
    path.write_text("1 'a' 1\n2 'ab' 2\n", encoding="utf-8")
    tok = WorldTokenizer(path)
    assert tok.encode("aab") == [1, 2] and tok.vocab_size == 3
    with pytest.raises(DataError, match="byte 0x63 at offset 1 has no token"):
        tok.encode("ac")


def train_hf(tmp_path, specials: list[str]):
    """A tiny byte-level BPE tokenizer trained on a few sentences, saved as tmp_path/tokenizer.json."""
    from tokenizers import Tokenizer as HFT
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFT(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 5, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok


def test_hf_round_trip_via_load_tokenizer(tmp_path):
    ref = train_hf(tmp_path, ["<pad>", "</s>"])
    for spec in (tmp_path, tmp_path / "tokenizer.json", str(tmp_path)):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
        assert tok.vocab_size == ref.get_vocab_size()
        assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, None)
        for text in TEXTS + ["unseen: ñ 🦀 ギ"]:
            ids = tok.encode(text)
            assert ids == ref.encode(text, add_special_tokens=False).ids
            assert tok.decode(ids) == text
    assert tok.decode([1] + tok.encode("hi")) == "hi"  # special tokens skipped


def test_hf_special_ids_from_config(tmp_path):
    train_hf(tmp_path, ["<|endoftext|>", "<unk>"])
    tok = HFTokenizer(tmp_path)
    assert (tok.pad_id, tok.eos_id) == (None, 0)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<unk>"}, "pad_token": "<|endoftext|>"}), encoding="utf-8"
    )
    tok = HFTokenizer(tmp_path)
    assert (tok.pad_id, tok.eos_id) == (0, 1)


def test_load_tokenizer_rejects_other_specs(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    vocab = write_vocab(tmp_path / "rwkv_vocab_v20230424.txt")
    assert isinstance(load_tokenizer(vocab), WorldTokenizer)

    other = tmp_path / "vocab.txt"
    other.write_text("1 'a' 1\n", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    for spec, problem in [
        ("gpt2", "does not exist"),
        (tmp_path / "missing.json", "does not exist"),
        (other, "not a recognised"),
        (tmp_path / "empty", "not a recognised"),
    ]:
        with pytest.raises(DataError, match=problem) as err:
            load_tokenizer(spec)
        assert "tokenizer.json" in str(err.value) and "rwkv_vocab" in str(err.value)

    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="cannot load .*broken.json"):
        load_tokenizer(broken)
