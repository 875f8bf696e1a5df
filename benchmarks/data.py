"""Data pipeline speed: generation, collation and loader throughput vs a tiny CPU train step.

Prints one JSON line per task (plus an environment line first):
    gen_ex_per_s, gen_tok_per_s    generating examples (single process)
    collate_ex_per_s               collating pre-generated examples into batches
    loader_tok_per_s               DataLoader(ConstructedDataset, num_workers) end to end (real tokens)
    train_tok_per_s                forward+backward+SGD of a 2-layer GRU LM (d=64) at the same batch shape,
                                   or batch tokens / --train-step-s when given
    loader_over_train              how many times faster the loader is than the train step (> 1: not a bottleneck)

Usage: PYTHONPATH=src python benchmarks/data.py [--n 2048] [--batch-size 32] [--num-workers 0] [--train-step-s S]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from prosg.data.collate import Collator, collate
from prosg.data.loaders import ConstructedDataset
from prosg.data.tasks import CopyTask, InstructionTask, RecallTask, Task, generate_example

TASKS: dict[str, Task] = {"recall": RecallTask(), "copy": CopyTask(), "instruction": InstructionTask()}


class TinyLM(nn.Module):
    """Embedding -> 2-layer GRU -> vocab head: a stand-in for the cheapest recurrent train step."""

    def __init__(self, vocab: int, d: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = nn.GRU(d, d, num_layers=2, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(ids))[0])  # (B, T, V)


def timed(fn, min_s: float = 0.5) -> float:
    """Seconds per call of ``fn``, repeated for at least ``min_s`` seconds after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return dt / n


def bench_task(name: str, task: Task, args: argparse.Namespace) -> dict:
    n, bs = args.n, args.batch_size
    t0 = time.perf_counter()
    exs = [generate_example([task], [1.0], 0, "train", i) for i in range(n)]
    gen_s = time.perf_counter() - t0
    tokens = sum(len(e["prompt_ids"]) + len(e["response_ids"]) for e in exs)

    batches = [exs[i : i + bs] for i in range(0, n - bs + 1, bs)]
    t0 = time.perf_counter()
    collated = [collate(b, task.pad_id) for b in batches]
    collate_s = time.perf_counter() - t0

    ds = ConstructedDataset([task], [1.0], 0, "train", n)
    loader = DataLoader(ds, batch_size=bs, num_workers=args.num_workers, collate_fn=Collator(task.pad_id), drop_last=True)
    t0 = time.perf_counter()
    loader_tokens = sum(int(b["attention_mask"].sum()) for b in loader)
    loader_s = time.perf_counter() - t0

    batch = collated[0]
    batch_tokens = int(batch["attention_mask"].sum())
    if args.train_step_s is not None:
        step_s = args.train_step_s
    else:
        model = TinyLM(task.vocab_size)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ids, w = batch["input_ids"], batch["loss_weight"][:, 1:]

        def step() -> None:
            logits = model(ids)
            ce = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            loss = (ce * w).sum() / w.sum().clamp_min(1)
            opt.zero_grad()
            loss.backward()
            opt.step()

        step_s = timed(step)
    loader_tok_s = loader_tokens / loader_s
    train_tok_s = batch_tokens / step_s
    return {
        "bench": "data", "task": name, "n": n, "batch_size": bs, "num_workers": args.num_workers,
        "seq_len": int(batch["input_ids"].shape[1]),
        "gen_ex_per_s": round(n / gen_s, 1), "gen_tok_per_s": round(tokens / gen_s),
        "collate_ex_per_s": round(len(batches) * bs / collate_s, 1),
        "loader_tok_per_s": round(loader_tok_s), "train_step_s": round(step_s, 5),
        "train_step_source": "--train-step-s" if args.train_step_s is not None else "TinyLM GRU d=64 x2, fwd+bwd+SGD",
        "train_tok_per_s": round(train_tok_s), "loader_over_train": round(loader_tok_s / train_tok_s, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048, help="examples per task")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--train-step-s", type=float, default=None, help="measured seconds per train step to compare with")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = p.parse_args()
    print(json.dumps({
        "bench": "data", "env": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "machine": platform.machine(),
        "note": "CPU timings; noisy when the cores are shared",
    }))
    for name in args.tasks:
        print(json.dumps(bench_task(name, TASKS[name], args)), flush=True)


if __name__ == "__main__":
    main()
