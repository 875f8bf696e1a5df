"""``prosg sweep``: a grid of experiment overrides x seeds, run locally or with submitit, then collected.

Sweep file (YAML; omegaconf ``${...}`` interpolation works inside it)::

    name: recall_methods                         # title of tables and plots (default: the file's stem)
    experiment: ../experiment/mamba_plain.yaml   # base experiment, relative to this file
    out_dir: runs/sweeps/recall_methods          # relative to the working directory, like trainer.default_root_dir
    seeds: [0, 1, 2]                             # every grid cell runs once per seed (default [0])
    seed_keys: [seed_everything]                 # what a seed sets (default); add data.init_args.seed to also
                                                 # re-draw the constructed dataset and its shuffle
    overrides:                                   # applied to every run
      trainer.max_steps: 2000
    axes:                                        # cartesian product, in this order
      backbone:                                  # label -> overrides
        mamba: {model.backbone: ../model/mamba.yaml}
        rwkv7: {model.backbone: ../model/rwkv7.yaml}
      method:
        plain: {model.sg_head: null}
        sg: {model.sg_head: ../model/sg_head/slots.yaml, model.freeze_backbone: false}
      rank:                                      # shorthand: one key, a list of values
        key: model.sg_head.init_args.rank
        values: [4, 8, 16]
        when: {method: sg}                       # only crossed with these labels of earlier axes
    launcher: {name: local}                      # or submitit (below)

Override keys are LightningCLI argument names, exactly what follows ``--`` on the command line
(``trainer.max_steps``, ``model.sg_head.init_args.rank``, ``trainer.callbacks+``); each becomes
``--key=value`` (null -> ``null``, lists/dicts -> JSON). A string value ending in ``.yaml``/``.yml``
is a config path relative to the sweep file. A run's arguments are ``--config <experiment>``, then
``overrides``, then each axis's overrides in axis order, then the seed keys: a later key replaces an
earlier one and moves to the end, and LightningCLI applies the arguments in that order. The
structured axis form ``{values: {label: overrides}, when: ...}`` makes a label axis conditional.
Run names join the labels and the seed, e.g. ``mamba-sg-rank4-s0`` (a key/values axis labels a value
``<axis><value>``, or a string value by itself; ``label: "r{value}"`` sets the format).

Each run lives in ``out_dir/<name>/``: ``run.json`` (its spec), ``overrides.yaml``, ``log.txt``
(stdout+stderr), ``status.json`` (``running|done|failed``, the error and log path on failure, wall
time), ``config.yaml`` (the full resolved LightningCLI config: ``prosg fit --config`` it to repeat
the run), ``metrics.json`` (test + val + last train metrics, axis values, seed; NaN is written as
null, infinities as "inf"), checkpoints and logger output (a logger with a ``save_dir`` is pointed at
the run directory, so concurrent runs never share a version folder). A run is ``fit`` then ``test``
on the same LightningCLI objects, through ``prosg.cli.lightning_main`` like ``prosg fit``, in a
child process started in the sweep's working directory (relative data paths keep working).

Resume: running the sweep again skips runs whose status is ``done`` and re-runs failed or unfinished
ones (a run killed with its sweep stays ``running`` and is re-run). A ``done`` run whose overrides no
longer match the sweep file is an error: delete its directory or use another ``out_dir``. A failed run
never stops the others; the summary lists failures with their logs and the exit status is 1.

Launchers:
  local     ``{name: local, jobs: 1, threads: null}``: each run is ``python -m prosg.sweep --run-one DIR``
            in a subprocess (a crash, even a segfault, is isolated and recorded), ``jobs`` at a time;
            ``threads`` sets each run's OMP_NUM_THREADS (``jobs: 2, threads: 1`` on a 2-core CPU). A run may itself use DDP: set
            ``trainer.devices``/``trainer.strategy`` in the overrides; Lightning re-executes the child.
  submitit  ``{name: submitit, cluster: slurm|local|debug|null, nodes: 1, gpus_per_node: 1,
            tasks_per_node: null, cpus_per_task: null, mem_gb: null, timeout_min: 60, partition: null,
            array_parallelism: 8, slurm: {extra sbatch options, e.g. account: abc}}``: one job array
            (``executor.map_array``) around the same per-run function as ``local``. ``cluster: null``
            picks SLURM when available; ``local``/``debug`` run the same code path on this machine
            (``local`` starts every array job at once; ``debug`` runs them one by one in-process).
            On SLURM: run ``prosg sweep conf/sweep/X.yaml --launcher submitit`` on a login node (in
            tmux: it waits for the array); ``tasks_per_node`` defaults to ``gpus_per_node`` and the
            overrides should set ``trainer.devices`` to it and ``trainer.num_nodes`` to ``nodes``, so
            Lightning's SLURMEnvironment maps the srun tasks to DDP ranks. Interrupting the waiting
            process leaves the jobs running; ``prosg sweep X.yaml --collect`` later gathers results.

``--collect`` (also run at the end of every sweep) writes ``results.csv`` (one row per run),
``results.md`` (mean ± std over seeds per grid cell) and PNG plots into ``out_dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fnmatch
import io
import json
import math
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import yaml

from prosg.errors import ConfigError

SWEEP_KEYS = ("name", "experiment", "out_dir", "seeds", "seed_keys", "overrides", "axes", "launcher")
LAUNCHERS = ("local", "submitit")
SUBMITIT_KEYS = (
    "name", "cluster", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min",
    "partition", "array_parallelism", "slurm",
    "jobs", "threads",  # local launcher
)
CLUSTERS = ("slurm", "local", "debug")
LABEL_RE = re.compile(r"^[A-Za-z0-9._+=-]+$")
# Environment variables that are non-zero on every process but the global rank 0 (Lightning's
# re-executed DDP children, torchrun, srun tasks, submitit local tasks).
RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID")
# Axis keys whose values size the recurrent state (for the accuracy-vs-state-size plot).
STATE_KEYS = ("d_state", "head_size", "d_model", "state_size")


# -- the sweep file ------------------------------------------------------------------------------
@dataclass
class Axis:
    """One grid axis: labelled override sets, optionally crossed only with some labels of earlier axes."""

    name: str
    options: dict[str, dict[str, Any]]  # label -> overrides
    values: dict[str, Any]  # label -> value recorded for the run (the raw value on a key/values axis)
    when: dict[str, list[str]]  # earlier axis -> labels under which this axis applies
    key: str | None = None  # the single override key of a key/values axis

    def applies(self, chosen: dict[str, str]) -> bool:
        """Whether this axis is crossed with a cell whose earlier axes have the labels ``chosen``."""
        return all(chosen.get(axis) in labels for axis, labels in self.when.items())


@dataclass
class Sweep:
    """A parsed sweep file (paths absolute)."""

    name: str
    path: Path
    experiment: Path
    out_dir: Path
    seeds: list[int]
    seed_keys: list[str]
    overrides: dict[str, Any]
    axes: list[Axis]
    launcher: dict[str, Any]


@dataclass
class Run:
    """One run of a sweep: a grid cell and a seed."""

    name: str
    labels: dict[str, str]  # axis -> label (axes skipped by `when` are absent)
    axes: dict[str, Any]  # axis -> recorded value
    seed: int
    experiment: Path
    overrides: dict[str, Any]  # merged, in the order they are applied

    def args(self) -> list[str]:
        """LightningCLI arguments of this run (without the subcommand)."""
        return ["--config", str(self.experiment), *(f"--{k}={format_value(v)}" for k, v in self.overrides.items())]

    def spec(self) -> dict[str, Any]:
        """What ``run.json`` holds: everything a worker needs to run it."""
        return {
            "name": self.name, "labels": self.labels, "axes": self.axes, "seed": self.seed,
            "experiment": str(self.experiment), "overrides": self.overrides, "args": self.args(),
        }


def format_value(v: Any) -> str:
    """An override value as LightningCLI command-line text (jsonargparse reads it as YAML)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        text = repr(v)
        # YAML 1.1 reads "1e-05" as a string; "1.0e-05" is a float
        return re.sub(r"^(-?\d+)e", r"\1.0e", text)
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _resolve_path(v: Any, base: Path) -> Any:
    """A relative ``*.yaml``/``*.yml`` string -> an absolute path next to the sweep file; others unchanged."""
    if isinstance(v, str) and v.endswith((".yaml", ".yml")) and not os.path.isabs(v):
        return os.path.normpath(base / v)
    return v


