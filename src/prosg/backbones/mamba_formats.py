"""Official Mamba checkpoint layouts: mamba_ssm ``save_pretrained`` directories and HF ``MambaForCausalLM``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prosg.backbones.checkpoint import (
    find_weight_file,
    load_state_strict,
    load_weights,
    read_json,
)
from prosg.backbones.mamba import SSM_KEYS, Mamba
from prosg.backbones.registry import register_format
from prosg.errors import CheckpointError, ConfigError

_SSM_INIT_ONLY = ("dt_init", "dt_scale", "use_fast_path", "layer_idx", "device", "dtype")


def _peek_config(path: Path) -> dict[str, Any] | None:
    """config.json of a directory, or None when absent/unreadable (detection must not raise)."""
    f = Path(path) / "config.json"
    if not f.is_file():
        return None
    try:
        cfg = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _detect_mamba_ssm(path: Path) -> bool:
    cfg = _peek_config(path)
    # ssm_cfg is what sets mamba_ssm configs apart (RWKV/HF have model_type, native has prosg_family).
    return cfg is not None and "ssm_cfg" in cfg and "d_model" in cfg and "model_type" not in cfg and "prosg_family" not in cfg


def _detect_hf_mamba(path: Path) -> bool:
    cfg = _peek_config(path)
    return cfg is not None and cfg.get("model_type") == "mamba"


def _need(cfg: dict[str, Any], key: str, source: Path) -> Any:
    if key not in cfg:
        raise CheckpointError(f"{str(source / 'config.json')!r} has no {key!r}; the file is incomplete, re-export it")
    return cfg[key]


def _build(kwargs: dict[str, Any], source: Path) -> Mamba:
    try:
        return Mamba(**kwargs)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"config.json in {str(source)!r} does not describe a valid Mamba: {e}") from None


def _load_into(model: Mamba, sd: dict[str, Tensor], source: str) -> Mamba:
    """Strict load; a tied checkpoint may omit lm_head.weight (HF drops it) or repeat the embedding."""
    if model.tie_embeddings and "backbone.embedding.weight" in sd:
        emb = sd["backbone.embedding.weight"]
        head = sd.get("lm_head.weight")
        if head is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
            raise CheckpointError(
                f"checkpoint {source}: lm_head.weight differs from backbone.embedding.weight but the config "
                "ties them; set tie_embeddings (tie_word_embeddings for HF) to false in config.json"
            )
        sd["lm_head.weight"] = emb
    load_state_strict(model, sd, source)
    return model


def load_mamba_ssm(path: Path) -> Mamba:
    """A mamba_ssm ``save_pretrained`` directory (config.json + pytorch_model.bin)."""
    path = Path(path)
    cfg = read_json(path / "config.json")
    ssm = dict(cfg.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise CheckpointError(f"{str(path)!r} is a {layer} checkpoint; ProSG's mamba backbone is Mamba-1 only")
    if cfg.get("d_intermediate", 0) or cfg.get("attn_layer_idx"):
        raise CheckpointError(
            f"{str(path)!r} has MLP (d_intermediate) or attention (attn_layer_idx) layers, which ProSG's "
            "pure Mamba-1 backbone does not have; use a plain Mamba checkpoint"
        )
    for k in _SSM_INIT_ONLY:
        ssm.pop(k, None)
    unknown = sorted(set(ssm) - set(SSM_KEYS))
    if unknown:
        raise CheckpointError(f"{str(path)!r}: unsupported ssm_cfg keys {unknown}; supported: {list(SSM_KEYS)}")
    kwargs = dict(
        vocab_size=_need(cfg, "vocab_size", path), d_model=_need(cfg, "d_model", path),
        n_layer=_need(cfg, "n_layer", path), rms_norm=cfg.get("rms_norm", True),
        residual_in_fp32=cfg.get("residual_in_fp32", True), norm_epsilon=cfg.get("norm_epsilon", 1e-5),
        pad_vocab_size_multiple=cfg.get("pad_vocab_size_multiple", 8),
        tie_embeddings=cfg.get("tie_embeddings", True), **ssm,
    )
    model = _build(kwargs, path)
    weights = find_weight_file(path, ("pytorch_model.bin", "model.safetensors"))
    return _load_into(model, load_weights(weights), repr(str(weights)))


def load_hf_mamba(path: Path) -> Mamba:
    """A transformers ``MambaForCausalLM`` directory (config.json with model_type 'mamba')."""
    path = Path(path)
    cfg = read_json(path / "config.json")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise CheckpointError(f"{str(path)!r}: hidden_act {cfg['hidden_act']!r} is not supported (Mamba uses silu)")
    hidden = _need(cfg, "hidden_size", path)
    expand = cfg.get("expand", 2)
    inter = cfg.get("intermediate_size")
    if inter is not None and inter != int(expand * hidden):
        expand = inter // hidden if inter % hidden == 0 else inter / hidden
        if int(expand * hidden) != inter:
            raise CheckpointError(f"{str(path)!r}: intermediate_size {inter} is not expand * hidden_size")
    kwargs = dict(
        vocab_size=_need(cfg, "vocab_size", path), d_model=hidden, n_layer=_need(cfg, "num_hidden_layers", path),
        d_state=cfg.get("state_size", 16), d_conv=cfg.get("conv_kernel", 4), expand=expand,
        dt_rank=cfg.get("time_step_rank", "auto"), dt_min=cfg.get("time_step_min", 0.001),
        dt_max=cfg.get("time_step_max", 0.1), dt_init_floor=cfg.get("time_step_floor", 1e-4),
        conv_bias=cfg.get("use_conv_bias", True), bias=cfg.get("use_bias", False), rms_norm=True,
        residual_in_fp32=cfg.get("residual_in_fp32", True), norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
        pad_vocab_size_multiple=1,  # HF stores the vocab unpadded
        tie_embeddings=cfg.get("tie_word_embeddings", True),
    )
    model = _build(kwargs, path)
    weights = find_weight_file(path)
    sd = load_weights(weights)
    if not any(k.startswith("backbone.") for k in sd):  # a bare MambaModel, saved without the LM wrapper
        sd = {k if k.startswith("lm_head.") else "backbone." + k: v for k, v in sd.items()}
    sd = {k.replace("backbone.embeddings.", "backbone.embedding.", 1): v for k, v in sd.items()}
    return _load_into(model, sd, repr(str(weights)))


register_format(
    "mamba_ssm", _detect_mamba_ssm, load_mamba_ssm,
    "mamba_ssm: directory with config.json (d_model, n_layer, vocab_size, ssm_cfg) + pytorch_model.bin",
)
register_format(
    "hf-mamba", _detect_hf_mamba, load_hf_mamba,
    "hf-mamba: transformers MambaForCausalLM directory (config.json model_type 'mamba' + model.safetensors or pytorch_model.bin)",
)
