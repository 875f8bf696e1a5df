"""Backbone families behind one interface; ``build`` by name, ``from_pretrained`` by path."""

from prosg.backbones.base import Backbone, BackboneOutput
from prosg.backbones.registry import BACKBONES, FORMATS, build, detect_format, from_pretrained
from prosg.backbones import native  # noqa: F401  (registers the native format)
from prosg.backbones.gpt import GPT

# DEV-ONLY guard while families are being written in parallel; replaced by plain imports.
import importlib as _importlib

for _name in ("mamba", "rwkv7", "rwkv4"):
    try:
        _importlib.import_module(f"prosg.backbones.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"prosg.backbones.{_name}":
            raise

__all__ = ["Backbone", "BackboneOutput", "BACKBONES", "FORMATS", "build", "detect_format", "from_pretrained", "GPT"]