def _overrides(raw: Any, where: str, base: Path) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ConfigError(
            f"{where} must be a mapping of LightningCLI argument names to values, e.g. {{trainer.max_steps: 100}}; "
            f"got {raw!r}"
        )
    for k in raw:
        if k.startswith("-") or k in ("config", "seed"):
            raise ConfigError(
                f"{where}: key {k!r} is not an override; write argument names without '--' (e.g. model.lr) and set the "
                "base config with `experiment:` and seeds with `seeds:`"
            )
    return {k: _resolve_path(v, base) for k, v in raw.items()}


def _value_label(axis: str, value: Any, fmt: str | None) -> str:
    if fmt is not None:
        return fmt.format(value=value, axis=axis)
    return str(value) if isinstance(value, str) else f"{axis}{value}"


def _parse_axis(name: str, raw: Any, earlier: list[str], base: Path) -> Axis:
    where = f"axes.{name}"
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{where} must be a non-empty mapping: {{label: {{overrides}}, ...}} or {{key: <argument>, values: [...]}}"
        )
    structured = "values" in raw and set(raw) <= {"key", "values", "when", "label"}
    when_raw = raw.get("when") if structured else None
    if not structured:
        options = {str(label): _overrides(ov, f"{where}.{label}", base) for label, ov in raw.items()}
        values: dict[str, Any] = {label: label for label in options}
        key = None
    elif isinstance(raw["values"], dict):
        if "key" in raw or "label" in raw:
            raise ConfigError(f"{where}: give either key + a list of values, or values as {{label: overrides}}, not both")
        options = {str(label): _overrides(ov, f"{where}.values.{label}", base) for label, ov in raw["values"].items()}
        values, key = {label: label for label in options}, None
    else:
        key, vals = raw.get("key"), raw["values"]
        if not isinstance(key, str) or not isinstance(vals, list) or not vals:
            raise ConfigError(f"{where}: the shorthand needs key: <argument name> and values: [a non-empty list]")
        options, values = {}, {}
        for v in vals:
            label = _value_label(name, v, raw.get("label"))
            options[label] = _overrides({key: v}, where, base)
            values[label] = v
        if len(options) != len(vals):
            raise ConfigError(f"{where}: values {vals} give duplicate labels; make them distinct or set label: '...{{value}}'")
    for label in options:
        if not LABEL_RE.match(label):
            raise ConfigError(
                f"{where}: label {label!r} is not usable in a run directory name; use letters, digits and . _ + = - only (a key/values axis can set label: 'r{{value}}')"
            )
    when: dict[str, list[str]] = {}
    if when_raw is not None:
        if not isinstance(when_raw, dict):
            raise ConfigError(f"{where}.when must map earlier axes to labels, e.g. when: {{method: sg}}")
        for axis, labels in when_raw.items():
            if axis not in earlier:
                raise ConfigError(
                    f"{where}.when refers to {axis!r}, which is not an axis listed before {name!r} "
                    f"(earlier axes: {earlier}); move {name!r} after it"
                )
            when[axis] = [str(x) for x in (labels if isinstance(labels, list) else [labels])]
    return Axis(name, options, values, when, key)


