"""Per-token generation time with and without the SG head (rank 8), every backbone, one JSON line each.

    PYTHONPATH=src python benchmarks/generation.py [--quick] [--models mamba,gpt] [--targets PATTERN ...] [--batch 1 4 16]

At batch 1 (no autograd) the head folds its delta into the weights for the decode, as LoRA
merges; at batch > 1 every sample keeps its own delta, added by each target linear's patched
forward (two small batched matmuls per target per token). Both variants decode the same prompt
greedily with ``prosg.generate.generate``; the head is a fresh ``SGHead`` whose output layers are
randomised (so the delta is non-zero and really applied). A decode is timed from its first token
(the prompt pass, where the head computes the deltas, is left out) to its end, by the CPU time of
the decoding thread (``time.thread_time``: other processes of a shared machine do not count) and by
the wall clock. Variants alternate A/B/A/B and the median per variant is reported; the figure is
the median over repeats of each repeat's SG/bare CPU-time ratio (adjacent runs: a load that
drifts during the benchmark cancels). Lines:

    {"bench": "generate_sg", "model", "variant": "bare"|"sg", "ms_per_token", "wall_ms_per_token", ...}
    {"bench": "ratio", "what": "<model>_sg_vs_bare_ms_per_token_b<B>", "value", "iqr", "of_medians", "wall", "target", "meets_target"}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import torch  # noqa: E402

from prosg.backbones import BACKBONES, build  # noqa: E402
from prosg.generate import generate  # noqa: E402
from prosg.methods import ProSG  # noqa: E402

FULL = dict(d_model=256, n_layer=4, vocab=512, prompt_len=64, new_tokens=128, repeats=9)
QUICK = dict(d_model=64, n_layer=2, vocab=128, prompt_len=16, new_tokens=16, repeats=2)


def emit(record: dict) -> None:
    """One JSON line, flushed."""
    print(json.dumps(record), flush=True)


def time_generation(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(CPU, wall) milliseconds per generated token of a backbone or method, from the first token on."""
    first: list[float] = []

    def mark(_token: torch.Tensor) -> None:
        if not first:
            first.extend((time.thread_time(), time.perf_counter()))

    generate(model, prompt, new_tokens, on_token=mark)
    cpu, wall = time.thread_time() - first[0], time.perf_counter() - first[1]
    return 1000 * cpu / new_tokens, 1000 * wall / new_tokens  # new_tokens steps after the first token's sampling


def bench(name: str, cfg: dict, rank: int, targets: list[str] | None, batch: int) -> None:
    """Measure one backbone with and without a head and emit the ratio."""
    torch.manual_seed(0)
    backbone = build(name, vocab_size=cfg["vocab"], d_model=cfg["d_model"], n_layer=cfg["n_layer"]).eval()
    method = ProSG(targets=targets, rank=rank)
    method.attach(backbone)
    head = method.head
    with torch.no_grad():
        for p in head.grad_out.parameters():
            p.normal_(0, 0.02)
    prompt = torch.randint(0, cfg["vocab"], (batch, cfg["prompt_len"]))
    models = {"bare": backbone, "sg": method}
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in models}
    for model in models.values():  # warm-up
        time_generation(model, prompt, 4)
    for _ in range(cfg["repeats"]):
        for variant, model in models.items():
            times[variant].append(time_generation(model, prompt, cfg["new_tokens"]))
    cpu = {v: statistics.median(t[0] for t in ts) for v, ts in times.items()}
    wall = {v: statistics.median(t[1] for t in ts) for v, ts in times.items()}
    for variant in models:
        emit({"bench": "generate_sg", "model": name, "variant": variant, "ms_per_token": round(cpu[variant], 4),
              "wall_ms_per_token": round(wall[variant], 4), "batch": batch, "rank": rank, "targets": len(head.targets),
              "d_model": cfg["d_model"], "n_layer": cfg["n_layer"], "threads": torch.get_num_threads()})
    pairs = [s[0] / b[0] for s, b in zip(times["sg"], times["bare"])]  # each repeat's own ratio: drift cancels
    target = 1.02 if batch == 1 else 1.10  # one sample: the delta is folded into the weights, so it should cost nothing
    emit(ratio_record(f"{name}_sg_vs_bare_ms_per_token_b{batch}", pairs, cpu["sg"] / cpu["bare"], wall["sg"] / wall["bare"], target))


def ratio_record(what: str, pairs: list[float], of_medians: float, wall: float, target: float | None) -> dict:
    """A ratio line: the median of the per-round ratios (the figure), their interquartile range (how much
    the machine's noise moves it), the ratio of the medians and of wall times, and the target."""
    q1, _, q3 = statistics.quantiles(pairs, n=4, method="inclusive") if len(pairs) > 1 else pairs * 3
    value = statistics.median(pairs)
    return {"bench": "ratio", "what": what, "value": round(value, 3), "iqr": [round(q1, 3), round(q3, 3)],
            "of_medians": round(of_medians, 3), "wall": round(wall, 3), "target": target,
            "meets_target": None if target is None else value <= target}


def main(argv: list[str] | None = None) -> int:
    """Parse options and run every requested backbone."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--models", default=",".join(sorted(BACKBONES)), help="comma-separated families (default: all registered: %(default)s)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="*", default=None, help="target patterns (default: every linear in a block)")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 4, 16],
                   help="batch sizes: 1 folds the delta into the weights, >1 applies per-sample deltas (default: 1 4 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    for name in args.models.split(","):
        for batch in args.batch:
            bench(name, cfg, args.rank, args.targets, batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
