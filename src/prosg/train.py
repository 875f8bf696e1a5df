"""The training entry point: LightningCLI over ``ProSGModule`` + a DataModule, and fit-then-test.

Everything that trains calls this module: ``prosg fit/validate/test`` (``prosg.cli``), each sweep
run (``prosg.sweep.runner``), the demo and the notebooks. It imports nothing above it, so the CLI
is only the top floor.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from prosg.errors import ConfigError, ProSGError

# DataModule facts the model needs, linked at instantiation: data attribute -> model argument. The
# metric facts get their own names on the model: Lightning logs the hyper-parameters of both, and a
# key with two different values (the DataModule's `tasks` are task specs) is an error.
DATA_LINKS = {
    "vocab_size": "vocab_size",
    "pad_id": "pad_id",
    "bucket_edges": "eval_buckets",
    "tasks": "eval_tasks",
    "n_facts_values": "eval_n_facts",
}


def lightning_main(args: list[str], run: bool = True):
    """Run a LightningCLI subcommand on ``args`` (or, with ``run=False``, only parse + instantiate them)."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from prosg.module import ProSGModule

    class ProSGCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # the model's vocabulary, padding, metric slices and distance buckets come from the data
            for fact, arg in DATA_LINKS.items():
                parser.link_arguments(f"data.{fact}", f"model.{arg}", apply_on="instantiate")

        def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
            kwargs = super()._prepare_subcommand_kwargs(subcommand)
            if "weights_only" in self._subcommand_method_arguments[subcommand]:
                if kwargs.get("weights_only") is False:
                    raise ConfigError(
                        "--weights_only=false would let a checkpoint run arbitrary code while loading; ProSG "
                        "checkpoints hold only tensors and plain data, so drop the flag"
                    )
                kwargs["weights_only"] = True  # whatever torch's default: no code runs from a checkpoint
            return kwargs

    from jsonargparse import ArgumentError

    try:
        return ProSGCLI(
            ProSGModule,
            L.LightningDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            # the module builds its own parameter groups and schedule: no --optimizer/--lr_scheduler that
            # would silently replace them
            auto_configure_optimizers=False,
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
            save_config_kwargs={"overwrite": True},
            args=None if args == sys.argv[1:] else args,  # LightningCLI warns when given both
            run=run,
        )
    except ProSGError:
        raise
    except (ArgumentError, ValueError, TypeError) as e:
        # jsonargparse wraps errors of argument parsing and of instantiation (a ConfigError raised by
        # one of our constructors included) into long messages; report the cause in one line
        raise ConfigError(argument_problem(e, args)) from None


def argument_problem(e: BaseException, args: list[str]) -> str:
    """One line for an argument/config error: a ProSG error in its cause chain, else jsonargparse's gist."""
    seen, cause = set(), e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ProSGError):
            return str(cause)
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    text = str(e)
    command = args[0] if args and not args[0].startswith("-") else "fit"
    key = re.search(r'Parser key "([^"]+)"', text)
    bad = re.search(r"Problem with given class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", text)
    if bad:
        valid = _init_args(bad[1])
        where = f"{key[1]}.init_args." if key else ""
        return (f"{where}{bad[2]}: {bad[1]} has no argument {bad[2]!r}"
                + (f"; valid: {', '.join(valid)}" if valid else "") + f" (see `prosg {command} -h`)")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "NoneType" not in ln
             and not ln.strip().startswith(("Given value", "Subtypes:", "Errors:"))]
    return f"{' '.join(lines)[:500]} (see `prosg {command} -h` for the options)"


def _init_args(class_path: str) -> list[str]:
    """The constructor argument names of a class given by its import path ([] if it cannot be imported)."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


def resolve_config(args: list[str], run_dir: str | Path) -> str:
    """The full ``fit`` config of ``args`` as YAML, with every output (checkpoints, logs) in ``run_dir``.

    ``default_root_dir`` and the ``save_dir`` of every configured logger become ``run_dir``, so a run's
    files stay in its directory whatever the experiment's trainer config says.
    """
    # Import before redirecting: Lightning's log handler binds the sys.stderr of its import time, and
    # bound to the StringIO below it would swallow every later log line of the run.
    import lightning.pytorch.cli  # noqa: F401

    import prosg.module  # noqa: F401

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            lightning_main(["fit", *args, "--print_config"])
    except SystemExit as e:  # --print_config exits 0 after printing
        if e.code not in (0, None):
            raise ConfigError(f"the run's arguments do not parse (exit {e.code}); see `prosg fit -h`") from None
    except ConfigError as e:
        raise ConfigError(f"the run's arguments do not parse: {e}") from None
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
    method = int(model.method.memory_size())
    return {
        "state": state,
        "method": method,
        "memory": state + method,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
    }
