"""Metric states synchronise under real 2-process gloo DDP: each rank sees half the data."""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from prosg.metrics import ForgettingMetrics

EDGES = [0, 4, 8, 16]
TASKS = ["recall", "copy"]
N_FACTS = [2, 4]
# Rank 0 takes rows [:SPLIT] of every batch, rank 1 the rest: uneven on purpose.
SPLIT = 3


def make_batch(seed: int, B: int = 8, T: int = 24, V: int = 13) -> tuple[dict, torch.Tensor]:
    """A random collated batch (prompt of 4, answers of every kind) and near-confident logits."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    kind = torch.randint(0, 3, (B, T), generator=g)
    kind[:, :4] = 0
    pos = torch.arange(T).expand(B, T)
    # Response length 20 > the last edge, so the overflow bucket is exercised too.
    distance = torch.where(kind == 2, pos - 4, -1)
    correct = torch.rand(B, T, generator=g) < 0.7 - 0.02 * pos  # accuracy decays with distance
    pred = torch.where(correct[:, 1:], ids[:, 1:], (ids[:, 1:] + 1) % V)
    logits = torch.randn(B, T, V, generator=g)
    logits[:, :-1] += 5 * F.one_hot(pred, V)
    batch = {
        "input_ids": ids,
        "answer_kind": kind,
        "distance": distance,
        "loss_weight": (pos >= 4).float(),
        "task": [TASKS[i] for i in torch.randint(0, 2, (B,), generator=g).tolist()],
        "n_facts": torch.tensor(N_FACTS)[torch.randint(0, 2, (B,), generator=g)],
    }
    return batch, logits


def rows(batch: dict, logits: torch.Tensor, sl: slice) -> tuple[dict, torch.Tensor]:
    """The rows ``sl`` of a batch and its logits."""
    return {k: v[sl] for k, v in batch.items()}, logits[sl]


def run_metrics(parts: list[tuple[dict, torch.Tensor]]) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Update a fresh ForgettingMetrics with each part; return compute() and the all-slice curve()."""
    m = ForgettingMetrics(EDGES, TASKS, N_FACTS)
    for batch, logits in parts:
        m.update(batch, logits)
    return m.compute(), list(m.curve_all.curve())


def worker(rank: int, port: int, out_dir: str) -> None:
    """One DDP rank: update with its half of two batches, compute, save the result."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    try:
        sl = slice(None, SPLIT) if rank == 0 else slice(SPLIT, None)
        parts = [rows(*make_batch(seed), sl) for seed in (0, 1)]
        torch.save(run_metrics(parts), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if math.isnan(b[k]):
            assert math.isnan(a[k]), k
        else:
            assert math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-9), (k, a[k], b[k])


@pytest.mark.slow  # ~10-17 s on the shared 2 cores: both ranks import torch + torchmetrics under spawn
def test_ddp_gloo_matches_single_process(tmp_path):
    torch.manual_seed(0)
    expected, expected_curve = run_metrics([make_batch(0), make_batch(1)])
    # The rank split must matter: rank 0's half alone gives different numbers.
    alone, _ = run_metrics([rows(*make_batch(s), slice(None, SPLIT)) for s in (0, 1)])
    assert alone["all/acc"] != expected["all/acc"] and alone["ppl"] != expected["ppl"]

    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got, curve = torch.load(tmp_path / f"rank{rank}.pt")
        assert_same(got, expected)
        for g, e in zip(curve, expected_curve):
            torch.testing.assert_close(g, e, equal_nan=True)
    assert not math.isnan(expected["all/half_life"]) and expected["all/acc@16-inf"] >= 0
