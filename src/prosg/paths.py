"""Where ProSG's YAML configs are: the repository's ``conf/`` or the copy packaged as ``prosg/conf``.

A clone (editable install) reads the top-level ``conf/``; a regular ``pip install .`` ships a copy of it
inside the package (setup.py). Commands that take a config path (``prosg fit --config conf/...``,
``prosg sweep conf/sweep/...``, ``prosg data --config conf/data/...``) fall back to that copy when a path
starting with ``conf/`` does not exist where prosg runs, so the documented commands work from anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from prosg.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent
CONFIG_SUFFIXES = (".yaml", ".yml")


def conf_dir() -> Path:
    """The config tree: ``prosg/conf`` of an installed package, else the clone's top-level ``conf/``."""
    for candidate in (PACKAGE / "conf", PACKAGE.parents[1] / "conf"):
        if (candidate / "sweep").is_dir():
            return candidate
    raise ConfigError(
        f"ProSG's configs (conf/) are neither in {PACKAGE} nor in the repository around it; reinstall prosg "
        "(pip install .) or run from a clone of the repository"
    )


def find_config(path: str | os.PathLike) -> Path:
    """``path`` if it exists; else, for a relative ``conf/...`` path, the same file in ``conf_dir()``."""
    path = Path(path)
    try:
        if path.exists() or path.is_absolute() or not path.parts or path.parts[0] != "conf":
            return path
    except OSError:  # not a usable file name (e.g. a whole YAML document given as the value)
        return path
    try:
        packaged = conf_dir().joinpath(*path.parts[1:])
    except ConfigError:
        return path
    return packaged if packaged.exists() else path


def with_packaged_configs(args: list[str]) -> list[str]:
    """Command-line arguments with every missing ``conf/...yaml`` value (``X`` or ``--key=X``) resolved by ``find_config``."""
    out = []
    for arg in args:
        if arg.startswith("-"):
            key, eq, value = arg.partition("=")
            if eq and value.endswith(CONFIG_SUFFIXES):
                arg = f"{key}={find_config(value)}"
        elif arg.endswith(CONFIG_SUFFIXES):
            arg = str(find_config(arg))
        out.append(arg)
    return out


def load_yaml(path: str | os.PathLike) -> object:
    """A YAML file as plain Python (OmegaConf ``${...}`` resolved); a one-line ConfigError naming file and line."""
    import yaml
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error ({e.problem or e.context}); fix the file") from None
    except Exception as e:  # omegaconf: bad interpolation, unsupported types, ... (several unrelated classes)
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{path}: cannot read it as YAML ({detail}); fix the file") from None
