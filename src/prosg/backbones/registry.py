"""Name -> backbone class, and checkpoint formats recognised by ``from_pretrained``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prosg.backbones.checkpoint import read_json
from prosg.errors import CheckpointError, ConfigError

BACKBONES: dict[str, type] = {}


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint layout: a detector over a path and a loader that returns a Backbone."""

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path], Any]
    description: str


FORMATS: list[CheckpointFormat] = []


def register_backbone(name: str) -> Callable[[type], type]:
    """Class decorator: make ``build(name, ...)`` construct this class."""

    def deco(cls: type) -> type:
        BACKBONES[name] = cls
        cls.family = name
        return cls

    return deco


def register_format(name: str, detect: Callable[[Path], bool], load: Callable[[Path], Any], description: str) -> None:
    """Teach ``from_pretrained`` a checkpoint layout."""
    FORMATS.append(CheckpointFormat(name, detect, load, description))


def build(name: str, **config: Any) -> Any:
    """Construct a freshly initialised backbone by family name."""
    if name not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}"
        )
    return BACKBONES[name](**config)


def detect_format(path: str | Path) -> CheckpointFormat:
    """The first registered format that recognises ``path``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt
    config = path / "config.json"
    if path.is_dir() and config.is_file():  # every directory layout starts from config.json: report why it failed
        read_json(config)
    listing = sorted(p.name for p in path.iterdir())[:20] if path.is_dir() else [path.name]
    known = "\n".join(f"  - {f.name}: {f.description}" for f in FORMATS)
    raise CheckpointError(
        f"no recognisable checkpoint at {str(path)!r} (found: {', '.join(listing) or 'nothing'}).\n"
        f"Supported layouts:\n{known}"
    )


def from_pretrained(path: str | Path) -> Any:
    """Load a backbone from a local checkpoint; the format is recognised from its files."""
    return detect_format(path).load(Path(path))
