"""Forgetting metrics on hand-made inputs whose values are computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prosg.errors import ConfigError, DataError
from prosg import results
from prosg.metrics import (
    Binding,
    ForgettingCurve,
    ForgettingMetrics,
    ResponsePerplexity,
    SliceAccuracy,
    half_life,
    next_token_correct,
    trapezoid_area,
)

EDGES = [0, 4, 8, 16]  # midpoints (lo + hi - 1) / 2: 1.5, 5.5, 11.5


def rows(*entries: tuple[int, int, bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kind, distance, correct) triples -> (correct, distance, answer_kind), each (1, N)."""
    kind = torch.tensor([[k for k, _, _ in entries]])
    dist = torch.tensor([[d for _, d, _ in entries]])
    correct = torch.tensor([[c for _, _, c in entries]])
    return correct, dist, kind


def curve_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bucket 0: 4/4, bucket 1: 3/4, bucket 2: 1/4, overflow: 1/2, plus ignored positions."""
    entries = [(2, d, True) for d in (0, 1, 2, 3)]
    entries += [(2, 4, True), (2, 5, True), (2, 6, False), (2, 7, True)]
    entries += [(2, 8, False), (2, 9, True), (2, 12, False), (2, 15, False)]
    entries += [(2, 20, True), (2, 300, False)]
    entries += [(1, -1, True), (1, 5, False), (0, -1, True), (0, 3, False)]  # other kinds: not counted
    return rows(*entries)


def test_pure_area_and_half_life():
    assert math.isnan(trapezoid_area([], []))
    assert trapezoid_area([3.0], [0.4]) == 0.4
    # (10 * (1 + .5) / 2 + 30 * (.5 + .5) / 2) / 40
    assert trapezoid_area([0, 10, 40], [1.0, 0.5, 0.5]) == pytest.approx((7.5 + 15) / 40)
    assert half_life([0, 10, 20], [0.8, 0.6, 0.2]) == pytest.approx(15.0)  # (0.6-0.4)/(0.6-0.2) of the way
    assert half_life([0, 10, 20], [1.0, 0.4, 0.9]) == pytest.approx(0.5 / 0.6 * 10)  # first crossing counts
    assert half_life([0, 10], [1.0, 0.5]) == pytest.approx(10.0)  # exactly half counts as fallen
    assert half_life([0, 10], [1.0, 0.6]) == math.inf
    assert math.isnan(half_life([], []))
    assert math.isnan(half_life([0, 10], [0.0, 0.0]))  # nothing remembered, nothing to forget


def test_forgetting_curve_by_hand():
    m = ForgettingCurve(EDGES)
    m.update(*curve_data())
    out = {k: float(v) for k, v in m.compute().items()}
    buckets = ("0-4", "4-8", "8-16", "16-inf")
    stats = ("acc", "bind_err", "not_prompt", "ceiling", "chance", "n", "dmin", "dmax")
    assert set(out) == {f"{s}/{b}" for s in stats for b in buckets} | {
        "acc", "bind_err", "not_prompt", "ceiling", "chance", "area", "half_life"}
    # each bucket reports how many answers it holds and the distances it really spans
    assert [out[f"n/{b}"] for b in buckets] == [4, 4, 4, 2]
    assert (out["dmin/0-4"], out["dmax/0-4"], out["dmin/16-inf"], out["dmax/16-inf"]) == (0, 3, 20, 300)
    assert math.isnan(out["bind_err"]) and math.isnan(out["chance"])  # no answer sets given
    assert out["acc/0-4"] == 1.0 and out["acc/4-8"] == 0.75 and out["acc/8-16"] == 0.25
    assert out["acc/16-inf"] == 0.5
    assert out["acc"] == pytest.approx(9 / 14)
    # trapezoid over (1.5, 1), (5.5, .75), (11.5, .25): (4 * .875 + 6 * .5) / 10
    assert out["area"] == pytest.approx(0.65)
    # half of 1.0 is crossed between 5.5 (.75) and 11.5 (.25), half way
    assert out["half_life"] == pytest.approx(8.5)

    mids, acc, counts = m.curve()
    torch.testing.assert_close(mids, torch.tensor([1.5, 5.5, 11.5], dtype=torch.float64))
    torch.testing.assert_close(acc, torch.tensor([1.0, 0.75, 0.25], dtype=torch.float64))
    assert counts.tolist() == [4, 4, 4]


def test_binding_errors_outside_answers_and_reference_lines_by_hand():
    # one sample, prompt answers at distances 1, 2, 5, 9; the prompt's answer set is {7, 8, 9}
    target = torch.tensor([[0, 7, 8, 9, 0, 7, 0, 0, 0, 8]])
    pred = torch.tensor([[0, 7, 9, 3, 0, 8, 0, 0, 0, 8]])  # right, binding error, outside, binding error, right
    kind = torch.zeros_like(target)
    kind[0, [1, 2, 3, 5, 9]] = 2
    dist = torch.where(kind == 2, torch.arange(10)[None], -1)
    m = ForgettingCurve([0, 4, 8, 16])
    m.update(pred == target, dist, kind, chance=torch.tensor([0.125]),
             binding=Binding.of(pred, target, torch.tensor([[7, 8, 9, -1]])))
    out = {k: float(v) for k, v in m.compute().items()}
    assert out["acc/0-4"] == pytest.approx(1 / 3) and out["bind_err/0-4"] == pytest.approx(1 / 3)
    assert out["not_prompt/0-4"] == pytest.approx(1 / 3)
    assert out["acc/4-8"] == 0 and out["bind_err/4-8"] == 1 and out["not_prompt/4-8"] == 0
    assert out["acc/8-16"] == 1 and out["bind_err/8-16"] == 0
    assert out["ceiling/0-4"] == pytest.approx(1 / 3) and out["chance/8-16"] == pytest.approx(0.125)
    assert out["acc"] + out["bind_err"] + out["not_prompt"] == pytest.approx(1.0)
    # a repeated value in the answer set raises the ceiling of the answers equal to it
    m2 = ForgettingCurve([0, 4])
    m2.update(pred[:, :3] == target[:, :3], dist[:, :3], kind[:, :3], chance=torch.tensor([0.1]),
              binding=Binding.of(pred[:, :3], target[:, :3], torch.tensor([[7, 7, 8, 9]])))
    assert float(m2.compute()["ceiling/0-4"]) == pytest.approx((2 / 4 + 1 / 4) / 2)


def test_forgetting_curve_empty_bucket_is_nan_and_skipped():
    m = ForgettingCurve(EDGES)
    m.update(*rows((2, 0, True), (2, 3, True), (2, 10, False), (2, 14, False)))
    out = {k: float(v) for k, v in m.compute().items()}
    assert math.isnan(out["acc/4-8"]) and math.isnan(out["acc/16-inf"])
    assert out["area"] == pytest.approx(0.5)  # (1.5, 1) -> (11.5, 0)
    assert out["half_life"] == pytest.approx(6.5)  # half way from 1.5 to 11.5
    _, acc, counts = m.curve()
    assert counts.tolist() == [2, 0, 2] and math.isnan(acc[1])


def test_forgetting_curve_never_forgets_and_no_data():
    m = ForgettingCurve(EDGES)
    m.update(*rows((2, 1, True), (2, 6, True), (2, 9, True)))
    out = {k: float(v) for k, v in m.compute().items()}
    assert out["half_life"] == math.inf and out["area"] == 1.0

    empty = ForgettingCurve(EDGES)
    with pytest.warns(UserWarning, match="before the ``update``"):
        out = {k: float(v) for k, v in empty.compute().items()}
    assert all(math.isnan(v) for k, v in out.items() if not k.startswith("n/"))
    assert all(v == 0 for k, v in out.items() if k.startswith("n/"))

    single = ForgettingCurve(EDGES)
    single.update(*rows((2, 5, True), (2, 6, False), (2, 7, False)))
    out = {k: float(v) for k, v in single.compute().items()}
    assert out["area"] == pytest.approx(1 / 3) and out["half_life"] == math.inf


def test_forgetting_curve_drop_overflow_and_below_first_edge():
    m = ForgettingCurve([4, 8, 16], overflow=False)
    m.update(*rows((2, 2, True), (2, 5, False), (2, 12, True), (2, 16, True), (2, 99, True)))
    out = {k: float(v) for k, v in m.compute().items()}
    assert "acc/16-inf" not in out
    assert out["acc"] == 0.5  # only distances 5 and 12 are counted
    assert out["acc/4-8"] == 0.0 and out["acc/8-16"] == 1.0
    assert out["area"] == 0.5
    assert math.isnan(out["half_life"])  # the nearest bucket's accuracy is 0


def test_forgetting_curve_other_kind_accumulate_and_reset():
    correct, dist, kind = curve_data()
    whole = ForgettingCurve(EDGES)
    whole.update(correct, dist, kind)
    split = ForgettingCurve(EDGES)
    split.update(correct[:, :7], dist[:, :7], kind[:, :7])
    split.update(correct[:, 7:], dist[:, 7:], kind[:, 7:])
    assert {k: float(v) for k, v in split.compute().items()} == pytest.approx(
        {k: float(v) for k, v in whole.compute().items()}, nan_ok=True
    )

    split.reset()
    assert split.total.sum() == 0
    split.update(*rows((2, 0, False), (2, 1, True)))
    assert float(split.compute()["acc"]) == 0.5

    local = ForgettingCurve(EDGES, kind=1)
    local.update(correct, dist, kind)  # only the kind-1 position at distance 5 counts (the -1 is dropped)
    assert float(local.compute()["acc/4-8"]) == 0.0 and float(local.compute()["acc"]) == 0.0


def test_forgetting_curve_bad_input():
    for edges in ([], [0], [0, 0, 4], [8, 4], [-1, 4]):
        with pytest.raises(ConfigError, match="bucket_edges"):
            ForgettingCurve(edges)
    m = ForgettingCurve(EDGES)
    with pytest.raises(DataError, match="same"):
        m.update(torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3))


def test_slice_accuracy():
    m = SliceAccuracy(["a", "b", "c"])
    correct = torch.tensor([[True, False, True], [True, True, False]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    m.update(correct, mask, "a")  # a: 2 of 4
    m.update(correct, mask, torch.tensor([1, 0]))  # b: row 0 -> 1 of 2; a: row 1 -> 1 of 2
    m.update(correct, torch.ones_like(mask), torch.tensor([[1, 1, 1], [2, 2, 0]]))  # b: 2/3, c: 2/2, a: 0/1
    out = {k: float(v) for k, v in m.compute().items()}
    assert out == pytest.approx({"a": 3 / 7, "b": 3 / 5, "c": 1.0})

    with pytest.raises(DataError, match=r"unknown slice 'd'.*\['a', 'b', 'c'\]"):
        m.update(correct, mask, "d")
    with pytest.raises(DataError, match="in \\[0, 3\\)"):
        m.update(correct, mask, torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match="unique"):
        SliceAccuracy(["a", "a"])

    m.reset()
    m.update(correct, mask, 1)
    out = {k: float(v) for k, v in m.compute().items()}
    assert math.isnan(out["a"]) and out["b"] == 0.5 and math.isnan(out["c"])


def test_response_perplexity_matches_cross_entropy():
    torch.manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    weight = torch.zeros(B, T)
    weight[:, 3:] = 2.0  # response; the weight value must not matter, only weight > 0
    weight[1, 5] = 0.0
    keep = weight[:, 1:] > 0
    expected = torch.exp(F.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep]))

    m = ResponsePerplexity()
    m.update(logits[:2], ids[:2], weight[:2])
    m.update(logits[2:], ids[2:], weight[2:] / 2)
    torch.testing.assert_close(m.compute().float(), expected)

    m.reset()
    m.update(logits, ids, torch.zeros(B, T))
    with pytest.raises(DataError, match="logits"):
        m.update(logits[:, :-1], ids, weight)
    assert math.isnan(float(m.compute()))


def test_next_token_correct():
    ids = torch.tensor([[1, 2, 3, 0]])
    logits = F.one_hot(torch.tensor([[2, 0, 0, 1]]), 4).float()  # predicts 2, 0, 0 for positions 1..3
    assert next_token_correct(logits, ids).tolist() == [[False, True, False, True]]


def make_batch(seed: int, tasks: list[str], n_facts: list[int]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A collated batch and logits with a chosen correctness pattern; returns (batch, logits, correct)."""
    g = torch.Generator().manual_seed(seed)
    B, T, V, P = 4, 12, 9, 3
    ids = torch.randint(0, V, (B, T), generator=g)
    kind = torch.randint(0, 3, (B, T), generator=g)
    kind[:, :P] = 0
    pos = torch.arange(T).expand(B, T)
    dist = torch.where(kind == 2, pos - P, -1)
    weight = (pos >= P).float()
    correct = torch.rand(B, T, generator=g) < 0.6
    correct[:, 0] = False
    # Logits at t-1 put the max on ids[t] if correct[t], else on another token.
    pred = torch.where(correct[:, 1:], ids[:, 1:], (ids[:, 1:] + 1) % V)
    logits = torch.randn(B, T, V, generator=g)
    logits[:, :-1] += 20 * F.one_hot(pred, V)
    batch = {
        "input_ids": ids,
        "answer_kind": kind,
        "distance": dist,
        "loss_weight": weight,
        "task": [tasks[i % len(tasks)] for i in range(B)],
        "n_facts": torch.tensor([n_facts[(i // 2) % len(n_facts)] for i in range(B)]),
        "prompt_len": torch.full((B,), P),
        "attention_mask": torch.ones(B, T, dtype=torch.bool),
    }
    return batch, logits, correct


def test_forgetting_metrics_collection():
    edges = [0, 3, 6]
    m = ForgettingMetrics(edges, tasks=["recall", "copy"], n_facts=[2, 4, 8])
    batch, logits, correct = make_batch(0, ["recall", "copy"], [2, 4])
    m.update(batch, logits)
    out = m.compute()

    # Rows: 0 recall/n2, 1 copy/n2, 2 recall/n4, 3 copy/n4; recall/n8 and copy/n8 have no data.
    names = ["recall/n2", "copy/n2", "recall/n4", "copy/n4"]
    kind, dist = batch["answer_kind"], batch["distance"]
    for row, name in enumerate(names):
        ref = ForgettingCurve(edges)
        ref.update(correct[row : row + 1], dist[row : row + 1], kind[row : row + 1])
        for key, value in ref.compute().items():
            assert out[f"{name}/{results.flat_metric(key)}"] == pytest.approx(float(value), nan_ok=True)
        local = kind[row] == 1
        expected_local = correct[row][local].float().mean().item() if local.any() else math.nan
        assert out[f"{name}/local_acc"] == pytest.approx(expected_local, nan_ok=True)
    for key in ("acc@0-3", "acc@3-6", "acc@6-inf", "bind_err@0-3", "dmin@6-inf", "acc", "area", "half_life", "local_acc"):
        assert math.isnan(out[f"recall/n8/{key}"]) and math.isnan(out[f"copy/n8/{key}"])

    prompt = kind == 2
    assert out["all/acc"] == pytest.approx(correct[prompt].float().mean().item())
    assert out["all/local_acc"] == pytest.approx(correct[kind == 1].float().mean().item())
    keep = batch["loss_weight"][:, 1:] > 0
    ppl = torch.exp(F.cross_entropy(logits[:, :-1][keep], batch["input_ids"][:, 1:][keep])).item()
    assert out["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert all(isinstance(v, float) for v in out.values())
    # 6 slices + all, each: 8 statistics x 3 buckets + acc, bind_err, not_prompt, ceiling, chance, area,
    # half_life, local_acc; + ppl
    assert len(out) == 7 * (8 * 3 + 8) + 1

    m.reset()
    m.update(batch, logits)
    assert m.compute() == pytest.approx(out, nan_ok=True)


def test_forgetting_metrics_bad_batch():
    m = ForgettingMetrics([0, 4], tasks=["recall"], n_facts=[2])
    batch, logits, _ = make_batch(1, ["recall"], [2, 4])
    with pytest.raises(DataError, match=r"recall/n4 is not declared.*\['recall/n2'\]"):
        m.update(batch, logits)
    del batch["distance"]
    with pytest.raises(DataError, match="missing \\['distance'\\]"):
        m.update(batch, logits)
    with pytest.raises(ConfigError):
        ForgettingMetrics([0, 4], tasks=[], n_facts=[2])