def load_sweep(path: str | Path, out_dir: str | Path | None = None) -> Sweep:
    """Parse and check a sweep YAML; ``out_dir`` replaces the file's ``out_dir``."""
    from omegaconf import OmegaConf

    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist; pass a YAML such as conf/sweep/smoke.yaml")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # omegaconf raises several unrelated types for YAML / interpolation errors
        raise ConfigError(f"{path}: cannot read it as YAML ({e}); fix the syntax") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with keys {SWEEP_KEYS}")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid keys: {', '.join(SWEEP_KEYS)}")
    base = path.parent
    if "experiment" not in raw:
        raise ConfigError(f"{path}: set experiment: <base experiment YAML>, e.g. ../experiment/gpt_plain.yaml")
    experiment = Path(_resolve_path(str(raw["experiment"]), base))
    if not experiment.is_file():
        raise ConfigError(f"{path}: experiment {experiment} does not exist; give a path relative to the sweep file")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of ints, e.g. [0, 1, 2]; got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: seeds {seeds} has duplicates")
    seed_keys = raw.get("seed_keys", ["seed_everything"])
    if not isinstance(seed_keys, list) or not all(isinstance(k, str) for k in seed_keys):
        raise ConfigError(f"{path}: seed_keys must be a list of argument names, e.g. [seed_everything, data.init_args.seed]")
    axes_raw = raw.get("axes") or {}
    if not isinstance(axes_raw, dict):
        raise ConfigError(f"{path}: axes must be a mapping of axis name -> values")
    axes: list[Axis] = []
    for name, spec in axes_raw.items():
        if not LABEL_RE.match(str(name)) or name in ("run", "status", "seed"):
            raise ConfigError(f"{path}: axis name {name!r} is reserved or has characters other than letters, digits, . _ + = -")
        axes.append(_parse_axis(str(name), spec, [a.name for a in axes], base))
    launcher = dict(raw.get("launcher") or {"name": "local"})
    launcher.setdefault("name", "local")
    if launcher["name"] not in LAUNCHERS:
        raise ConfigError(f"{path}: launcher.name={launcher['name']!r}; choose one of {', '.join(LAUNCHERS)}")
    bad = sorted(set(launcher) - set(SUBMITIT_KEYS))
    if bad:
        raise ConfigError(f"{path}: unknown launcher key(s) {bad}; valid: {', '.join(SUBMITIT_KEYS)}")
    if launcher.get("cluster") not in (None, *CLUSTERS):
        raise ConfigError(f"{path}: launcher.cluster={launcher['cluster']!r}; choose one of {CLUSTERS} or null (auto)")
    return Sweep(
        name=str(raw.get("name") or path.stem),
        path=path,
        experiment=experiment,
        out_dir=Path(out_dir if out_dir is not None else raw.get("out_dir") or f"runs/sweeps/{path.stem}").absolute(),
        seeds=seeds,
        seed_keys=seed_keys,
        overrides=_overrides(raw.get("overrides"), "overrides", base),
        axes=axes,
        launcher=launcher,
    )


