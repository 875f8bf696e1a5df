import numpy as np
import pytest
import torch

from prosg.backbones.gpt import GPT, apply_rope, rope_cache
from prosg.data.tasks import make_task
from prosg.errors import ConfigError


def test_rope_is_relative():
    # q.k after rotation depends only on the position difference
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    def score(pq, pk):
        cq, sq = rope_cache(1, 8, pq, torch.device("cpu"))
        ck, sk = rope_cache(1, 8, pk, torch.device("cpu"))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()
    torch.testing.assert_close(score(5, 2), score(105, 102))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_attention_is_causal():
    model = GPT(vocab_size=20, d_model=32, n_layer=2, n_head=4).eval()
    ids = torch.randint(0, 20, (1, 10))
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 20
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_head_size_must_be_even():
    with pytest.raises(ConfigError, match="divisible by n_head"):
        GPT(vocab_size=10, d_model=30, n_head=4)


def test_learns_to_copy_previous_token():
    # a real training signal: 2-layer attention learns "predict the token 3 back" quickly
    torch.manual_seed(0)
    model = GPT(vocab_size=16, d_model=32, n_layer=2, n_head=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        ids = torch.randint(0, 16, (16, 24))
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, 2:-1].flatten(0, 1), ids[:, :-3].flatten())
        opt.zero_grad(); loss.backward(); opt.step()
    assert loss.item() < 0.5


@pytest.mark.parametrize("key_shift", [False, True])
def test_steps_match_parallel_with_and_without_key_shift(key_shift):
    torch.manual_seed(0)
    model = GPT(vocab_size=20, d_model=32, n_layer=2, n_head=4, key_shift=key_shift).eval()
    with torch.no_grad():  # a non-trivial mix, so the carried last key matters
        for block in model.h:
            if block.attn.key_shift is not None:
                block.attn.key_shift.uniform_(0.2, 0.9)
    ids = torch.randint(0, 20, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :3])
        state, steps = out.state, [out.logits]
        for t in range(3, 9):
            o = model.step(ids[:, t], state)
            state, steps = o.state, steps + [o.logits[:, None]]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    assert len(state[0]) == (3 if key_shift else 2)


@pytest.mark.slow
def test_key_shift_learns_associative_recall_fast():
    # key shift turns recall into one attention hop: a tiny model learns local key->value recall in
    # 150 steps, where the same model without it stays near chance (see the module docstring)
    task = make_task({"name": "recall", "n_facts": 2, "n_keys": 16, "n_values": 8, "response_len": 30})
    def batch(i):
        exs = [task.generate(np.random.default_rng([7, i, j])) for j in range(32)]
        ids = torch.tensor([e["prompt_ids"] + e["response_ids"] for e in exs])
        kind = torch.tensor([[0] * len(e["prompt_ids"]) + e["answer_kind"] for e in exs])
        return ids, kind > 0
    torch.manual_seed(0)
    model = GPT(vocab_size=task.vocab_size, d_model=64, n_layer=2, n_head=4, key_shift=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for i in range(250):
        ids, ans = batch(i)
        logits = model(ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[ans[:, 1:]], ids[:, 1:][ans[:, 1:]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids, ans = batch(10_000)
    with torch.no_grad():
        pred = model(ids).logits[:, :-1].argmax(-1)
    acc = (pred == ids[:, 1:])[ans[:, 1:]].float().mean().item()
    assert acc > 0.9, acc
