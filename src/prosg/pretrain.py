"""``prosg pretrain``: make the backbones of the frozen-backbone setting, small enough to ship.

A pretraining sweep (default ``conf/sweep/pretrain.yaml``; ``conf/sweep/pretrain_lm.yaml`` for the byte-level
language models) trains plain backbones; every run ends by saving its backbone (``ExportBackbone``, added to
every run if the sweep file does not name it). The command then copies each one into ``--out`` (default
``assets/pretrained``) as ``<run>/`` in ProSG's native layout (``config.json`` + ``model.safetensors``),
with ``provenance.json``: the command, the sweep file, the run's full arguments and seed, its data config
(and, when it trained on ``text``, the corpus: source, Python version, per split characters and sha256),
the software versions, its validation and test metrics, and the sha256 of every file. Experiments load
them with ``model.pretrained: assets/pretrained/<run>`` and freeze them. ``--steps`` replaces the sweep's
steps, ``--set KEY=VALUE`` applies after every axis, ``--only`` picks runs (a shortened run, e.g. in CI:
``--steps 2 --set model.backbone.init_args.d_model=16``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

import lightning as L
import yaml

from prosg.data.store import sha256_file
from prosg.errors import ConfigError

PRETRAIN_SWEEP = "sweep/pretrain.yaml"  # in prosg.paths.conf_dir()
BACKBONE_DIR = "backbone"  # inside a run directory
EXPORT = {"class_path": "prosg.pretrain.ExportBackbone"}
# the metrics a published backbone records: accuracies of the prompt answers, loss and perplexity
KEPT_METRICS = ("/all/", "/gen/all/acc", "/loss", "/ppl")


class ExportBackbone(L.Callback):
    """At the end of training, save the backbone (native layout) into ``<default_root_dir>/backbone``."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from prosg.backbones.native import save_native

        if trainer.is_global_zero:  # native for every family: config.json round-trips each one exactly
            save_native(pl_module.backbone, Path(trainer.default_root_dir) / BACKBONE_DIR)


def _uses_text(data: Any) -> bool:
    """Whether a data config trains on the ``text`` task (the corpus then belongs in the provenance)."""
    tasks = ((data or {}).get("init_args") or {}).get("tasks") if isinstance(data, dict) else None
    tasks = [tasks] if isinstance(tasks, dict) else tasks or []
    return any(isinstance(t, dict) and t.get("name") == "text" for t in tasks)


def _versions() -> dict[str, str]:
    import torch

    from prosg import __version__

    return {"prosg": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "lightning": L.__version__}


def publish(run_dir: Path, out: Path, sweep_path: Path, command: str | None = None) -> Path:
    """Copy a finished pretraining run's backbone to ``out/<run>`` with its provenance."""
    from prosg.backbones import detect_format
    from prosg.errors import CheckpointError

    src = run_dir / BACKBONE_DIR
    try:  # the family's own layout: config.json + weights, or a BlinkDL .pth for RWKV
        detect_format(src)
    except CheckpointError:
        raise ConfigError(f"{run_dir} has no exported backbone ({BACKBONE_DIR}/); was it run with ExportBackbone?") from None
    dest = out / run_dir.name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    spec = json.loads((run_dir / "run.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    data = (config or {}).get("data")
    kept = lambda part: {k: v for k, v in metrics.get(part, {}).items() if any(m in k for m in KEPT_METRICS)}
    provenance = {
        "made_by": command or f"prosg pretrain --sweep {sweep_path}",
        "sweep": str(sweep_path), "run": spec["name"], "seed": spec["seed"], "args": spec["args"],
        "data": data,
        "corpus": None,
        "versions": _versions(),
        "global_step": metrics.get("global_step"), "wall_s": metrics.get("wall_s"),
        "params": (metrics.get("sizes") or {}).get("total_params"),
        "val": kept("val"), "test": kept("test"),
        "sha256": {p.name: sha256_file(p) for p in sorted(dest.iterdir()) if p.is_file()},
    }
    if _uses_text(data):
        from prosg.data.corpus import corpus_info

        provenance["corpus"] = corpus_info()
    (dest / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return dest


def _assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (the value read as YAML) -> (key, value)."""
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise ConfigError(f"--set {text!r}: write KEY=VALUE, e.g. --set model.backbone.init_args.d_model=16")
    return key, yaml.safe_load(value)


def _finalise(runs: list, last: dict[str, Any], export: bool) -> None:
    """Apply ``last`` after every axis of every run and, with ``export``, make sure each run saves its backbone."""
    for run in runs:
        merged = {k: v for k, v in run.overrides.items() if k not in last}
        merged.update(last)
        callbacks = [v for k, v in merged.items() if k.startswith("trainer.callbacks")]
        exporting = not export or any("ExportBackbone" in json.dumps(v) for v in callbacks)
        if not exporting:
            merged["trainer.callbacks+"] = EXPORT
        run.overrides = merged


def sweep_options(p: argparse.ArgumentParser, default: str) -> None:
    """The options of a command that runs a sweep first: --sweep, --runs-dir, --steps, --seeds."""
    p.add_argument("--sweep", help=f"the sweep file (default: conf/{default})")
    p.add_argument("--runs-dir", help="where the runs go (default: the sweep's out_dir)")
    p.add_argument("--steps", type=int, help="override trainer.max_steps (a shortened run, e.g. in CI)")
    p.add_argument("--seeds", type=int, nargs="*", help="override the sweep's seeds")


def run_sweep(args: argparse.Namespace, default: str, check: Callable[[list[Any]], None] | None = None,
              export: bool = False) -> tuple[Any, list[Any], Any]:
    """Load the sweep of ``args`` (its --steps / --seeds applied; --set and --only where the command has them),
    ``check`` its runs, run or resume them, collect them: (sweep, runs, collected). ``export``: every run saves
    its backbone (``ExportBackbone``)."""
    from prosg.paths import conf_dir
    from prosg.sweep import collect, expand, launch, load_sweep, select

    if args.sweep is None:
        args.sweep = str(conf_dir() / default)
    sweep = load_sweep(args.sweep, out_dir=args.runs_dir)
    if args.seeds:
        sweep.seeds = list(args.seeds)
    if args.steps:  # before the axes: an axis's own max_steps (0: evaluation only) still wins
        sweep.overrides.update({"trainer.max_steps": args.steps, "trainer.val_check_interval": args.steps})
    runs = expand(sweep)
    last = dict(_assignment(a) for a in getattr(args, "set", None) or [])
    if last or export:
        _finalise(runs, last, export)
    runs = select(runs, getattr(args, "only", None))
    if check is not None:
        check(runs)
    launch(sweep, runs)
    return sweep, runs, collect(sweep, runs, plots=False)


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the pretraining sweep and publish every finished backbone."""
    p = argparse.ArgumentParser(prog="prosg pretrain", description=__doc__.split("\n\n")[0])
    sweep_options(p, PRETRAIN_SWEEP)
    p.add_argument("--out", default="assets/pretrained", help="where the backbones are published (default: assets/pretrained)")
    p.add_argument("--only", action="append", metavar="NAME_GLOB", help="only the runs matching this glob (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more override for every run, applied after the axes (repeatable)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    sweep, runs, collected = run_sweep(args, PRETRAIN_SWEEP, export=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["prosg", "pretrain", *argv])
    for run in runs:
        if (sweep.out_dir / run.name / "metrics.json").is_file():
            dest = publish(sweep.out_dir / run.name, out, Path(args.sweep), command)
            print(f"published {dest}")
    failed = [pr["name"] for pr in collected.problems]
    if failed:
        print(f"{len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