def _merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers win; a replaced key moves to the end so its argument is applied last."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            out.pop(k, None)
            out[k] = v
    return out


def expand(sweep: Sweep) -> list[Run]:
    """Every run of the sweep: the cartesian product of its axes (respecting ``when``) times its seeds."""
    cells: list[list[tuple[Axis, str]]] = [[]]
    for axis in sweep.axes:
        grown = []
        for cell in cells:
            if axis.applies({a.name: label for a, label in cell}):
                grown.extend(cell + [(axis, label)] for label in axis.options)
            else:
                grown.append(cell)
        cells = grown
    runs, seen = [], {}
    for cell in cells:
        for seed in sweep.seeds:
            name = "-".join([*(label for _, label in cell), f"s{seed}"])
            overrides = _merge(
                sweep.overrides, *(axis.options[label] for axis, label in cell), {k: seed for k in sweep.seed_keys}
            )
            run = Run(
                name=name,
                labels={a.name: label for a, label in cell},
                axes={a.name: a.values[label] for a, label in cell},
                seed=seed,
                experiment=sweep.experiment,
                overrides=overrides,
            )
            if name in seen:
                raise ConfigError(
                    f"{sweep.path}: two runs are both named {name!r} ({seen[name]} and {run.labels}); "
                    "give the axes distinct labels"
                )
            seen[name] = run.labels
            runs.append(run)
    return runs


def select(runs: list[Run], only: list[str] | None) -> list[Run]:
    """The runs whose names match any of the ``only`` globs (all runs without globs)."""
    if not only:
        return runs
    chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.name, g) for g in only)]
    if not chosen:
        raise ConfigError(f"--only {only} matches none of the {len(runs)} runs; see their names with --dry-run")
    return chosen


# -- run directories -----------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    """Write atomically, so a reader (or a crash) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """A run directory's ``status.json`` ({} if it has none)."""
    return _read_json(Path(run_dir) / "status.json") or {}


def _write_status(run_dir: Path, status: str, **fields: Any) -> dict[str, Any]:
    record = {**read_status(run_dir), "status": status, **fields}
    if status == "done":
        for k in ("error", "returncode", "log_tail"):
            record.pop(k, None)
    _write_json(run_dir / "status.json", record)
    return record


def prepare(runs: list[Run], out_dir: Path) -> list[Path]:
    """Create each run's directory with run.json and overrides.yaml (finished runs are left untouched)."""
    dirs = []
    for run in runs:
        d = out_dir / run.name
        spec = run.spec()
        if read_status(d).get("status") == "done":
            old = _read_json(d / "run.json") or {}
            if (old.get("experiment"), old.get("overrides")) != (spec["experiment"], spec["overrides"]):
                raise ConfigError(
                    f"run {run.name} in {out_dir} finished with different settings than the sweep file now gives "
                    f"(was {old.get('overrides')}, now {spec['overrides']}); delete {d} to re-run it, or set another out_dir"
                )
        else:
            d.mkdir(parents=True, exist_ok=True)
            _write_json(d / "run.json", spec)
            (d / "overrides.yaml").write_text(yaml.safe_dump(run.overrides, sort_keys=False))
        dirs.append(d)
    return dirs


# -- one run ---------------------------------------------------------------------------------------
def _is_rank_zero() -> bool:
    return all(int(os.environ.get(v) or 0) == 0 for v in RANK_VARS)


def _rank_tag() -> str:
    return "-".join(f"{v}{os.environ[v]}" for v in RANK_VARS if int(os.environ.get(v) or 0))


def _json_number(x: float) -> float | str | None:
    """NaN -> null (empty bucket), +-inf -> "inf"/"-inf" (e.g. a half-life never reached): strict JSON."""
    if math.isnan(x):
        return None
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _number(x: Any) -> float:
    """Inverse of ``_json_number`` (also accepts CSV text)."""
    if x is None or x == "":
        return math.nan
    return float(x)


def _scalars(metrics: dict[str, Any]) -> dict[str, float | str | None]:
    return {k: _json_number(float(v)) for k, v in sorted(metrics.items())}


