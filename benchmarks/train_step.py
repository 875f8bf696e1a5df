"""What the SG head costs: ms per training step plain vs SG, and per-token batched decoding, one JSON line each.

    PYTHONPATH=src python benchmarks/train_step.py [--quick] [--models mamba,rwkv7] [--sizes demo,d256]
                                                   [--steps 14] [--batch 1 4 16] [--no-decode]

Training step: for every family in ``prosg.backbones.BACKBONES``, the plain backbone against the demo's SG
run (conf/method/sg.yaml with the demo sweep's overrides: prompt-state dropout 0.5, the backbone trained
jointly), on the demo's recall batches (conf/sweep/demo.yaml: batch 64), at two backbone sizes:

* ``demo``: the backbone as the demo builds it (the sweep's ``backbone`` axis for mamba and rwkv7;
  conf/model/<family>.yaml for the others);
* ``d256``: the same with d_model 256 (an LSTM's d_hidden follows d_model).

A step is what each optimizer step of a run costs the model: the method's forward, the loss, the
backward, gradient clipping and AdamW (the data loader and Lightning's bookkeeping, equal for both, are
left out). Plain and SG steps alternate (A/B/A/B, after two warm-up steps each) and each step is timed
by the CPU time of the thread that runs it (``time.thread_time``, single-threaded by default): on a shared
machine other processes then do not count, though they still slow the caches. Medians are reported;
the figure is the median over rounds of each round's SG/plain ratio (target: 1.5 at the demo size).

Decoding: ``benchmarks/generation.py``'s measurement (d_model 256, 4 layers, every block linear targeted)
at batch 1, 4 and 16 (target: 1.10; 1.02 at batch 1, which folds the delta into the weights).

Lines:

    {"bench": "env", ...}
    {"bench": "train_step", "model", "size", "variant": "plain"|"sg", "ms_per_step", "wall_ms_per_step", "matmul_gflop_per_step", ...}
    {"bench": "ratio", "what": "<model>_<size>_sg_vs_plain_train_step", "value", "iqr", "of_medians", "wall", "target", "meets_target",
     "matmul_flops" (the SG/plain ratio of the steps' matmul GFLOP: the work, beside the time)}
    {"bench": "generate_sg", ...} / {"bench": "ratio", "what": "<model>_sg_vs_bare_ms_per_token_b<B>", ...}
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import yaml  # noqa: E402

from prosg.backbones import BACKBONES, build  # noqa: E402
from prosg.data import ConstructedDataModule  # noqa: E402
from prosg.methods import Plain, ProSG  # noqa: E402
from prosg.module import ProSGModule  # noqa: E402


def load_generation():
    """benchmarks/generation.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location("generation", HERE / "generation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATION = load_generation()  # its decode measurement and ratio line are this script's too
DEMO_SWEEP = ROOT / "conf" / "sweep" / "demo.yaml"
QUICK_TASK = {"name": "recall", "n_facts": 2, "n_keys": 8, "n_values": 4, "response_len": 16, "query_distances": [0, 12]}


def emit(record: dict) -> None:
    """One JSON line, flushed."""
    print(json.dumps(record), flush=True)


def _init_args(path: Path) -> dict:
    return dict(yaml.safe_load(path.read_text()).get("init_args") or {})


def demo_setup() -> tuple[dict, dict[str, dict], dict]:
    """From conf/sweep/demo.yaml: the data overrides, each family's backbone arguments, the SG method's arguments."""
    sweep = yaml.safe_load(DEMO_SWEEP.read_text())
    over = sweep["overrides"]
    data = {"tasks": over["data.init_args.tasks"], "batch_size": over["data.init_args.batch_size"]}
    backbones = {}
    for family in sorted(BACKBONES):
        axis = sweep["axes"]["backbone"].get(family)
        conf = ROOT / "conf" / "model" / f"{family}.yaml"
        if axis is not None:
            conf = (DEMO_SWEEP.parent / axis["model.backbone"]).resolve()
        args = _init_args(conf)
        prefix = "model.backbone.init_args."
        args.update({k[len(prefix):]: v for k, v in (axis or {}).items() if k.startswith(prefix)})
        backbones[family] = args
    sg = sweep["axes"]["method"]["values"]["sg"]
    method = _init_args((DEMO_SWEEP.parent / sg["model.method"]).resolve())
    prefix = "model.method.init_args."
    method.update({k[len(prefix):]: v for k, v in sg.items() if k.startswith(prefix)})
    method["freeze_backbone"] = sg.get("model.freeze_backbone", None)
    return data, backbones, method


def sized(args: dict, size: str) -> dict:
    """The backbone arguments at ``size``: as given (demo) or with d_model 256 (d256)."""
    if size == "demo":
        return dict(args)
    out = dict(args, d_model=256)
    if "d_hidden" in args and args["d_hidden"] == args.get("d_model"):
        out["d_hidden"] = 256
    return out


def batches(data: dict, n: int, quick: bool) -> tuple[list[dict], int, int]:
    """``n`` training batches of the demo's task; the vocabulary size and pad id."""
    tasks = [QUICK_TASK] if quick else data["tasks"]
    bs = 4 if quick else data["batch_size"]
    dm = ConstructedDataModule(tasks=tasks, batch_size=bs, train_size=bs * n, val_size=0, test_size=0, seed=0)
    dm.setup("fit")
    return list(dm.train_dataloader())[:n], dm.vocab_size, dm.pad_id


def make_module(family: str, args: dict, method_args: dict | None, vocab: int, pad_id: int) -> tuple[ProSGModule, torch.optim.Optimizer]:
    """The module and its AdamW as a run builds them (same seed, so plain and SG share the backbone's init)."""
    torch.manual_seed(0)
    backbone = build(family, vocab_size=vocab, **args)
    if method_args is None:
        module = ProSGModule(backbone=backbone, method=Plain(), vocab_size=vocab, pad_id=pad_id)
    else:
        kw = dict(method_args)
        freeze = kw.pop("freeze_backbone", None)
        module = ProSGModule(backbone=backbone, method=ProSG(**kw), freeze_backbone=freeze, vocab_size=vocab, pad_id=pad_id)
    module.train()
    return module, module.configure_optimizers()["optimizer"]


def train_step(module: ProSGModule, opt: torch.optim.Optimizer, batch: dict) -> None:
    """One optimizer step as ``ProSGModule.training_step`` and the Trainer run it (without logging)."""
    batch = module.method.prepare(batch, module.pad_id)
    out = module(batch)
    loss = module.loss(batch, out.logits) + sum(out.aux.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], 1.0)
    module.method.on_before_optimizer_step()
    opt.step()


