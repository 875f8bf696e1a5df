"""The constructed tasks: determinism, a brute-force recall solver, copy / instruction structure, knob validation."""

import hashlib
import json
import re

import numpy as np
import pytest

from prosg.data.tasks import (
    ASK,
    BOS,
    GENERATOR_VERSION,
    PAD,
    SEP,
    SET,
    CopyTask,
    InstructionTask,
    RecallTask,
    default_bucket_edges,
    generate_example,
    make_task,
)
from prosg.data.tasks.instruction import ADJECTIVES, NAMES, NOUNS, PREPS, SHORT, TRIGGERS, VERBS
from prosg.errors import ConfigError


def gen(task, i, split="train", seed=0):
    return generate_example([task], [1.0], seed, split, i)


# ---------------------------------------------------------------- determinism


def test_same_seed_and_index_give_the_same_example_and_others_differ():
    t = RecallTask()
    a, b = gen(t, 7), gen(RecallTask(), 7)
    assert a == b
    assert gen(t, 8) != a
    assert gen(t, 7, split="val") != a
    assert gen(t, 7, seed=1) != a
    # order of generation does not matter: no RNG is shared between examples
    forward = [gen(t, i) for i in range(10)]
    backward = [gen(t, i) for i in reversed(range(10))][::-1]
    assert forward == backward


# Pinned outputs: a change here means old datasets cannot be regenerated; bump GENERATOR_VERSION.
GOLDEN = {
    "recall": "9983ab8b89e2c59e3dc2b7ae01518ff5c7c2accd6570165fdea7883b616881c1",
    "copy": "290375009581f24b2512f55e3d8e8ae69c1e98b4a2482934c7580b0235bf3c19",
    "instruction": "ca819951d7d686903e8edc87fa4d8318c403f64eae6699dbeb6009d496dfffd4",
}


@pytest.mark.parametrize("task", [RecallTask(), CopyTask(), InstructionTask()], ids=lambda t: t.name)
def test_generator_output_is_pinned(task):
    exs = [gen(task, i) for i in range(5)]
    digest = hashlib.sha256(json.dumps(exs, sort_keys=True).encode()).hexdigest()
    assert GENERATOR_VERSION == "2"
    assert digest == GOLDEN[task.name]


@pytest.mark.parametrize(
    "task", [RecallTask(), RecallTask(response_len=100), CopyTask(seq_len=5, copy_len=5), InstructionTask(n_facts=3)],
    ids=lambda t: t.name,
)
def test_examples_follow_the_contract(task):
    for i in range(20):
        ex = gen(task, i)
        json.dumps(ex)  # JSON-serialisable (no numpy scalars)
        r = len(ex["response_ids"])
        assert len(ex["answer_kind"]) == len(ex["distance"]) == len(ex["loss_weight"]) == r
        assert len(ex["prompt_ids"]) <= task.max_prompt_len and r <= task.max_response_len
        ids = ex["prompt_ids"] + ex["response_ids"]
        assert all(0 <= t < task.vocab_size for t in ids)
        assert task.pad_id not in ids
        for j, (k, d) in enumerate(zip(ex["answer_kind"], ex["distance"])):
            assert k in (0, 1, 2)
            assert d == (j if k == 2 else -1)
        # the value set: what the prompt answered, not where; every prompt answer is in it
        assert ex["candidates"] and all(t in ex["candidates"] for t, k in zip(ex["response_ids"], ex["answer_kind"]) if k == 2)
        assert 0 < ex["chance"] < 1
        assert ex["task"] == task.name and ex["meta"]["index"] == i and ex["meta"]["generator_version"] == GENERATOR_VERSION


# ---------------------------------------------------------------- recall: brute-force solver