def resolve_config(args: list[str], run_dir: Path) -> str:
    """The full LightningCLI ``fit`` config of ``args`` as YAML, writing its outputs into ``run_dir``.

    ``default_root_dir`` and the ``save_dir`` of every configured logger become ``run_dir``, so a run's
    logs and checkpoints stay in its directory whatever the experiment's trainer config says.
    """
    # Import before redirecting: Lightning's log handler binds the sys.stderr of its import time, and
    # bound to the StringIO below it would swallow every later log line of the run.
    import lightning.pytorch.cli  # noqa: F401

    import prosg.module  # noqa: F401
    from prosg.cli import lightning_main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            lightning_main(["fit", *args, "--print_config"])
    except SystemExit as e:  # --print_config exits 0 after printing; a bad argument exits 2
        if e.code not in (0, None):
            sys.stderr.write(err.getvalue())
            reason = err.getvalue().split("error:", 1)[-1].strip()
            raise ConfigError(
                f"the run's arguments do not parse: {reason[:1500]}\nfix the override in the sweep file "
                "(see `prosg fit -h` for the argument names)"
            ) from None
    config = yaml.safe_load(out.getvalue())
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(run_dir)
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):
            logger["init_args"]["save_dir"] = str(run_dir)
    return yaml.safe_dump(config, sort_keys=False)


def _describe(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"exited with code {e.code}; the reason is in the log"
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _fit_and_test(args: list[str], run_dir: Path, zero: bool) -> tuple[Any, dict, dict]:
    """``prosg fit`` on ``args`` (outputs in ``run_dir``), then test the trained model; metrics after each."""
    from prosg.cli import lightning_main

    with warnings.catch_warnings():
        # the CLI warns that it got args while sys.argv holds this worker's own arguments: expected here
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        config = resolve_config(args, run_dir)
        if zero:
            (run_dir / "config.yaml").write_text(config)
        cli = lightning_main(["fit", "--config", config])
        after_fit = _scalars(cli.trainer.callback_metrics)
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return cli, after_fit, _scalars(cli.trainer.callback_metrics)


def run_one(run_dir: str | Path) -> dict[str, Any]:
    """Fit then test one prepared run in this process; rank 0 writes status.json, config.yaml, metrics.json.

    What ``python -m prosg.sweep --run-one DIR`` does. Other DDP ranks (Lightning re-executes this
    command for them) only train; every rank resolves the same config on its own, so no rank waits
    for a file another one writes.
    """
    run_dir = Path(run_dir).resolve()
    spec = _read_json(run_dir / "run.json")
    if spec is None:
        raise ConfigError(f"{run_dir} has no run.json; runs are prepared by `prosg sweep <file>` (see --dry-run)")
    zero, start = _is_rank_zero(), time.time()
    if zero:
        (run_dir / "metrics.json").unlink(missing_ok=True)
        # a fresh record: nothing of an earlier failed attempt carries over
        _write_json(run_dir / "status.json", {"status": "running", "started": _now(), "host": socket.gethostname(),
                                              "pid": os.getpid()})
    try:
        cli, after_fit, after_test = _fit_and_test(spec["args"], run_dir, zero)
    except BaseException as e:
        if zero:
            _write_status(run_dir, "failed", error=_describe(e), ended=_now(), wall_s=round(time.time() - start, 2))
        raise
    wall = round(time.time() - start, 2)
    metrics = {
        "name": spec["name"], "axes": spec["axes"], "labels": spec["labels"], "seed": spec["seed"],
        "wall_s": wall, "global_step": int(cli.trainer.global_step),
        "test": {k: v for k, v in after_test.items() if k.startswith("test/")},
        "val": {k: v for k, v in after_fit.items() if k.startswith("val/")},
        "train": {k: v for k, v in after_fit.items() if k.startswith("train/")},
    }
    if cli.trainer.is_global_zero:
        _write_json(run_dir / "metrics.json", metrics)
        _write_status(run_dir, "done", ended=_now(), wall_s=wall)
    return metrics


def _child_env() -> dict[str, str]:
    """This environment, plus the directory holding ``prosg`` on PYTHONPATH (works without pip install)."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([src, *(p for p in paths if p != src)])
    env["PYTHONUNBUFFERED"] = "1"  # keep stdout and stderr interleaved in order in log.txt
    return env


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""


def execute_run(run_dir: str | Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one prepared run in a child process, output in log.txt; return its final status. Never raises.

    The per-run function of both launchers (and every submitit task). Whatever the child does
    (finish, raise, segfault, get OOM-killed) ends with status.json ``done`` or ``failed``.
    """
    run_dir = Path(run_dir).resolve()
    zero, start = _is_rank_zero(), time.time()
    log = run_dir / ("log.txt" if zero else f"log.{_rank_tag()}.txt")
    cmd = [sys.executable, "-m", "prosg.sweep", "--run-one", str(run_dir)]
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        child_env = {**_child_env(), **(env or {})}
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env).returncode
    if not zero:
        return {"status": "rank>0", "returncode": rc}
    status = read_status(run_dir)
    if rc == 0 and status.get("status") == "done":
        return _write_status(run_dir, "done", log=str(log))
    if rc < 0:
        why = f"killed by signal {signal.Signals(-rc).name}"
    else:
        why = f"exited with code {rc}"
    error = status["error"] if status.get("status") == "failed" and status.get("error") else why
    return _write_status(
        run_dir, "failed", error=error, returncode=rc, log=str(log), log_tail=_tail(log),
        ended=_now(), wall_s=round(time.time() - start, 2),
    )


