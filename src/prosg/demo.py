"""``prosg demo``: the built-in default run.

For now it builds each backbone family at a small size, checks that its parallel forward and
its step-by-step recurrence agree, and times a CPU training step — a smoke run of the whole
backbone stack on a fresh machine.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from prosg.backbones import BACKBONES, build


def check_family(name: str, vocab_size: int, seq_len: int, batch_size: int, seed: int) -> dict:
    """Build one family, compare parallel vs step logits, and time forward+backward."""
    torch.manual_seed(seed)
    model = build(name, vocab_size=vocab_size, d_model=64, n_layer=2)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len))
    model.eval()
    with torch.no_grad():
        parallel = model(ids).logits
        state = model.init_state(batch_size)
        steps = []
        for t in range(seq_len):
            out = model.step(ids[:, t], state)
            steps.append(out.logits)
            state = out.state
        max_diff = (torch.stack(steps, 1) - parallel).abs().max().item()
    model.train()
    t0 = time.perf_counter()
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    dt = time.perf_counter() - t0
    return {
        "backbone": name,
        "params": model.num_parameters(),
        "parallel_vs_step_max_abs_diff": max_diff,
        "train_step_s": round(dt, 4),
        "tokens_per_s": round(batch_size * seq_len / dt, 1),
        "loss": round(loss.item(), 4),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the demo; prints a table and one JSON line per backbone."""
    parser = argparse.ArgumentParser(prog="prosg demo", description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = [check_family(n, 64, args.seq_len, args.batch_size, args.seed) for n in sorted(BACKBONES)]
    print(f"{'backbone':10} {'params':>9} {'|par-step|':>11} {'tok/s':>10}")
    for r in rows:
        print(f"{r['backbone']:10} {r['params']:9d} {r['parallel_vs_step_max_abs_diff']:11.2e} {r['tokens_per_s']:10.1f}")
    for r in rows:
        print(json.dumps(r))
    return 0
