"""The sweep file: its format, parsing (``load_sweep``) and expansion into runs (``expand``, ``select``).

Sweep file (YAML; omegaconf ``${...}`` interpolation works inside it)::

    name: recall_methods                         # title of tables and plots (default: the file's stem)
    experiment: ../experiment/plain.yaml   # base experiment, relative to this file
    out_dir: runs/sweeps/recall_methods          # relative to the working directory, like trainer.default_root_dir
    seeds: [0, 1, 2]                             # every grid cell runs once per seed (default [0])
    seed_keys: [seed_everything, data.init_args.seed]  # what a seed sets (the default: initialisation AND
                                                 # the constructed data + shuffle; [seed_everything] for JSONL data;
                                                 # or {key: template}: {model.pretrained: "dir/bb-s{seed}"})
    overrides:                                   # applied to every run
      trainer.max_steps: 2000
    axes:                                        # cartesian product, in this order
      backbone:                                  # label -> overrides
        mamba: {model.backbone: ../model/mamba.yaml}
        rwkv7: {model.backbone: ../model/rwkv7.yaml}
      method:
        plain: {model.method: ../method/plain.yaml}
        sg: {model.method: ../method/sg.yaml, model.freeze_backbone: false}
      rank:                                      # shorthand: one key, a list of values
        key: model.method.init_args.rank
        values: [4, 8, 16]
        when: {method: sg}                       # only crossed with these labels of earlier axes
    launcher: {name: local}                      # or submitit (settings: prosg.sweep.launchers)

Override keys are LightningCLI argument names, exactly what follows ``--`` on the command line
(``trainer.max_steps``, ``model.method.init_args.rank``, ``trainer.callbacks+``); each becomes
``--key=value`` (null -> ``null``, lists/dicts -> JSON). A string value ending in ``.yaml``/``.yml``
is a config path relative to the sweep file. A run's arguments are ``--config <experiment>``, then
``overrides``, then each axis's overrides in axis order, then the seed keys: a later key replaces an
earlier one and moves to the end, and LightningCLI applies the arguments in that order. The
structured axis form ``{values: {label: overrides}, when: ...}`` makes a label axis conditional.
Run names join the labels and the seed, e.g. ``mamba-sg-rank4-s0`` (a key/values axis labels a value
``<axis><value>``, or a string value by itself; ``label: "r{value}"`` sets the format).
Run directories, status and resume: ``prosg.sweep.runner``; tables and plots: ``prosg.sweep.report``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prosg.errors import ConfigError
from prosg.sweep.tuning import Tuning, parse_tuning
from prosg.sweep.launchers import check_launcher

# A seed re-draws the initialisation AND the data (train, val and test examples, shuffle); a sweep on
# data without a seed (JSONL) sets seed_keys: [seed_everything].
DEFAULT_SEED_KEYS = ("seed_everything", "data.init_args.seed")
SWEEP_KEYS = ("name", "experiment", "out_dir", "seeds", "seed_keys", "overrides", "axes", "launcher", "tune")
LABEL_RE = re.compile(r"^[A-Za-z0-9._+=-]+$")


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
    seed_keys: dict[str, str]  # argument -> template ("{seed}" gives the seed as a number)
    overrides: dict[str, Any]
    axes: list[Axis]
    launcher: dict[str, Any]
    tune: Tuning | None = None  # axes tuned per cell on validation (prosg.sweep.tuning)


@dataclass
class Run:
    """One run of a sweep: a grid cell and a seed."""

    name: str
    labels: dict[str, str]  # axis -> label (axes skipped by `when` are absent)
    axes: dict[str, Any]  # axis -> recorded value
    seed: int
    experiment: Path
    overrides: dict[str, Any]  # merged, in the order they are applied
    sweep: str = ""  # the sweep's name: the run's group in loggers that show one (W&B, MLflow, TensorBoard dirs)

    def args(self) -> list[str]:
        """LightningCLI arguments of this run (without the subcommand)."""
        return ["--config", str(self.experiment), *(f"--{k}={format_value(v)}" for k, v in self.overrides.items())]

    def spec(self) -> dict[str, Any]:
        """What ``run.json`` holds: everything a worker needs to run it."""
        return {
            "name": self.name, "sweep": self.sweep, "labels": self.labels, "axes": self.axes, "seed": self.seed,
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
    from prosg.paths import find_config, load_yaml

    path = find_config(path).resolve()  # conf/sweep/... works from anywhere: the configs ship with prosg
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist; pass a YAML such as conf/sweep/smoke.yaml")
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with keys {SWEEP_KEYS}")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid keys: {', '.join(SWEEP_KEYS)}")
    base = path.parent
    if "experiment" not in raw:
        raise ConfigError(f"{path}: set experiment: <base experiment YAML>, e.g. ../experiment/plain.yaml")
    experiment = Path(_resolve_path(str(raw["experiment"]), base))
    if not experiment.is_file():
        raise ConfigError(f"{path}: experiment {experiment} does not exist; give a path relative to the sweep file")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of ints, e.g. [0, 1, 2]; got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: seeds {seeds} has duplicates")
    seed_keys = raw.get("seed_keys", list(DEFAULT_SEED_KEYS))
    if isinstance(seed_keys, list):
        seed_keys = {k: "{seed}" for k in seed_keys}
    if not isinstance(seed_keys, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in seed_keys.items()):
        raise ConfigError(
            f"{path}: seed_keys must be a list of argument names, e.g. [seed_everything, data.init_args.seed], or a "
            "mapping of argument name -> template, e.g. {model.pretrained: 'assets/pretrained/rwkv7-s{seed}'}"
        )
    axes_raw = raw.get("axes") or {}
    if not isinstance(axes_raw, dict):
        raise ConfigError(f"{path}: axes must be a mapping of axis name -> values")
    axes: list[Axis] = []
    for name, spec in axes_raw.items():
        if not LABEL_RE.match(str(name)) or name in ("run", "status", "seed"):
            raise ConfigError(f"{path}: axis name {name!r} is reserved or has characters other than letters, digits, . _ + = -")
        axes.append(_parse_axis(str(name), spec, [a.name for a in axes], base))
    launcher = check_launcher(raw.get("launcher"), path)
    tune = parse_tuning(raw.get("tune"), [a.name for a in axes], path)
    if tune is not None and set(tune.seeds) & set(seeds):
        raise ConfigError(f"{path}: tune.seeds {tune.seeds} must differ from seeds {seeds}: the tuning seeds choose, the "
                          "extra seeds only confirm the chosen setting")
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
        tune=tune,
    )


def seed_overrides(seed_keys: dict[str, str], seed: int) -> dict[str, Any]:
    """What a seed sets: each key's template with ``{seed}`` filled in (a bare ``{seed}`` stays a number)."""
    return {k: seed if t == "{seed}" else t.format(seed=seed) for k, t in seed_keys.items()}


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
            name = run_name([label for _, label in cell], seed)
            overrides = _merge(
                sweep.overrides, *(axis.options[label] for axis, label in cell), seed_overrides(sweep.seed_keys, seed)
            )
            run = Run(
                name=name,
                labels={a.name: label for a, label in cell},
                axes={a.name: a.values[label] for a, label in cell},
                seed=seed,
                experiment=sweep.experiment,
                overrides=overrides,
                sweep=sweep.name,
            )
            if name in seen:
                raise ConfigError(
                    f"{sweep.path}: two runs are both named {name!r} ({seen[name]} and {run.labels}); "
                    "give the axes distinct labels"
                )
            seen[name] = run.labels
            runs.append(run)
    return runs


def run_name(labels: list[str], seed: int) -> str:
    """A run's name: its axis labels in axis order and its seed, e.g. ``mamba-sg-rank4-s0``."""
    return "-".join([*labels, f"s{seed}"])


def reseed(run: Run, seed: int, seed_keys: dict[str, str]) -> Run:
    """The same grid cell as ``run`` on another seed (what a tuned setting's confirmation runs are)."""
    return Run(name=run_name(list(run.labels.values()), seed), labels=dict(run.labels), axes=dict(run.axes), seed=seed,
               experiment=run.experiment, overrides=_merge(run.overrides, seed_overrides(seed_keys, seed)), sweep=run.sweep)


def select(runs: list[Run], only: list[str] | None, required: bool = True) -> list[Run]:
    """The runs whose names match any of the ``only`` globs (all runs without globs); none matching is an
    error when ``required``."""
    if not only:
        return runs
    chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.name, g) for g in only)]
    if not chosen and required:
        raise ConfigError(f"--only {only} matches none of the {len(runs)} runs; see their names with --dry-run")
    return chosen

