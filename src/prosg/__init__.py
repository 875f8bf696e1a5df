"""ProSG: prompt synthetic gradients against prompt forgetting in recurrent language models.

The Python API, imported on first use (``import prosg`` itself loads neither torch nor Lightning)::

    from prosg import ProSGModule, ConstructedDataModule, SGHead, build, from_pretrained, generate
    from prosg import ProSG, Plain, JRT, SoftPrompt, GlobalPromptCell, Oracle, Method  # the methods (prosg.methods)
    from prosg import lightning_main, fit_and_test                        # `prosg fit/validate/test` in Python
    from prosg import JSONLDataModule, StoredDataModule

``lightning_main(["fit", "--config", "conf/experiment/sg.yaml"])`` runs exactly what ``prosg fit`` runs
and returns the LightningCLI (``cli.model``, ``cli.trainer``, ``cli.datamodule``).
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "ProSGModule": "prosg.module",
    "SGHead": "prosg.sg",
    "build": "prosg.backbones",
    "from_pretrained": "prosg.backbones",
    "generate": "prosg.generate",
    "ConstructedDataModule": "prosg.data",
    "JSONLDataModule": "prosg.data",
    "StoredDataModule": "prosg.data",
    "Method": "prosg.methods",
    "Plain": "prosg.methods",
    "ProSG": "prosg.methods",
    "Oracle": "prosg.methods",
    "JRT": "prosg.methods",
    "SoftPrompt": "prosg.methods",
    "GlobalPromptCell": "prosg.methods",
    "lightning_main": "prosg.train",
    "fit_and_test": "prosg.train",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """``prosg.generate`` stays the function: importing the submodule of the same name must not replace it."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return  # the import system binding a submodule (prosg.generate); it stays in sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
