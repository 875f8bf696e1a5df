"""ProSG's own checkpoint layout for any family: ``config.json`` naming the family + weights.

Families with an official layout (mamba_ssm, BlinkDL .pth) also save in that; this one is the
fallback that round-trips every backbone, the gpt reference included.
"""

from __future__ import annotations

import json
from pathlib import Path

from prosg.backbones.checkpoint import find_weight_file, load_state_strict, load_weights, read_json
from prosg.backbones.registry import BACKBONES, build, register_format
from prosg.errors import CheckpointError

FAMILY_KEY = "prosg_family"


WEIGHTS = "model.safetensors"  # written; pytorch_model.bin (what earlier versions wrote) is still read


def save_native(model, directory: str | Path) -> Path:
    """Write ``config.json`` ({prosg_family, **config}) and ``model.safetensors`` into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({FAMILY_KEY: model.family, **model.config}, indent=2))
    # safetensors stores no shared memory: tied weights are saved as separate (contiguous) copies
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(directory / WEIGHTS),
              metadata={"format": "pt", FAMILY_KEY: model.family})
    return directory


def _detect(path: Path) -> bool:
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        return FAMILY_KEY in json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_native(path: Path):
    """Rebuild the family named in ``config.json`` and load its weights strictly."""
    config = read_json(path / "config.json")
    family = config.pop(FAMILY_KEY)
    if family not in BACKBONES:
        raise CheckpointError(
            f"{str(path)!r} holds a {family!r} backbone, which this ProSG does not know "
            f"(known: {', '.join(sorted(BACKBONES))}); upgrade ProSG or re-export the checkpoint."
        )
    try:
        model = build(family, **config)
    except TypeError as e:
        raise CheckpointError(f"config.json in {str(path)!r} does not fit the {family} backbone: {e}") from None
    weights = find_weight_file(path, (WEIGHTS, "pytorch_model.bin"))
    load_state_strict(model, load_weights(weights), str(weights))
    return model


register_format("prosg", _detect, load_native,
                "ProSG native: config.json with 'prosg_family' + model.safetensors (or pytorch_model.bin)")
