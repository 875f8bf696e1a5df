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
import tempfile
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


def lightning_main(args: list[str], run: bool = True, save_config: bool = True):
    """Run a LightningCLI subcommand on ``args`` (or, with ``run=False``, only parse + instantiate them).

    What ``prosg fit/validate/test/predict ARGS`` runs, callable from Python (notebooks, scripts):
    ``lightning_main(["fit", "--config", "conf/experiment/sg.yaml", "--trainer.max_steps=100"])`` returns
    the LightningCLI (``cli.model``, ``cli.trainer``, ``cli.datamodule``); the caller's own ``sys.argv``
    is ignored. ``save_config=False``: no ``config.yaml`` in the log directory (the caller writes one).
    """
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from prosg.module import ProSGModule

    class ProSGCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # the model's vocabulary, padding, metric slices and distance buckets come from the data
            for fact, arg in DATA_LINKS.items():
                parser.link_arguments(f"data.{fact}", f"model.{arg}", apply_on="instantiate")

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads the checkpoint's hyper-parameters here (weights_only=True): a missing, truncated
            # or unsafe file is a CheckpointError in one line, not a traceback from deep inside torch
            from prosg.checkpoints import LOAD_ERRORS, check_ckpt_path, is_local_path, load_error

            subcommand = self.config.get("subcommand")
            ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt and is_local_path(str(ckpt)):
                check_ckpt_path(str(ckpt), "--ckpt_path")
                try:
                    super()._parse_ckpt_path()
                except LOAD_ERRORS as e:
                    raise load_error(str(ckpt), e) from None
            else:
                super()._parse_ckpt_path()

        def after_instantiate_classes(self) -> None:
            if self.subcommand is not None:
                check_output_dirs(self.trainer)

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

    from prosg.paths import with_packaged_configs

    try:
        with warnings.catch_warnings():
            # LightningCLI warns that it got args while sys.argv holds the caller's own arguments (a notebook
            # kernel's, a sweep worker's): args are what counts here
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            return ProSGCLI(
                ProSGModule,
                L.LightningDataModule,
                subclass_mode_data=True,
                seed_everything_default=0,
                # the module builds its own parameter groups and schedule: no --optimizer/--lr_scheduler that
                # would silently replace them
                auto_configure_optimizers=False,
                parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
                save_config_callback=_save_config_callback() if save_config else None,
                save_config_kwargs={"overwrite": True},
                args=with_packaged_configs(list(args)),
                run=run,
            )
    except ProSGError:
        raise
    except (ArgumentError, ValueError, TypeError) as e:
        # jsonargparse wraps errors of argument parsing and of instantiation (a ConfigError raised by
        # one of our constructors included) into long messages; report the cause in one line
        raise ConfigError(argument_problem(e, args)) from None


def _save_config_callback() -> type:
    """LightningCLI's SaveConfigCallback that never overwrites the config of another run.

    With a logger, ``config.yaml`` goes into its (versioned) log directory, as in Lightning. Without one
    (``trainer.logger: false``) Lightning writes ``default_root_dir/config.yaml``, which every run sharing
    that root would overwrite; here a later run writes ``config-v1.yaml``, ``config-v2.yaml``, ... instead
    (as ModelCheckpoint names ``last-v1.ckpt``) and says so.
    """
    from lightning.pytorch.cli import SaveConfigCallback

    class VersionedSaveConfigCallback(SaveConfigCallback):
        def setup(self, trainer, pl_module, stage: str) -> None:
            # only the file name changes; Lightning's setup saves it (rank zero) and syncs the ranks
            if not trainer.loggers and not self.already_saved and trainer.is_global_zero:
                root, name = Path(trainer.default_root_dir), Path(self.config_filename)
                path, n = root / name, 0
                while path.exists():
                    n += 1
                    path = root / f"{name.stem}-v{n}{name.suffix}"
                if n:
                    self.config_filename = path.name
                    print(f"prosg: trainer.logger is false and {root / name} belongs to an earlier run in this "
                          f"default_root_dir: this run's config is {path}", file=sys.stderr)
            super().setup(trainer, pl_module, stage)

    return VersionedSaveConfigCallback


def check_output_dirs(trainer) -> None:
    """A ConfigError naming the option when ``default_root_dir`` or a logger's ``save_dir`` cannot be written."""
    dirs = {"trainer.default_root_dir": trainer.default_root_dir}
    for i, logger in enumerate(trainer.loggers):
        save_dir = getattr(logger, "save_dir", None)
        if save_dir is not None:
            dirs[f"trainer.logger ({type(logger).__name__}) save_dir" if len(trainer.loggers) == 1
                 else f"trainer.logger[{i}] ({type(logger).__name__}) save_dir"] = save_dir
    for option, directory in dirs.items():
        if "://" in str(directory):  # remote file systems: Lightning's fsspec handles them
            continue
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as e:
            raise ConfigError(
                f"{option} {str(directory)!r} is not a writable directory ({e.strerror or type(e).__name__}); "
                "point it at a directory you can write (e.g. runs)"
            ) from None


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


def resolve_config(args: list[str], run_dir: str | Path, name: str | None = None, group: str | None = None) -> str:
    """The full ``fit`` config of ``args`` as YAML, with every output (checkpoints, logs) in ``run_dir``.

    ``default_root_dir`` and the ``save_dir`` of every configured logger become ``run_dir``, so a run's
    files stay in its directory whatever the experiment's trainer config says. ``name`` / ``group`` (a
    sweep's run and sweep names) label the run in loggers that show names: W&B gets ``name`` and
    ``group``, MLflow ``run_name`` and ``experiment_name``, CSV / TensorBoard log into ``group/name``.
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
        if isinstance(logger, dict):
            name_logger(logger, run_dir, name, group)
    return yaml.safe_dump(config, sort_keys=False)


def name_logger(logger: dict[str, Any], run_dir: str | Path, name: str | None, group: str | None) -> None:
    """Point a logger config (``class_path`` + ``init_args``) at ``run_dir`` and label it with the run's names."""
    init = logger.setdefault("init_args", {}) or {}
    logger["init_args"] = init
    cls = logger.get("class_path", "").rsplit(".", 1)[-1]
    if "save_dir" in init:
        init["save_dir"] = str(run_dir)
    if name is None:
        return
    if cls == "WandbLogger":
        init["name"] = name
        if group is not None:
            logger.setdefault("dict_kwargs", {})["group"] = group  # passed on to wandb.init
    elif cls == "MLFlowLogger":
        init["run_name"] = name
        if group is not None:
            init["experiment_name"] = group
    elif cls in ("CSVLogger", "TensorBoardLogger"):
        init["name"], init["version"] = group or "", name


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items())}


def fit_and_test(args: list[str], run_dir: str | Path, write_config: bool = True, name: str | None = None,
                 group: str | None = None) -> tuple[Any, dict, dict]:
    """``prosg fit`` on ``args`` with outputs in ``run_dir``, then test the trained model.

    Returns the LightningCLI and the callback metrics after fit and after test (floats).
    ``config.yaml`` (the resolved config: ``prosg fit --config`` it to repeat the run) is written
    into ``run_dir`` unless ``write_config`` is False (DDP ranks other than 0). ``name`` / ``group``
    label the run in its logger (``resolve_config``).
    """
    run_dir = Path(run_dir)
    config = resolve_config(args, run_dir, name, group)
    if write_config:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config)
    cli = lightning_main(["fit", "--config", config], save_config=False)
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
