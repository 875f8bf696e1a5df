import pytest
import torch

from prosg.backbones.gpt import GPT, apply_rope, rope_cache
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
