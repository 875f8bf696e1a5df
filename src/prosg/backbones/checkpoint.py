"""Reading and writing weight files, shared by every family's loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prosg.errors import CheckpointError


def read_json(path: Path) -> dict[str, Any]:
    """A JSON config file, with a clear error when it is missing or corrupt."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing config file {str(path)!r}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{str(path)!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}), so the checkpoint "
            "cannot be read; fix the file or re-export the checkpoint"
        ) from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{str(path)!r} is not UTF-8 text; fix the file or re-export the checkpoint") from None


def load_weights(path: Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a torch file, loaded with ``weights_only=True``."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"missing weight file {str(path)!r}") from None
    except Exception as e:  # corrupt zip, truncated file, pickled code objects, ...
        raise CheckpointError(
            f"could not read weights from {str(path)!r}: {type(e).__name__}: {e}. The file is "
            "corrupt or not a plain tensor state dict (only weights_only=True loading is allowed)."
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a flat name -> tensor state dict")
    return sd


def find_weight_file(directory: Path, names: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")) -> Path:
    """The first weight file of ``names`` present in ``directory`` (sharded files unsupported)."""
    for name in names:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    raise CheckpointError(
        f"no weight file in {str(directory)!r}: expected one of {', '.join(names)}"
    )


def load_state_strict(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Copy ``state_dict`` into ``model``; any missing, unexpected or mis-shaped key is an error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatch:\n    " + "\n    ".join(mismatched[:10]))
    if missing:
        problems.append("missing keys: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else ""))
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not match its config:\n  " + "\n  ".join(problems)
            + "\nThe config (sizes, layers, vocab) must be the one the weights were saved with."
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state_dict[k].to(v.dtype))