# -- launchers -------------------------------------------------------------------------------------
def launch_local(run_dirs: list[Path], jobs: int = 1, threads: int | None = None) -> list[dict[str, Any]]:
    """Run the prepared runs in subprocesses, ``jobs`` at a time, with a progress bar.

    ``threads`` caps each run's intra-op threads (OMP_NUM_THREADS): small CPU models run
    fastest single-threaded, so ``jobs: 2, threads: 1`` uses two cores for two runs at once.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    bar = tqdm(total=len(run_dirs), desc="sweep", unit="run", file=sys.stderr, dynamic_ncols=True)
    n_failed = 0

    def one(d: Path) -> dict[str, Any]:
        nonlocal n_failed
        status = execute_run(d, env)
        n_failed += status.get("status") != "done"
        bar.set_postfix_str(f"last {d.name} (failed so far: {n_failed})")
        bar.update()
        return status

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # the work happens in child processes
        results = list(pool.map(one, run_dirs))
    bar.close()
    return results


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """Temporarily replace ``os.environ`` (submitit passes it to the jobs it starts)."""
    old = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


def submitit_parameters(launcher: dict[str, Any], name: str) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` arguments from a sweep's ``launcher`` section."""
    gpus = int(launcher.get("gpus_per_node") or 0)
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": int(launcher.get("timeout_min", 60)),
        "nodes": int(launcher.get("nodes", 1)),
        # Lightning's SLURMEnvironment wants one task per device: tasks_per_node = trainer.devices
        "tasks_per_node": int(launcher.get("tasks_per_node") or max(1, gpus)),
    }
    if gpus:
        params["gpus_per_node"] = gpus
    for k in ("cpus_per_task", "mem_gb"):
        if launcher.get(k) is not None:
            params[k] = launcher[k]
    if launcher.get("partition") is not None:
        params["slurm_partition"] = launcher["partition"]
    if launcher.get("array_parallelism") is not None:
        params["slurm_array_parallelism"] = int(launcher["array_parallelism"])
    params.update({f"slurm_{k}": v for k, v in (launcher.get("slurm") or {}).items()})
    return params


def launch_submitit(run_dirs: list[Path], launcher: dict[str, Any], folder: Path, name: str) -> list[dict[str, Any]]:
    """One submitit job array over the prepared runs (the same per-run function as the local launcher)."""
    import submitit
    from tqdm import tqdm

    # by module name, so the function pickles even when this file runs as __main__
    from prosg.sweep import execute_run as per_run

    executor = submitit.AutoExecutor(folder=str(folder), cluster=launcher.get("cluster"))
    executor.update_parameters(**submitit_parameters(launcher, name))
    with _environ(_child_env()):
        jobs = executor.map_array(per_run, [str(d) for d in run_dirs])
    print(f"submitted {len(jobs)} run(s) to {executor.cluster} (job {jobs[0].job_id if jobs else '-'}); "
          f"submitit logs in {folder}", file=sys.stderr)
    results = []
    with tqdm(total=len(jobs), desc="sweep", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
        for job, d in zip(jobs, run_dirs):  # in submission order: the bar moves when the next one in line ends
            try:
                results.append(job.result())
            except Exception as e:  # the job itself died: timeout, preemption, node failure
                results.append(_write_status(
                    d, "failed", error=f"submitit job {job.job_id} failed: {str(e)[-1000:]}",
                    log=str(job.paths.stderr), ended=_now(),
                ))
            bar.update(1)
    return results


# -- collect -------------------------------------------------------------------------------------
def _flat(metrics: dict[str, Any]) -> dict[str, float]:
    flat = {k: _number(v) for part in ("test", "val", "train") for k, v in (metrics.get(part) or {}).items()}
    flat["wall_s"] = _number(metrics.get("wall_s"))
    flat["global_step"] = _number(metrics.get("global_step"))
    return flat


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean and sample std over the non-NaN values (inf propagates), and how many there were."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, 0
    if any(math.isinf(v) for v in vals):  # e.g. a half-life never reached: the mean is inf, a std means nothing
        return statistics.fmean(vals), math.nan, len(vals)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan), len(vals)


def _fmt(mean: float, std: float, n: int, of: int) -> str:
    """``mean ± std``; ``(n=k)`` when only k of the ``of`` seeds had a value (NaN: e.g. an empty bucket)."""
    if n == 0 or math.isnan(mean):
        return "n/a"
    if math.isinf(mean):
        text = "inf" if mean > 0 else "-inf"
    else:
        text = f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"
    return text if n == of else f"{text} (n={n})"


