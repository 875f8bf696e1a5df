"""What every command that runs a shipped sweep first shares (``prosg demo``, ``prosg pretrain``, ``prosg recycle``):
the options ``--sweep --runs-dir --steps --seeds``, one meaning of ``--steps``, ``--set`` after the axes, launch,
collect, and one exit status (130 when interrupted, 1 when a run failed)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from prosg.errors import ConfigError
from prosg.sweep.launchers import launch, was_interrupted
from prosg.sweep.report import Collected, collect
from prosg.sweep.spec import Run, Sweep, expand, load_sweep, select

STEP_KEYS = ("trainer.max_steps", "trainer.val_check_interval")


@dataclass
class Outcome:
    """A sweep command's runs after launch and collection."""

    sweep: Sweep
    runs: list[Run]
    launched: list[dict[str, Any]]  # the launcher's status per run started now (empty when all were done)
    collected: Collected

    @property
    def failed(self) -> list[str]:
        """Names of the runs without metrics (failed, interrupted or never started)."""
        return [pr["name"] for pr in self.collected.problems]

    def exit_status(self) -> int:
        """130 if the launch was interrupted (Ctrl-C / SIGTERM), 1 if a run did not finish, else 0; says which."""
        if self.failed:
            print(f"{len(self.failed)} run(s) did not finish: {', '.join(self.failed)} (see their log.txt)", file=sys.stderr)
        if was_interrupted(self.launched):
            return 130
        return 1 if self.failed else 0


def sweep_options(p: argparse.ArgumentParser, default: str, runs_dir: str | None = None,
                  runs_flags: tuple[str, ...] = ("--runs-dir",)) -> None:
    """The options of a command that runs a sweep first: --sweep, --runs-dir (or ``runs_flags``), --steps, --seeds."""
    where = f"default: {runs_dir}" if runs_dir else "default: the sweep's out_dir"
    p.add_argument("--sweep", help=f"the sweep file (default: conf/{default})")
    p.add_argument(*runs_flags, dest="runs_dir", default=runs_dir, help=f"where the runs go ({where})")
    p.add_argument("--steps", type=int, help="train every run at most this many steps (a shortened run, e.g. in CI)")
    p.add_argument("--seeds", type=int, nargs="*", help="override the sweep's seeds")


def cap_steps(sweep: Sweep, steps: int) -> None:
    """Every run trains at most ``steps`` steps: the sweep's schedule becomes ``steps``, and an axis value's own
    schedule keeps the smaller of its value and ``steps`` (0, evaluation only, stays 0)."""
    if steps < 0:
        raise ConfigError(f"--steps {steps}: give a number of training steps >= 0")
    sweep.overrides.update(dict.fromkeys(STEP_KEYS, steps))
    for options in (o for axis in sweep.axes for o in axis.options.values()):
        for key in STEP_KEYS:
            if key in options:
                options[key] = min(int(options[key]), steps)


def assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (the value read as YAML) -> (key, value)."""
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise ConfigError(f"--set {text!r}: write KEY=VALUE, e.g. --set model.backbone.init_args.d_model=16")
    return key, yaml.safe_load(value)


def run_sweep(args: argparse.Namespace, default: str, check: Callable[[list[Run]], None] | None = None,
              finalise: Callable[[list[Run]], None] | None = None, launcher: dict[str, Any] | None = None,
              plots: bool = False) -> Outcome:
    """Load the sweep of ``args`` (--steps / --seeds applied; --set after the axes and --only where the command has
    them), ``finalise`` and ``check`` its runs, run or resume them with the sweep's launcher (updated by ``launcher``),
    and collect them."""
    from prosg.paths import conf_dir

    sweep = load_sweep(args.sweep or conf_dir() / default, out_dir=args.runs_dir)
    if args.seeds:
        sweep.seeds = list(args.seeds)
    if args.steps is not None:
        cap_steps(sweep, args.steps)
    if launcher:
        sweep.launcher.update(launcher)
    runs = expand(sweep)
    last = dict(assignment(a) for a in getattr(args, "set", None) or [])
    for run in runs:
        run.overrides = {**{k: v for k, v in run.overrides.items() if k not in last}, **last}
    if finalise is not None:
        finalise(runs)
    runs = select(runs, getattr(args, "only", None))
    if check is not None:
        check(runs)
    launched = launch(sweep, runs)
    return Outcome(sweep, runs, launched, collect(sweep, runs, plots=plots))
