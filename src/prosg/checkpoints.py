"""Checkpoints written by ``prosg fit``: path checks and one-line errors for files that cannot be loaded.

Every reader (``prosg validate/test/fit --ckpt_path``, ``prosg generate --ckpt``) loads with
``weights_only=True``, so a checkpoint holding pickled code is refused, never run; these helpers turn
what torch raises then (or for a missing, truncated or foreign file) into a ``CheckpointError``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from prosg.errors import CheckpointError

# ckpt_path values Lightning resolves itself (not file names)
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
# what torch.load raises for a file it cannot read: unsafe pickle, truncated zip, wrong format, ...
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError)


def is_local_path(ckpt: str) -> bool:
    """Whether a ``ckpt_path`` value names a local file (not ``last``/``best``/``registry:...`` or a URL)."""
    return ckpt not in LIGHTNING_CKPT_NAMES and not ckpt.startswith("registry:") and "://" not in ckpt


def check_ckpt_path(ckpt: str, option: str = "--ckpt") -> Path:
    """``ckpt`` as a Path if it is a file; a CheckpointError naming the fix if it is missing or a directory."""
    path = Path(ckpt)
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*.ckpt"))[:5]
        hint = f"; found: {', '.join(found)}" if found else " (it holds no .ckpt file)"
        raise CheckpointError(f"{option} {ckpt!r} is a directory; pass a checkpoint file written by `prosg fit`{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt!r} ({option}) does not exist; pass a .ckpt file written by `prosg fit`")
    return path


def load_error(ckpt: str, e: BaseException) -> CheckpointError:
    """The CheckpointError for ``e``, raised while safely loading (or rebuilding a model from) ``ckpt``."""
    if isinstance(e, pickle.UnpicklingError):
        return CheckpointError(
            f"{ckpt!r} holds pickled objects other than tensors and plain data, which safe loading refuses "
            "(ProSG reads checkpoints only with weights_only=True, so no code in them can run); use a checkpoint "
            "written by `prosg fit`"
        )
    detail = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]  # the first sentence says what failed
    return CheckpointError(
        f"could not load {ckpt!r} ({type(e).__name__}: {detail}); it must be a complete checkpoint written by "
        "`prosg fit` (truncated or foreign files fail here)"
    )


def read_checkpoint(ckpt: str) -> dict[str, Any]:
    """The dict a ``prosg fit`` checkpoint holds, memory-mapped and read with ``weights_only=True``; a
    CheckpointError naming the fix for a missing, corrupt or foreign file."""
    import torch

    path = check_ckpt_path(ckpt)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except LOAD_ERRORS as e:
        raise load_error(ckpt, e) from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{ckpt!r} holds a {type(saved).__name__}, not a checkpoint dict; use one written by `prosg fit`")
    return saved
