"""BlinkDL RWKV helpers shared by RWKV-4 and RWKV-7: token shift and the ``.pth`` checkpoint format.

A BlinkDL checkpoint is a flat ``torch.save`` state dict, one ``.pth`` file (or a directory holding
exactly one); the generation (x070, v4, v5/v6) is told apart by its keys, as the ``rwkv`` package does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from prosg.backbones.checkpoint import load_weights
from prosg.errors import CheckpointError

PTH_NAME = "model.pth"


def token_shift(x: Tensor, prev: Tensor) -> Tensor:
    """x (B, L, C) and the token before it, prev (B, C) -> x shifted one step right: (B, L, C)."""
    return torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1)


def pth_target(path: str | Path) -> Path:
    """Where ``save_pretrained`` writes: the path itself if it ends in .pth, else path/model.pth."""
    path = Path(path)
    if path.suffix != ".pth":
        path.mkdir(parents=True, exist_ok=True)
        path = path / PTH_NAME
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def find_pth(path: Path) -> Path | None:
    """The BlinkDL checkpoint at ``path``: a .pth file, or the only .pth in a directory."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".pth" else None
    if not path.is_dir():
        return None
    files = sorted(path.glob("*.pth"))
    if len(files) > 1:
        raise CheckpointError(
            f"{str(path)!r} holds {len(files)} .pth files ({', '.join(f.name for f in files[:5])}); "
            "pass the path of the one to load."
        )
    return files[0] if files else None


def pth_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a .pth without reading its data when the file allows memory-mapping."""
    try:
        sd = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) serialisation cannot be mmapped; load it, or report it corrupt
        sd = load_weights(file)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # as load_weights unwraps it
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        return {}
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, Tensor)}


def pth_version(keys: set[str] | dict) -> str | None:
    """BlinkDL RWKV generation from state-dict keys, as the ``rwkv`` package tells them apart."""
    if {"blocks.0.att.x_r", "blocks.0.att.r_k", "blocks.0.att.a0"} & set(keys):
        return "x070"
    if any("time_maa" in k or "time_faaaa" in k or ".att.ln_x." in k for k in keys):
        return "v5/v6"
    if "blocks.0.att.time_mix_k" in keys:
        return "v4"
    return None


def detect_pth(path: Path, version: str) -> bool:
    """Whether ``path`` is a BlinkDL .pth of ``version``; v5/v6 files are refused with a clear error."""
    file = find_pth(path)
    if file is None:
        return False
    found = pth_version(pth_shapes(file))
    if found == "v5/v6":
        raise CheckpointError(
            f"{str(file)!r}: RWKV v5/v6 .pth is not supported; supported: x070, v4. "
            "Use an RWKV-7 (x070) or RWKV-4 checkpoint."
        )
    return found == version


def read_pth(path: Path) -> tuple[Path, dict[str, Tensor]]:
    """The .pth file at ``path`` and its tensors (loaded with weights_only=True)."""
    file = find_pth(path)
    if file is None:
        raise CheckpointError(f"no .pth checkpoint at {str(path)!r}")
    return file, load_weights(file)


def require(sd: dict[str, Tensor], key: str, file: Path, version: str) -> Tensor:
    """sd[key], or a CheckpointError saying the file is not a complete checkpoint."""
    if key not in sd:
        raise CheckpointError(f"{str(file)!r} is not a complete RWKV {version} checkpoint: missing {key!r}")
    return sd[key]