@dataclass
class Collected:
    """What ``collect`` found and wrote."""

    rows: list[dict[str, Any]]  # one per run: run, status, seed, axes..., metrics...
    summary: list[dict[str, Any]]  # one per grid cell: labels, n, and (mean, std, n) per key metric column
    columns: dict[str, str]  # key metric column title -> metric key
    problems: list[dict[str, Any]]  # runs that are not done: name, status, error, log
    files: list[Path]
    notes: list[str]


def key_metrics(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Table columns: overall acc, area, half-life, nearest and farthest non-empty bucket, local acc, ppl."""
    from prosg.plots import bucket_midpoints

    logged = {k for r in rows for k in r["metrics"]}
    metrics = {k for r in rows for k, v in r["metrics"].items() if not math.isnan(v)}  # buckets with data
    prefix = "test/all" if any(k.startswith("test/") for k in logged) else "val/all"
    split = prefix.split("/")[0]
    cols = {"acc": f"{prefix}/acc", "area": f"{prefix}/area", "half-life": f"{prefix}/half_life"}
    present = bucket_midpoints([k for k in metrics if k.startswith(prefix + "/acc@")])
    if present:
        (near, _), (far, _) = present[0], present[-1]
        cols[f"near {near.rsplit('/', 1)[1]}"] = near
        if far != near:
            cols[f"far {far.rsplit('/', 1)[1]}"] = far
    cols["local acc"] = f"{prefix}/local_acc"
    cols["ppl"] = f"{split}/ppl"
    return {title: key for title, key in cols.items() if key in logged}


def collect(sweep: Sweep, runs: list[Run], plots: bool = True) -> Collected:
    """Read every run's metrics.json; write results.csv, results.md and plots into out_dir; print the table."""
    out = sweep.out_dir
    out.mkdir(parents=True, exist_ok=True)
    rows, problems = [], []
    for run in runs:
        d = out / run.name
        status = read_status(d)
        state = status.get("status", "missing")
        metrics = _read_json(d / "metrics.json") if state == "done" else None
        if metrics is None:
            log = status.get("log") or (str(d / "log.txt") if (d / "log.txt").exists() else "")
            problems.append({"name": run.name, "status": state if state != "done" else "no metrics.json",
                             "error": status.get("error", ""), "log": log})
        rows.append({"run": run.name, "status": state, "seed": run.seed, "labels": run.labels, "axes": run.axes,
                     "metrics": _flat(metrics) if metrics else {}})
    axis_names = [a.name for a in sweep.axes]
    done = [r for r in rows if r["metrics"]]
    columns = key_metrics(done)

    # results.csv: one row per run, every metric
    metric_keys = sorted({k for r in done for k in r["metrics"]})
    csv_path = out / "results.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "status", "seed", *axis_names, *metric_keys])
        for r in rows:
            vals = [r["metrics"].get(k, math.nan) for k in metric_keys]
            w.writerow([r["run"], r["status"], r["seed"], *(r["axes"].get(a, "") for a in axis_names),
                        *("" if math.isnan(v) else repr(v) for v in vals)])

    # results.md: one row per grid cell, mean ± std over seeds
    cells: dict[tuple, list[dict]] = {}
    for r in done:
        cells.setdefault(tuple(r["labels"].get(a, "") for a in axis_names), []).append(r)
    summary = []
    for labels, group in cells.items():
        entry = {"labels": dict(zip(axis_names, labels)), "n": len(group)}
        for title, key in columns.items():
            entry[title] = mean_std([g["metrics"].get(key, math.nan) for g in group])
        summary.append(entry)
    notes: list[str] = []
    files = [csv_path]
    if plots and done:
        files += _plots(sweep, done, columns, out, notes)
    md = _markdown(sweep, axis_names, summary, columns, rows, problems, notes)
    md_path = out / "results.md"
    md_path.write_text(md)
    files.insert(1, md_path)
    print(md)
    return Collected(rows, summary, columns, problems, files, notes)


def _markdown(sweep, axis_names, summary, columns, rows, problems, notes) -> str:
    n_done = sum(bool(r["metrics"]) for r in rows)
    lines = [f"# {sweep.name}", "",
             f"{n_done}/{len(rows)} runs done; mean ± std over seeds (sample std; n = seeds with results). "
             f"Columns from {next(iter(columns.values()), 'no metrics').rsplit('/', 1)[0]}.", ""]
    header = [*axis_names, "n", *columns]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for entry in summary:
        cells = [entry["labels"][a] or "–" for a in axis_names]
        cells += [str(entry["n"]), *(_fmt(*entry[t], entry["n"]) for t in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    if problems:
        lines += ["", f"## Not done ({len(problems)})", ""]
        for p in problems:
            err = f": {p['error'].splitlines()[0]}" if p["error"] else ""
            log = f" (log: {p['log']})" if p["log"] else ""
            lines.append(f"- {p['name']} — {p['status']}{err}{log}")
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def _numeric_axis(sweep: Sweep, names: tuple[str, ...]) -> Axis | None:
    for axis in sweep.axes:
        leaf = (axis.key or "").rsplit(".", 1)[-1]
        if (axis.name in names or leaf in names) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in axis.values.values()
        ):
            return axis
    return None


def _plots(sweep: Sweep, done: list[dict], columns: dict[str, str], out: Path, notes: list[str]) -> list[Path]:
    from prosg import plots

    axis_names = [a.name for a in sweep.axes]
    acc_key = columns.get("acc")
    prefix = acc_key.rsplit("/", 1)[0] if acc_key else "test/all"

    def group_label(r: dict, skip: str | None = None) -> str:
        parts = [r["labels"][a] for a in axis_names if a != skip and a in r["labels"]]
        return "-".join(parts) or "all"

    files = []
    groups: dict[str, list[dict[str, float]]] = {}
    for r in done:
        groups.setdefault(group_label(r), []).append(r["metrics"])
    path = out / "forgetting.png"
    if plots.forgetting_curves(groups, prefix, path, title=f"{sweep.name}: forgetting curves ({prefix})"):
        files.append(path)
    else:
        notes.append(f"no distance-bucket accuracies under {prefix}: forgetting plot skipped")
    for what, names, fname in (("rank", ("rank",), "acc_vs_rank.png"), ("state size", STATE_KEYS, "acc_vs_state.png")):
        axis = _numeric_axis(sweep, names)
        if axis is None:
            notes.append(f"no numeric {what} axis (named or keyed {'/'.join(names)}): acc-vs-{what} plot skipped")
            continue
        if acc_key is None:
            notes.append(f"no accuracy metric: acc-vs-{what} plot skipped")
            continue
        series: dict[str, dict[float, list[float]]] = {}
        for r in done:
            if axis.name in r["axes"]:
                pts = series.setdefault(group_label(r, skip=axis.name), {})
                pts.setdefault(float(r["axes"][axis.name]), []).append(r["metrics"].get(acc_key, math.nan))
        path = out / fname
        plots.metric_vs_axis(series, xlabel=axis.key or axis.name, ylabel=acc_key, path=path,
                             title=f"{sweep.name}: accuracy vs {axis.name}")
        files.append(path)
    return files


# -- command line --------------------------------------------------------------------------------
def _status_line(run: Run, out_dir: Path) -> str:
    return read_status(out_dir / run.name).get("status", "new")


def launch(sweep: Sweep, runs: list[Run], launcher: str | None = None, cluster: str | None = None) -> list[dict]:
    """Prepare the run directories and launch every run that is not done; print and return a summary."""
    run_dirs = prepare(runs, sweep.out_dir)
    todo = [d for d in run_dirs if read_status(d).get("status") != "done"]
    skipped = len(run_dirs) - len(todo)
    settings = dict(sweep.launcher)
    if launcher is not None:
        settings["name"] = launcher
    if cluster is not None:
        settings["cluster"] = cluster
    print(f"sweep {sweep.name}: {len(runs)} run(s) in {sweep.out_dir}; {skipped} already done, "
          f"{len(todo)} to run with the {settings['name']} launcher", file=sys.stderr)
    if not todo:
        results = []
    elif settings["name"] == "submitit":
        results = launch_submitit(todo, settings, sweep.out_dir / "_submitit", sweep.name)
    else:
        results = launch_local(todo, jobs=int(settings.get("jobs", 1)), threads=settings.get("threads"))
    failed = [(d, s) for d, s in zip(todo, results) if s.get("status") != "done"]
    print(f"sweep {sweep.name}: {len(results) - len(failed)} done now, {skipped} skipped (already done), "
          f"{len(failed)} failed", file=sys.stderr)
    for d, s in failed:
        error = (s.get("error") or "unknown error").splitlines()[0]
        print(f"  FAILED {d.name}: {error}\n         log: {s.get('log', d / 'log.txt')}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    """``prosg sweep``: expand, launch, resume and collect a sweep file (exit 1 if any run failed)."""
    p = argparse.ArgumentParser(
        prog="prosg sweep",
        description="Run a grid of experiments (conf/sweep/*.yaml): expand, launch, resume, collect.",
        epilog="The sweep file format, resume and launcher behaviour are documented in prosg/sweep.py.",
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
            print(f"{run.name} [{_status_line(run, sweep.out_dir)}]: {shlex.join(run.args())}")
        return 0
    if a.collect:
        collect(sweep, runs)
        return 0
    results = launch(sweep, chosen, a.launcher, a.cluster)
    collect(sweep, runs)
    return int(any(s.get("status") != "done" for s in results))


if __name__ == "__main__":
    from prosg.errors import ProSGError

    try:
        sys.exit(main())
    except ProSGError as e:
        print(f"prosg sweep: error: {e}", file=sys.stderr)
        sys.exit(1)