def bench_train(family: str, size: str, args: dict, method_args: dict, data: tuple, steps: int) -> None:
    """Alternate plain and SG steps; emit each variant's medians and the ratio."""
    bs, vocab, pad_id = data
    variants = {"plain": make_module(family, args, None, vocab, pad_id), "sg": make_module(family, args, method_args, vocab, pad_id)}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    wall: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(steps + 2):
        for v, (module, opt) in variants.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            train_step(module, opt, bs[r % len(bs)])
            if r >= 2:  # two warm-up steps each
                cpu[v].append(time.thread_time() - c0)
                wall[v].append(time.perf_counter() - w0)
    gflop = {v: matmul_gflop(module, opt, bs[0]) for v, (module, opt) in variants.items()}
    med = {v: 1000 * statistics.median(t) for v, t in cpu.items()}
    med_wall = {v: 1000 * statistics.median(t) for v, t in wall.items()}
    ids = bs[0]["input_ids"]
    head = variants["sg"][0].method.head
    for v in variants:
        emit({"bench": "train_step", "model": family, "size": size, "variant": v, "ms_per_step": round(med[v], 2),
              "wall_ms_per_step": round(med_wall[v], 2), "matmul_gflop_per_step": round(gflop[v], 3), "steps": steps, "batch": ids.shape[0], "seq_len": ids.shape[1],
              "d_model": args["d_model"], "targets": len(head.targets), "threads": torch.get_num_threads()})
    pairs = [s / p for s, p in zip(cpu["sg"], cpu["plain"])]  # each round's own ratio: drift cancels
    record = GENERATION.ratio_record(f"{family}_{size}_sg_vs_plain_train_step", pairs, med["sg"] / med["plain"],
                                     med_wall["sg"] / med_wall["plain"], 1.5 if size == "demo" else None)
    emit(dict(record, matmul_flops=round(gflop["sg"] / gflop["plain"], 3)))  # the work ratio beside the time ratio


def matmul_gflop(module: ProSGModule, opt: torch.optim.Optimizer, batch: dict) -> float:
    """GFLOP of the matrix products (mm, bmm, addmm, ...) in one training step, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        train_step(module, opt, batch)
    return counter.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> int:
    """Parse options, then the training steps of every family and size, then the decode ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a smoke test, not a measurement)")
    p.add_argument("--models", default=",".join(sorted(BACKBONES)), help="comma-separated families (default: all: %(default)s)")
    p.add_argument("--sizes", default="demo,d256", help="demo and/or d256 (default: %(default)s)")
    p.add_argument("--steps", type=int, help="timed steps per variant (default: 14; --quick: 1)")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 4, 16], help="decode batch sizes (default: 1 4 16)")
    p.add_argument("--no-decode", action="store_true", help="training steps only")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as the demo's runs)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (1 if args.quick else 14)
    data_conf, backbones, method_args = demo_setup()
    emit({"bench": "env", "python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
          "threads": torch.get_num_threads(), "load_avg": [round(x, 2) for x in os.getloadavg()], "quick": args.quick,
          "sg": {k: v for k, v in method_args.items()}})
    data = batches(data_conf, 4, args.quick)
    families = [f for f in args.models.split(",") if f]
    for size in args.sizes.split(","):
        for family in families:
            bb_args = sized(backbones[family], size)
            if args.quick:
                bb_args = dict(bb_args, d_model=16 if size == "demo" else 32)
                bb_args.update({k: 16 if size == "demo" else 32 for k in ("d_hidden",) if k in bb_args})
                bb_args.update({"head_size": 8} if "head_size" in bb_args else {})
            bench_train(family, size, bb_args, method_args, data, steps)
    if not args.no_decode:
        cfg = GENERATION.QUICK if args.quick else GENERATION.FULL
        for family in families:
            for b in args.batch:
                GENERATION.bench(family, cfg, int(method_args.get("rank", 8)), None, b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
