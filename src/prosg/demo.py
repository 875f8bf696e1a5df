"""``prosg demo``: the built-in default run — the forgetting table of small Mamba / RWKV-7 with and
without the SG head, plus the gpt reference, on the ``recall`` task, in minutes on a CPU.

It is a sweep (``conf/sweep/demo.yaml``: backbone x method x seed) run with the local launcher,
two single-threaded runs at a time, then collected into ``results.md`` / ``results.csv`` /
plots by ``prosg.sweep``, plus ``results.json`` (method -> backbone -> distance bucket ->
accuracy, mean over seeds, with the per-seed values, seeds and run configs). Re-running skips
finished runs, so an interrupted demo resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from prosg import results

DEMO_SWEEP = "sweep/demo.yaml"  # in prosg.paths.conf_dir(): the clone's conf/ or the copy installed with prosg


def bucket_table(rows: list[dict], split: str = "test") -> dict:
    """method -> backbone -> bucket -> {seeds: {seed: acc}, mean, std} from collected sweep rows."""
    cells: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        if r["metrics"]:
            # a run without a method label (the gpt reference) is the plain model
            method, backbone = r["labels"].get("method", "plain"), r["labels"].get("backbone", "-")
            cells.setdefault(method, {}).setdefault(backbone, []).append(r)
    table: dict = {}
    for method, backbones in cells.items():
        for backbone, group in backbones.items():
            cell = table.setdefault(method, {}).setdefault(backbone, {})
            with_data = {k for r in group for k, v in r["metrics"].items() if not math.isnan(v)}
            # nearest bucket first (numerically: 16-32 before 128-256), as results.json lists them
            for key, lo, hi in results.bucket_keys(with_data, under=results.prefix(split)):
                seeds = results.per_seed(group, key)
                stats = results.mean_std(seeds.values())
                cell[results.bucket_label(lo, hi)] = {"seeds": seeds, "mean": stats.mean, "std": stats.band()}
    return table


def format_table(table: dict) -> str:
    """The forgetting table as text: one row per (backbone, method), one column per distance bucket."""
    buckets = results.sort_labels({b for bb in table.values() for cell in bb.values() for b in cell})
    head = f"{'backbone':8} {'method':10} " + " ".join(f"{'d ' + b:>13}" for b in buckets)
    lines = [head, "-" * len(head)]
    for backbone in sorted({b for bb in table.values() for b in bb}):
        for method in sorted(table):
            cell = table[method].get(backbone)
            if cell is None:
                continue
            vals = []
            for b in buckets:
                s = cell.get(b)
                vals.append(f"{100 * s['mean']:6.1f} ±{100 * s['std']:4.1f}" if s else f"{'-':>13}")
            lines.append(f"{backbone:8} {method:10} " + " ".join(f"{v:>13}" for v in vals))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the demo sweep, print the forgetting table, write results.json."""
    p = argparse.ArgumentParser(prog="prosg demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", help="the sweep to run (default: conf/sweep/demo.yaml, shipped with prosg)")
    p.add_argument("--out-dir", default="runs/demo", help="where runs, tables, plots and results.json go")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time")
    p.add_argument("--seeds", type=int, nargs="*", help="override the sweep's seeds")
    p.add_argument("--steps", type=int, help="override trainer.max_steps (e.g. a quick smoke run)")
    args = p.parse_args(argv)

    from prosg.paths import conf_dir
    from prosg.sweep import collect, expand, launch, load_sweep
    from prosg.sweep.launchers import was_interrupted

    if args.sweep is None:
        args.sweep = str(conf_dir() / DEMO_SWEEP)
    sweep = load_sweep(args.sweep, out_dir=args.out_dir)
    if args.seeds:
        sweep.seeds = list(args.seeds)
    if args.steps:  # caps every run, including those whose axis sets its own schedule (gpt)
        keys = ("trainer.max_steps", "trainer.val_check_interval")
        sweep.overrides.update(dict.fromkeys(keys, args.steps))
        for options in (o for axis in sweep.axes for o in axis.options.values()):
            options.update({k: args.steps for k in keys if k in options})
    sweep.launcher.update({"name": "local", "jobs": args.jobs, "threads": 1})
    runs = expand(sweep)
    print(f"prosg demo: {len(runs)} runs ({', '.join(a.name for a in sweep.axes)} x {len(sweep.seeds)} seeds), "
          f"{args.jobs} at a time, single-threaded each; results in {sweep.out_dir}", file=sys.stderr)
    launched = launch(sweep, runs)
    collected = collect(sweep, runs)
    table = bucket_table(collected.rows)
    results = {
        "task": "recall",
        "metric": "prompt-answer accuracy on the test split, by distance (response tokens after the prompt)",
        "seeds": sweep.seeds,
        "accuracy": table,
        "runs": {r["run"]: {"status": r["status"], "config": str(sweep.out_dir / r["run"] / "config.yaml")}
                 for r in collected.rows},
        "sweep": str(sweep.path),
    }
    out = sweep.out_dir / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print("\nForgetting table (prompt-fact recall accuracy %, mean ± std over seeds, by distance bucket):")
    print(format_table(table))
    print(f"\nresults.json: {out}")
    for f in collected.files:
        print(f"{f.suffix[1:]:>8}: {f}")
    failed = [pr["name"] for pr in collected.problems]
    if failed:
        print(f"\n{len(failed)} run(s) did not finish: {', '.join(failed)} (see their log.txt)", file=sys.stderr)
    if was_interrupted(launched):
        return 130
    return 1 if failed else 0
