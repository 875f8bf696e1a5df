"""Constructed prompt-forgetting tasks, tokenizers and DataModules.

The DataModules are configured in YAML as ``class_path: prosg.data.<Name>``:
``ConstructedDataModule`` (the tasks of ``prosg.data.tasks``), ``JSONLDataModule`` (user data),
``StoredDataModule`` (a set written by ``prosg data build``). They are imported on first use, so
``prosg.data.tasks``, ``tokenizers`` and ``store`` stay free of Lightning (``prosg data -h`` is quick).
"""

from __future__ import annotations

import importlib
from typing import Any

# exported name -> module under prosg.data that defines it
_DATAMODULES = {"ConstructedDataModule": "constructed", "JSONLDataModule": "jsonl", "StoredDataModule": "stored"}

__all__ = list(_DATAMODULES)


def __getattr__(name: str) -> Any:
    if name in _DATAMODULES:
        return getattr(importlib.import_module(f"prosg.data.{_DATAMODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
