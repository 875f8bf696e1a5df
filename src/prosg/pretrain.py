"""``prosg pretrain``: make the backbones of the frozen-backbone setting, small enough to ship.

A pretraining sweep (default ``conf/sweep/pretrain.yaml``) trains plain backbones on the task's
short distances; every run ends by saving its backbone (``ExportBackbone``). The command then copies
each one into ``--out`` (default ``assets/pretrained``) as ``<run>/`` in the family's native layout
(``config.json`` + ``pytorch_model.bin``; RWKV: BlinkDL's ``model.pth``), with ``provenance.json``: the
sweep file, the run's full arguments and seed, its validation and test metrics, and the weights'
sha256. Experiments load them with ``model.pretrained: assets/pretrained/<run>`` and freeze them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import lightning as L

from prosg.errors import ConfigError

PRETRAIN_SWEEP = "sweep/pretrain.yaml"  # in prosg.paths.conf_dir()
BACKBONE_DIR = "backbone"  # inside a run directory


class ExportBackbone(L.Callback):
    """At the end of training, save the backbone (native layout) into ``<default_root_dir>/backbone``."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            pl_module.backbone.save_pretrained(str(Path(trainer.default_root_dir) / BACKBONE_DIR))


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def publish(run_dir: Path, out: Path, sweep_path: Path) -> Path:
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
    weights = sorted(p for p in dest.iterdir() if p.suffix in (".bin", ".safetensors", ".pth"))
    (dest / "provenance.json").write_text(json.dumps({
        "made_by": f"prosg pretrain --sweep {sweep_path}",
        "run": spec["name"], "seed": spec["seed"], "args": spec["args"],
        "global_step": metrics.get("global_step"), "wall_s": metrics.get("wall_s"),
        "val": {k: v for k, v in metrics.get("val", {}).items() if k.startswith("val/all/")},
        "test": {k: v for k, v in metrics.get("test", {}).items() if k.startswith("test/all/acc")},
        "sha256": {p.name: sha256(p) for p in weights},
    }, indent=2) + "\n")
    return dest


def sweep_options(p: argparse.ArgumentParser, default: str) -> None:
    """The options of a command that runs a sweep first: --sweep, --runs-dir, --steps, --seeds."""
    p.add_argument("--sweep", help=f"the sweep file (default: conf/{default})")
    p.add_argument("--runs-dir", help="where the runs go (default: the sweep's out_dir)")
    p.add_argument("--steps", type=int, help="override trainer.max_steps (a shortened run, e.g. in CI)")
    p.add_argument("--seeds", type=int, nargs="*", help="override the sweep's seeds")


def run_sweep(args: argparse.Namespace, default: str,
              check: Callable[[list[Any]], None] | None = None) -> tuple[Any, list[Any], Any]:
    """Load the sweep of ``args`` (its --steps / --seeds applied), ``check`` its runs, run or resume them, collect
    them: (sweep, runs, collected)."""
    from prosg.paths import conf_dir
    from prosg.sweep import collect, expand, launch, load_sweep

    if args.sweep is None:
        args.sweep = str(conf_dir() / default)
    sweep = load_sweep(args.sweep, out_dir=args.runs_dir)
    if args.seeds:
        sweep.seeds = list(args.seeds)
    if args.steps:
        sweep.overrides.update({"trainer.max_steps": args.steps, "trainer.val_check_interval": args.steps})
    runs = expand(sweep)
    if check is not None:
        check(runs)
    launch(sweep, runs)
    return sweep, runs, collect(sweep, runs, plots=False)


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the pretraining sweep and publish every finished backbone."""
    p = argparse.ArgumentParser(prog="prosg pretrain", description=__doc__.split("\n\n")[0])
    sweep_options(p, PRETRAIN_SWEEP)
    p.add_argument("--out", default="assets/pretrained", help="where the backbones are published (default: assets/pretrained)")
    args = p.parse_args(argv)
    sweep, runs, collected = run_sweep(args, PRETRAIN_SWEEP)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        if (sweep.out_dir / run.name / "metrics.json").is_file():
            dest = publish(sweep.out_dir / run.name, out, Path(args.sweep))
            print(f"published {dest}")
    failed = [pr["name"] for pr in collected.problems]
    if failed:
        print(f"{len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