def solve_recall(prompt, response, key_range):
    """Recompute every answer from tokens alone: {position: (kind, distance, value)} plus consistency checks.

    Uses no generator internals: parses ``<bos> (k v)* <sep>`` and the ``<set>/<ask> k v`` stream.
    Returns None for an ask whose answer cannot be derived (the caller decides whether that is expected).
    """
    assert prompt[0] == BOS and prompt[-1] == SEP and len(prompt) % 2 == 0
    facts = {}
    for k, v in zip(prompt[1:-1:2], prompt[2:-1:2]):
        assert key_range[0] <= k < key_range[1]
        assert k not in facts, "prompt keys must be distinct"
        facts[k] = v
    local = {}
    answers = {}
    i = 0
    while i + 2 < len(response):
        op, k, v = response[i : i + 3]
        assert op in (SET, ASK)
        if op == SET:
            assert k not in facts, "a local fact must not rebind a prompt key"
            assert local.setdefault(k, v) == v, "a key must map to exactly one value"
        elif k in facts:
            answers[i + 2] = (2, i + 2, facts[k])
        elif k in local:
            answers[i + 2] = (1, -1, local[k])
        else:
            answers[i + 2] = None
        i += 3
    return answers


RECALL_CONFIGS = [
    RecallTask(),
    RecallTask(n_facts=2, n_keys=8, n_values=4, response_len=61, n_local_keys=2),
    RecallTask(n_facts=6, n_keys=12, response_len=200, n_prompt_queries=6, query_distances=[20, 150], local_query_rate=0.9),
    RecallTask(local_query_rate=0.0, n_prompt_queries=2),
    RecallTask(local_query_rate=1.0, prompt_answer_weight=3.0, local_answer_weight=0.5, other_weight=0.1),
    RecallTask(n_prompt_queries=0, query_distances=[0, 1]),  # no prompt queries: local work only
]


@pytest.mark.parametrize("task", RECALL_CONFIGS, ids=lambda t: f"f{t.n_facts}k{t.n_keys}r{t.response_len}q{t.local_query_rate}")
def test_brute_force_solver_reproduces_every_recall_label(task):
    keys = (task.key_base, task.key_base + task.n_keys)
    for i in range(40):
        ex = gen(task, i)
        resp = ex["response_ids"]
        assert len(resp) == task.response_len and ex["n_facts"] == task.n_facts
        answers = solve_recall(ex["prompt_ids"], resp, keys)
        assert None not in answers.values(), "every ask must have exactly one derivable answer"
        for j in range(len(resp)):
            kind, dist, w = ex["answer_kind"][j], ex["distance"][j], ex["loss_weight"][j]
            if j in answers:
                exp_kind, exp_dist, exp_val = answers[j]
                assert (kind, dist) == (exp_kind, exp_dist)
                assert resp[j] == exp_val
                assert w == (task.prompt_answer_weight if kind == 2 else task.local_answer_weight)
            else:
                assert (kind, dist, w) == (0, -1, task.other_weight)
        n2 = sum(k == 2 for k in ex["answer_kind"])
        assert n2 == task.n_prompt_queries
        # kind-2 answers are NOT derivable from the response alone, kind-1 answers are
        alone = solve_recall([BOS, SEP], resp, keys)
        for j, k in enumerate(ex["answer_kind"]):
            if k == 2:
                assert alone[j] is None
                assert resp[j - 1] not in resp[: j - 1], "a prompt key asked twice could be copied from the response"
            elif k == 1:
                assert alone[j] == (1, -1, resp[j])


