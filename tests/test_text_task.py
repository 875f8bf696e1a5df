"""The LM corpus (pydoc_data.topics prose, split by topic) and the ``text`` task that pretrains on it."""

import hashlib

import numpy as np
import pytest

from prosg.data import ConstructedDataModule
from prosg.data.audit import audit
from prosg.data.corpus import clean, corpus_info, documents, prose, split_text, to_ascii
from prosg.data.tasks import TextTask, example_rng, generate_example, make_task
from prosg.errors import ConfigError


def test_corpus_splits_share_no_document_and_hold_english():
    docs = documents()
    topics = {s: {t for g in d for t in g.split("+")} for s, d in docs.items()}
    paragraphs = {s: {p for text in d.values() for p in text.split("\n")} for s, d in docs.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not topics[a] & topics[b] and not paragraphs[a] & paragraphs[b], (a, b)
    assert {"assignment", "augassign"} <= topics["train"] | topics["val"] | topics["test"]
    assert any({"assignment", "augassign"} <= set(g.split("+")) for d in docs.values() for g in d)  # they share text
    info = corpus_info()["splits"]
    total = sum(v["chars"] for v in info.values())
    assert total > 200_000 and info["train"]["chars"] > 0.8 * total
    for s in ("val", "test"):
        assert info[s]["chars"] > 0.03 * total  # held-out splits of a few percent each
        assert info[s]["sha256"] == hashlib.sha256(split_text(s).encode()).hexdigest()
    text = split_text("train")
    assert text.isascii() and ">>>" not in text and "::=" not in text
    words = text.split()
    assert sum(w.strip('.,;:"()').isalpha() for w in words) > 0.7 * len(words)  # prose, not code
    assert split_text("test") not in text and split_text("test")[:200] not in text


def test_cleaning_keeps_prose_and_drops_code():
    assert prose("An *assignment* statement binds\n   names to objects.  [1]") == "An assignment statement binds names to objects."
    assert prose("   >>> x = 1\n   >>> print(x)\n   1") is None
    assert prose('   assignment_stmt ::= (target_list "=")+ expr') is None
    assert prose("for x in range(3):") is None and prose("Short heading") is None
    assert to_ascii("\u201cquoted\u201d \u2014 it\u2019s na\u00efve") == '"quoted"  -  it\'s naive'
    assert clean("Heading\n*******\n\nThe first sentence is long enough here.\n\n   x = f(y)\n") == \
        "The first sentence is long enough here."


def test_text_examples_are_windows_of_their_split_every_byte_trained():
    task = TextTask(window_len=64)
    for split in ("train", "val", "test"):
        t = task.for_split(split)
        ex = t.generate(example_rng(3, split, 5))
        assert ex["prompt_ids"] == [257, 259]  # <bos> <sep>
        assert len(ex["response_ids"]) == 64 and bytes(ex["response_ids"]).decode() in split_text(split)
        assert set(ex["answer_kind"]) == {0} and set(ex["loss_weight"]) == {1.0} and set(ex["distance"]) == {-1}
        assert ex["candidates"] == [] and ex["task"] == "text"
    # deterministic per (seed, split, index); a different index, seed or split gives another window
    a = generate_example([task.for_split("val")], [1.0], 0, "val", 7)
    assert a == generate_example([task.for_split("val")], [1.0], 0, "val", 7)
    assert a["response_ids"] != generate_example([task.for_split("val")], [1.0], 0, "val", 8)["response_ids"]
    assert a["response_ids"] != generate_example([task.for_split("val")], [1.0], 1, "val", 7)["response_ids"]
    assert TextTask(corpus_split="test").for_split("train").corpus_split == "test"  # an explicit split stays


def test_text_knobs_are_checked():
    with pytest.raises(ConfigError, match="corpus_split"):
        make_task({"name": "text", "corpus_split": "dev"})
    with pytest.raises(ConfigError, match="window_len"):
        make_task({"name": "text", "window_len": 0})


def test_mixture_with_instruction_reads_each_split_and_buckets_only_instruction_distances():
    dm = ConstructedDataModule(tasks=[{"name": "text", "window_len": 96},
                                      {"name": "instruction", "response_len": 160, "query_distances": [0, 96]}],
                               eval_distance_scale=2.0, test_size=64)
    assert [t.corpus_split for t in (dm.split_tasks[s][0] for s in ("train", "val", "test"))] == ["train", "val", "test"]
    assert dm.vocab_size == 260 and dm.pad_id == 256 and dm.tasks == ["text", "instruction"]
    assert dm.bucket_edges == ConstructedDataModule(tasks=[{"name": "instruction", "response_len": 160,
                                                           "query_distances": [0, 96]}], eval_distance_scale=2.0).bucket_edges
    ds = dm.dataset("test")
    examples = [ds[i] for i in range(64)]
    assert {e["task"] for e in examples} == {"text", "instruction"}
    # the shortcut audit: text has no prompt answers (skipped), instruction is audited as before
    text = [e for e in examples if e["task"] == "text"]
    assert audit(text, dm.split_tasks["test"][0], dm.bucket_edges) == []
    instr = [e for e in examples if e["task"] == "instruction"]
    assert audit(instr, dm.split_tasks["test"][1], dm.bucket_edges)


def test_text_window_starts_at_a_word():
    task = TextTask(window_len=48, corpus_split="train")
    starts = [bytes(task.generate(np.random.default_rng(i))["response_ids"])[:1] for i in range(20)]
    assert sum(s.isalpha() or s in (b'"', b"(") for s in starts) >= 18
