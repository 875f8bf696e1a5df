"""The training entry point: LightningCLI over ``ProSGModule`` + a DataModule, and fit-then-test.

Everything that trains calls this module: ``prosg fit/validate/test`` (``prosg.cli``), each sweep
run (``prosg.sweep.runner``), the demo and the notebooks. It imports nothing above it, so the CLI
is only the top floor.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from prosg.errors import ConfigError

# DataModule facts the model needs, linked at instantiation (a DataModule exposes each as an attribute).
DATA_LINKS = ("vocab_size", "pad_id", "bucket_edges", "tasks", "n_facts_values")


def lightning_main(args: list[str], run: bool = True):
    """Run a LightningCLI subcommand on ``args`` (or, with ``run=False``, only parse + instantiate them)."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from prosg.module import ProSGModule

    accepted = inspect.signature(ProSGModule.__init__).parameters

    class ProSGCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # the model's vocabulary, padding, metric slices and distance buckets come from the data
            for fact in DATA_LINKS:
                if fact in accepted:  # TODO(module links): link all once ProSGModule takes every fact
                    parser.link_arguments(f"data.{fact}", f"model.{fact}", apply_on="instantiate")

    return ProSGCLI(
        ProSGModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=0,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=None if args == sys.argv[1:] else args,  # LightningCLI warns when given both
        run=run,
    )


def resolve_config(args: list[str], run_dir: str | Path) -> str:
    """The full ``fit`` config of ``args`` as YAML, with every output (checkpoints, logs) in ``run_dir``.

    ``default_root_dir`` and the ``save_dir`` of every configured logger become ``run_dir``, so a run's
    files stay in its directory whatever the experiment's trainer config says.
    """
    # Import before redirecting: Lightning's log handler binds the sys.stderr of its import time, and
    # bound to the StringIO below it would swallow every later log line of the run.
    import lightning.pytorch.cli  # noqa: F401

    import prosg.module  # noqa: F401

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            lightning_main(["fit", *args, "--print_config"])
    except SystemExit as e:  # --print_config exits 0 after printing; a bad argument exits 2
        if e.code not in (0, None):
            reason = err.getvalue().split("error:", 1)[-1].strip()
            raise ConfigError(
                f"the run's arguments do not parse: {reason[:1500]}\n"
                "fix the override (see `prosg fit -h` for the argument names)"
            ) from None
    config = yaml.safe_load(out.getvalue())
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(run_dir)
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict) and "save_dir" in (logger.get("init_args") or {}):
            logger["init_args"]["save_dir"] = str(run_dir)
    return yaml.safe_dump(config, sort_keys=False)


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items())}


def fit_and_test(args: list[str], run_dir: str | Path, write_config: bool = True) -> tuple[Any, dict, dict]:
    """``prosg fit`` on ``args`` with outputs in ``run_dir``, then test the trained model.

    Returns the LightningCLI and the callback metrics after fit and after test (floats).
    ``config.yaml`` (the resolved config: ``prosg fit --config`` it to repeat the run) is written
    into ``run_dir`` unless ``write_config`` is False (DDP ranks other than 0).
    """
    run_dir = Path(run_dir)
    with warnings.catch_warnings():
        # the CLI warns that it got args while sys.argv holds the caller's own arguments: expected here
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        config = resolve_config(args, run_dir)
        if write_config:
            (run_dir / "config.yaml").write_text(config)
        cli = lightning_main(["fit", "--config", config])
        after_fit = _floats(cli.trainer.callback_metrics)
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return cli, after_fit, _floats(cli.trainer.callback_metrics)


def model_sizes(model) -> dict[str, int]:
    """Sizes a fair comparison needs, for a ``ProSGModule``: what is trained and what is remembered.

    ``state``: numbers the recurrent state carries per sample (``Backbone.state_size()``);
    ``method``: extra numbers per sample the method holds during generation (e.g. the SG delta);
    ``memory`` = state + method; ``trainable_params`` / ``total_params``: parameter counts.
    """
    state = int(model.backbone.state_size())
    method = int(model.method.memory_size()) if hasattr(model, "method") else 0  # TODO(method seam): always set
    return {
        "state": state,
        "method": method,
        "memory": state + method,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
    }