def test_recall_prompt_queries_cover_every_distance_bucket_independently_of_the_fact():
    task = RecallTask(query_distances=[0, 64])  # one query per example, distance drawn bucket-first
    edges = task.edges
    assert edges == [0, 16, 32, 63]  # ends just past the largest answer distance generated (62)
    buckets, facts = [], []
    for i in range(400):
        ex = gen(task, i)
        (j,) = [j for j, k in enumerate(ex["answer_kind"]) if k == 2]
        buckets.append(int(np.searchsorted(edges, ex["distance"][j], side="right")) - 1)
        keys = ex["prompt_ids"][1:-1:2]
        facts.append(keys.index(ex["response_ids"][j - 1]))
    counts = np.bincount(buckets, minlength=3)
    assert counts.min() > 100  # each bucket ~1/3
    # which fact is asked (its prompt position) does not depend on the distance bucket
    table = np.zeros((3, 4))
    for b, f in zip(buckets, facts):
        table[b, f] += 1
    expected = counts[:, None] * np.bincount(facts, minlength=4)[None, :] / len(facts)
    chi2 = ((table - expected) ** 2 / expected).sum()
    assert chi2 < 22.5  # 6 degrees of freedom: p ~ 0.001
    # more queries: all buckets covered over the dataset, none outside the range
    task = RecallTask(response_len=256, n_prompt_queries=2, query_distances=[10, 200])
    hit = set()
    for i in range(60):
        ex = gen(task, i)
        d = [x for x, k in zip(ex["distance"], ex["answer_kind"]) if k == 2]
        assert all(10 <= x <= 200 for x in d) and len(d) == 2
        hit |= set(np.searchsorted(task.edges, d, side="right") - 1)
    assert hit == {0, 1, 2, 3, 4}  # edges [0, 16, 32, 64, 128, 201]


def test_recall_prompt_values_are_distinct_by_default():
    for i in range(50):
        ex = gen(RecallTask(n_facts=8, n_values=8), i)
        assert sorted(ex["candidates"]) == sorted(set(ex["candidates"])) == ex["prompt_ids"][2:-1:2] or \
            sorted(ex["candidates"]) == sorted(ex["prompt_ids"][2:-1:2])
        assert len(set(ex["candidates"])) == 8  # a permutation of all values: the value set says nothing


def test_recall_local_keys_fill_the_state():
    task = RecallTask(n_facts=4, n_keys=16)
    ex = gen(task, 0)
    resp = ex["response_ids"]
    set_keys = {resp[i + 1] for i in range(0, len(resp) - 2, 3) if resp[i] == SET}
    assert len(set_keys) == 12  # every non-prompt key is introduced as a local fact
    assert not set_keys & set(ex["prompt_ids"][1:-1:2])


def test_scaling_and_overrides_revalidate():
    t = RecallTask(query_distances=[0, 64])
    s = t.scaled(3)
    assert (s.response_len, s.query_distances) == (384, [0, 192])
    assert s.edges == [0, 16, 32, 64, 128, 192]
    assert t.with_overrides({"copy_len": 3}) is t  # knob of another task: ignored here
    assert t.with_overrides({"n_facts": 2}).n_facts == 2
    with pytest.raises(ConfigError, match="beyond the response"):
        t.with_overrides({"response_len": 32})
    assert CopyTask(gap_range=[0, 10]).scaled(2.5).gap_range == [0, 25]
    assert InstructionTask(response_len=200).scaled(2).response_len == 400
    assert make_task(t.to_dict()) == t


# ---------------------------------------------------------------- copy and instruction


def test_copy_reproduces_part_of_the_prompt_once_after_random_filler():
    task = CopyTask(seq_len=6, n_symbols=7, copy_len=3, gap_range=[0, 30], sep_weight=0.5)
    gaps = set()
    for i in range(40):
        ex = gen(task, i)
        seq = ex["prompt_ids"][1:-1]
        assert ex["prompt_ids"][0] == BOS and ex["prompt_ids"][-1] == SEP and len(seq) == 6
        resp = ex["response_ids"]
        gap = resp.index(SEP)
        gaps.add(gap)
        assert resp[gap + 1 :] == seq[:3] and SEP not in resp[:gap] and 0 <= gap <= 30
        assert ex["answer_kind"] == [0] * (gap + 1) + [2] * 3
        assert ex["distance"][gap + 1 :] == [gap + 1, gap + 2, gap + 3]
        assert ex["loss_weight"][gap] == 0.5 and ex["candidates"] == seq
    assert len(gaps) > 10  # the distance varies


