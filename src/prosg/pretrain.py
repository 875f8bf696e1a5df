"""``prosg pretrain``: make the backbones of the frozen-backbone setting, small enough to ship.

A pretraining sweep (default ``conf/sweep/pretrain.yaml``; ``conf/sweep/pretrain_lm.yaml`` for the byte-level
language models) trains plain backbones; every run ends by saving its backbone (``ExportBackbone``, added to
every run if the sweep file does not name it). The command then copies each one into ``--out`` (default
``assets/pretrained``) as ``<run>/`` in ProSG's native layout (``config.json`` + ``model.safetensors``),
with ``provenance.json``: the command, the sweep file, the run's full arguments and seed, its data config
(and, when it trained on ``text``, the corpus: source, Python version, per split characters and sha256),
the software versions, its validation and test metrics, and the sha256 of every file. Experiments load
them with ``model.pretrained: assets/pretrained/<run>`` and freeze them. ``--steps`` caps the sweep's steps
(an axis's own shorter schedule stays), ``--set KEY=VALUE`` applies after every axis, ``--only`` picks runs
(a shortened run, e.g. in CI: ``--steps 2 --set model.backbone.init_args.d_model=16``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
from pathlib import Path
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
    here = f"{Path.cwd()}{os.sep}"  # paths under the working directory are written relative to it: shippable
    local = lambda text: str(text).replace(here, "")
    provenance = {
        "made_by": command or f"prosg pretrain --sweep {local(sweep_path)}",
        "sweep": local(sweep_path), "run": spec["name"], "seed": spec["seed"], "args": [local(a) for a in spec["args"]],
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


def with_export(runs: list) -> None:
    """Make sure every run saves its backbone (``ExportBackbone``) unless its callbacks already do."""
    for run in runs:
        callbacks = [v for k, v in run.overrides.items() if k.startswith("trainer.callbacks")]
        if not any("ExportBackbone" in json.dumps(v) for v in callbacks):
            run.overrides["trainer.callbacks+"] = EXPORT


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the pretraining sweep and publish every finished backbone."""
    from prosg.sweep.command import run_sweep, sweep_options

    p = argparse.ArgumentParser(prog="prosg pretrain", description=__doc__.split("\n\n")[0])
    sweep_options(p, PRETRAIN_SWEEP)
    p.add_argument("--out", default="assets/pretrained", help="where the backbones are published (default: assets/pretrained)")
    p.add_argument("--only", action="append", metavar="NAME_GLOB", help="only the runs matching this glob (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more override for every run, applied after the axes (repeatable)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    outcome = run_sweep(args, PRETRAIN_SWEEP, finalise=with_export)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["prosg", "pretrain", *argv])
    for run in outcome.runs:
        if (outcome.sweep.out_dir / run.name / "metrics.json").is_file():
            dest = publish(outcome.sweep.out_dir / run.name, out, Path(args.sweep or outcome.sweep.path), command)
            print(f"published {dest}")
    return outcome.exit_status()
