"""``prosg demo``: the built-in default run — the forgetting table of small Mamba / RWKV-7 with and
without the SG head, plus the gpt reference, on the ``recall`` task, in minutes on a CPU.

It is a sweep (``conf/sweep/demo.yaml``: backbone x method x seed) run with the local launcher,
two single-threaded runs at a time, then collected into ``results.md`` / ``results.csv`` /
plots by ``prosg.sweep``, plus ``results.json`` (backbone/method -> distance bucket -> accuracy,
binding error, reference lines and distances held, mean and std over seeds with the per-seed values;
the seeds, what they re-draw, and the run configs). Re-running skips
finished runs, so an interrupted demo resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os

from prosg import results
from prosg.sweep.command import run_sweep, sweep_options

DEMO_SWEEP = "sweep/demo.yaml"  # in prosg.paths.conf_dir(): the clone's conf/ or the copy installed with prosg


def demo_group(row: dict) -> tuple[str, str]:
    """(backbone, method) of a demo run; a run without a method label (the gpt reference) is plain."""
    return row["labels"].get("backbone", "-"), row["labels"].get("method", "plain")


def format_table(table: dict) -> str:
    """The forgetting table as text: per (backbone, method) and bucket, accuracy % ± std and binding error %."""
    buckets = results.sort_labels({b for cells in table.values() for b in cells})
    head = f"{'backbone':8} {'method':10} " + " ".join(f"{'d ' + b:>19}" for b in buckets)
    lines = [head, "-" * len(head)]
    for (backbone, method), cells in sorted(table.items()):
        vals = []
        for b in buckets:
            c = cells.get(b)
            if c is None or math.isnan(c[results.ACC]["mean"]):
                vals.append("-")
                continue
            acc, bind = c[results.ACC], c[results.BIND_ERR]["mean"]
            vals.append(f"{100 * acc['mean']:5.1f} ±{100 * acc['std']:4.1f} b{100 * bind:4.1f}")
        lines.append(f"{backbone:8} {method:10} " + " ".join(f"{v:>19}" for v in vals))
    ref = next(iter(table.values()), {})
    dist = [results.bucket_range(ref[b]) if b in ref else "-" for b in buckets]
    lines.append(f"{'distances':19} " + " ".join(f"{d:>19}" for d in dist))
    refs = [f"{100 * ref[b][results.CHANCE]['mean']:.1f} / {100 * ref[b][results.CEILING]['mean']:.1f}" if b in ref
            else "-" for b in buckets]
    lines.append(f"{'chance / ceiling':19} " + " ".join(f"{r:>19}" for r in refs))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the demo sweep, print the forgetting table, write results.json."""
    p = argparse.ArgumentParser(prog="prosg demo", description=__doc__.split("\n\n")[0])
    sweep_options(p, DEMO_SWEEP, runs_dir="runs/demo", runs_flags=("--out-dir", "--runs-dir"))
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time")
    args = p.parse_args(argv)
    outcome = run_sweep(args, DEMO_SWEEP, launcher={"name": "local", "jobs": args.jobs, "threads": 1}, plots=True)
    sweep, collected = outcome.sweep, outcome.collected
    table = results.forgetting_table(collected.rows, demo_group)
    summary = {
        "task": "recall",
        "metric": "prompt-answer statistics on the test split, by distance (response tokens after the prompt): "
                  "acc, bind_err (another prompt fact's value), not_prompt, ceiling (value-set), chance, n, dmin, dmax",
        "seeds": sweep.seeds,
        "seed_keys": sweep.seed_keys,
        "table": {"/".join(g): cells for g, cells in table.items()},
        "runs": {r["run"]: {"status": r["status"], "config": str(sweep.out_dir / r["run"] / "config.yaml")}
                 for r in collected.rows},
        "sweep": str(sweep.path),
    }
    out = sweep.out_dir / "results.json"
    out.write_text(json.dumps(summary, indent=2))
    print("\nForgetting table (prompt-fact accuracy %, mean ± std over seeds; b = binding error %, a wrong answer "
          "that is another prompt fact's value), by distance bucket:")
    print(format_table(table))
    print(f"\nresults.json: {out}")
    for f in collected.files:
        print(f"{f.suffix[1:]:>8}: {f}")
    return outcome.exit_status()
