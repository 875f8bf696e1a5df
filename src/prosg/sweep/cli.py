"""``prosg sweep``: the command line over the sweep package (expand, launch, resume, collect)."""

from __future__ import annotations

import argparse
import shlex

from prosg.sweep.launchers import CLUSTERS, LAUNCHERS, launch, was_interrupted
from prosg.sweep.report import collect, confirmation_runs
from prosg.sweep.runner import read_status, run_one
from prosg.sweep.spec import expand, load_sweep, select


def main(argv: list[str] | None = None) -> int:
    """``prosg sweep``: expand, launch, resume and collect a sweep file (exit 1 if a run failed, 130 if interrupted)."""
    p = argparse.ArgumentParser(
        prog="prosg sweep",
        description="Run a grid of experiments (conf/sweep/*.yaml): expand, launch, resume, collect.",
        epilog="The sweep file format is documented in prosg/sweep/spec.py; run directories and resume in "
        "prosg/sweep/runner.py, launchers in prosg/sweep/launchers.py.",
    )
    p.add_argument("sweep", nargs="?", help="sweep YAML, e.g. conf/sweep/smoke.yaml")
    p.add_argument("--collect", action="store_true", help="only gather finished runs into results.csv/.md and plots")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their arguments; launch nothing")
    p.add_argument("--only", action="append", metavar="NAME_GLOB", help="launch only runs matching this glob (repeatable)")
    p.add_argument("--launcher", choices=LAUNCHERS, help="override launcher.name of the sweep file")
    p.add_argument("--cluster", choices=CLUSTERS, help="override launcher.cluster (submitit), e.g. local to try a SLURM sweep")
    p.add_argument("--out-dir", help="override out_dir of the sweep file")
    p.add_argument("--run-one", metavar="RUN_DIR", help=argparse.SUPPRESS)  # the worker entry of both launchers
    a = p.parse_args(argv)
    if a.run_one:
        run_one(a.run_one)
        return 0
    if not a.sweep:
        p.error("give a sweep file, e.g. prosg sweep conf/sweep/smoke.yaml")
    sweep = load_sweep(a.sweep, out_dir=a.out_dir)
    runs = expand(sweep)
    chosen = select(runs, a.only)
    if a.dry_run:
        cells = len(runs) // len(sweep.seeds)
        print(f"{len(chosen)} runs ({cells} cells x {len(sweep.seeds)} seeds{', filtered' if a.only else ''}) "
              f"in {sweep.out_dir}")
        for run in chosen:
            print(f"{run.name} [{read_status(sweep.out_dir / run.name).get('status', 'new')}]: {shlex.join(run.args())}")
        if sweep.tune is not None and sweep.tune.seeds:
            cells = {sweep.tune.cell(r.labels, [a.name for a in sweep.axes]) for r in runs}
            print(f"then each of the {len(cells)} cells' setting chosen on {sweep.tune.by} (over "
                  f"{', '.join(sweep.tune.over)}) runs on seeds {sweep.tune.seeds}: {len(cells) * len(sweep.tune.seeds)} more runs")
        return 0
    if a.collect:
        collect(sweep, runs)
        return 0
    results = launch(sweep, chosen, a.launcher, a.cluster)
    if sweep.tune is not None and sweep.tune.seeds and not was_interrupted(results):
        confirm, waiting = confirmation_runs(sweep, runs)
        if waiting:
            print(f"not yet confirmed on seeds {sweep.tune.seeds} (tuning runs not all done): {', '.join(waiting)}")
        confirm = select(confirm, a.only, required=False)
        if confirm:
            print(f"confirming the chosen settings: {len(confirm)} run(s) on seeds {sweep.tune.seeds}")
            results += launch(sweep, confirm, a.launcher, a.cluster)
    collect(sweep, runs)
    if was_interrupted(results):
        return 130  # as a shell reports a command ended by Ctrl-C
    return int(any(s.get("status") != "done" for s in results))