def test_instruction_names_one_trigger_once_at_a_controlled_distance():
    task = InstructionTask(n_facts=3, response_len=300)
    tok = task.tokenizer
    vocab = set(ADJECTIVES) | set(NOUNS) | set(VERBS) | set(PREPS) | {"the", "one", "that", "named"}
    for i in range(25):
        ex = gen(task, i)
        prompt, resp = tok.decode(ex["prompt_ids"]), tok.decode(ex["response_ids"])
        rules = dict(re.findall(r"the (\w+) is named (\w+)", prompt))
        assert len(rules) == 3 and set(rules) <= set(TRIGGERS) and set(rules.values()) <= set(NAMES)
        (d,) = [j for j, k in enumerate(ex["answer_kind"]) if k == 2]
        assert ex["distance"][d] == d and len(ex["response_ids"]) <= 300
        m = re.search(r"(\w+) named (\w+)", resp)
        trigger, name = m.groups()
        assert m.start(2) == d and rules[trigger] == name  # the scored byte is the first letter of the right name
        assert resp.count(" named ") == 1 and sum(resp.count(t) for t in TRIGGERS) == 1
        assert not any(n in resp[:d] for n in NAMES)  # nothing before it says which name
        words = set(re.findall(r"[a-z]+", resp.replace(name, "").replace(trigger, "").lower()))
        assert words <= vocab | {w for s in SHORT for w in re.findall(r"[a-z]+", s.lower())}
        assert ex["candidates"] == [ord(n[0]) for n in rules.values()] and ex["chance"] == 1 / 16
    assert len({n[0] for n in NAMES}) == len(NAMES)  # first letters decide the name


def test_default_bucket_edges():
    assert default_bucket_edges(128) == [0, 16, 32, 64, 128]
    assert default_bucket_edges(100) == [0, 16, 32, 64, 100]
    assert default_bucket_edges(10) == [0, 10]


# ---------------------------------------------------------------- impossible knobs


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"name": "recall", "n_facts": 16, "n_keys": 16}, "n_keys > n_facts"),
        ({"name": "recall", "n_facts": 20, "n_keys": 16}, "n_keys > n_facts"),
        ({"name": "recall", "n_facts": 4, "n_prompt_queries": 5}, "n_prompt_queries"),
        ({"name": "recall", "response_len": 64, "query_distances": [0, 64]}, "beyond the response"),
        ({"name": "recall", "query_distances": [50, 10]}, "min <= max"),
        ({"name": "recall", "query_distances": [3, 4]}, "widen query_distances"),
        ({"name": "recall", "n_values": 1}, "n_values"),
        ({"name": "recall", "local_query_rate": 1.5}, "local_query_rate"),
        ({"name": "recall", "n_local_keys": 13}, "n_local_keys"),
        ({"name": "recall", "bucket_edges": [0, 32, 16]}, "bucket_edges"),
        ({"name": "recall", "n_facts": "4"}, "wrong type"),
        ({"name": "recall", "n_fact": 4}, "unknown knob"),
        ({"name": "copy", "seq_len": 0}, "seq_len"),
        ({"name": "recall", "n_facts": 5, "n_values": 4}, "distinct_values"),
        ({"name": "copy", "copy_len": 20}, "copy_len"),
        ({"name": "instruction", "n_facts": 11}, "n_facts"),
        ({"name": "instruction", "response_len": 60}, "raise response_len"),
        ({"name": "instruction", "n_keywords": 99}, "n_keywords"),
        ({"name": "sorting"}, "unknown"),
    ],
)
def test_impossible_knobs_fail_at_construction(spec, match):
    with pytest.raises(ConfigError, match=match):
        make_task(spec)


def test_pad_is_reserved():
    assert PAD == 0 and RecallTask().pad_id == 0 and InstructionTask().pad_id == 256
