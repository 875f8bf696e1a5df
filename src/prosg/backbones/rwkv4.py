"""RWKV-4, parameter-compatible with BlinkDL's v4 ``.pth`` and HF ``RwkvForCausalLM`` checkpoints.

Per block (BlinkDL RWKV-4 / HF ``modeling_rwkv``): time mix with token-shift interpolation
x*mix + prev*(1-mix) into key, value, sigmoid(receptance); the WKV-4 weighted average
(``kernels.wkv4``; decay exp(-exp(time_decay)), bonus time_first, both raw parameters exactly as
stored by BlinkDL and HF); ``output(r * wkv)``. Channel mix: sigmoid(receptance(x_r)) *
value(relu(key(x_k))^2). LayerNorm eps 1e-5 everywhere, ``ln0`` on the embeddings in block 0.

State per layer, each (B, C): (x entering time mix, aa, bb, pp, x entering channel mix), with
the WKV numerator aa e^pp and denominator bb e^pp (pp starts at -1e30).

HF differences handled on load: names (``rwkv.`` prefix, ``attention``/``feed_forward``,
``time_mix_key``, ``embeddings``, ``pre_ln``). HF's ``rescale_every`` halves the residual stream
and the matching output weights at inference only; that is exact up to LayerNorm eps, so
stored weights load unchanged (a model saved by HF *after* an eval-mode forward holds the
rescaled weights and is not supported).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prosg.backbones.base import Backbone, BackboneOutput, State
from prosg.backbones.blinkdl import detect_pth, pth_target, read_pth, require, token_shift
from prosg.backbones.checkpoint import find_weight_file, load_state_strict, load_weights, read_json
from prosg.backbones.kernels.wkv4 import wkv4_chunked
from prosg.backbones.kernels.wkv_ref import WKV4_EMPTY_PP, wkv4_step
from prosg.backbones.registry import register_backbone, register_format
from prosg.errors import CheckpointError, ConfigError


class TimeMix(nn.Module):
    """RWKV-4 time mixing; parameter names and shapes as BlinkDL's v4 ``.pth``."""

    def __init__(self, d_model: int, layer_id: int, n_layer: int) -> None:
        super().__init__()
        C = d_model
        ratio_0_to_1 = layer_id / max(1, n_layer - 1)
        ratio_1_to_almost0 = 1.0 - layer_id / n_layer
        h = torch.arange(C, dtype=torch.float32)
        ddd = (h / C).view(1, 1, C)
        self.time_decay = nn.Parameter(-5 + 8 * (h / max(1, C - 1)) ** (0.7 + 1.3 * ratio_0_to_1))
        zigzag = ((h + 1) % 3 - 1) * 0.5
        self.time_first = nn.Parameter(torch.ones(C) * math.log(0.3) + zigzag)
        self.time_mix_k = nn.Parameter(ddd.pow(ratio_1_to_almost0))
        self.time_mix_v = nn.Parameter(ddd.pow(ratio_1_to_almost0) + 0.3 * ratio_0_to_1)
        self.time_mix_r = nn.Parameter(ddd.pow(0.5 * ratio_1_to_almost0))
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)

    def forward(
        self, x: Tensor, x_prev: Tensor, wkv_state: tuple[Tensor, Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, tuple]:
        """x (B, L, C) -> (out (B, L, C), last x (B, C), (aa, bb, pp))."""
        xx = token_shift(x, x_prev)
        k = self.key(x * self.time_mix_k + xx * (1 - self.time_mix_k))
        v = self.value(x * self.time_mix_v + xx * (1 - self.time_mix_v))
        r = torch.sigmoid(self.receptance(x * self.time_mix_r + xx * (1 - self.time_mix_r)))
        ct = torch.promote_types(x.dtype, torch.float32)  # exp/max in fp32 at least, as HF and BlinkDL
        td, tf, k32, v32 = self.time_decay.to(ct), self.time_first.to(ct), k.to(ct), v.to(ct)
        if x.shape[1] == 1:  # generation: one recurrent step
            y, wkv_state = wkv4_step(td, tf, k32[:, 0], v32[:, 0], wkv_state)
            y = y.unsqueeze(1)
        else:
            y, wkv_state = wkv4_chunked(td, tf, k32, v32, wkv_state)
        return self.output(r * y.to(x.dtype)), x[:, -1], wkv_state


class ChannelMix(nn.Module):
    """RWKV-4 channel mixing: sigmoid(receptance(x_r)) * value(relu(key(x_k))^2)."""

    def __init__(self, d_model: int, d_ffn: int, layer_id: int, n_layer: int) -> None:
        super().__init__()
        ddd = (torch.arange(d_model, dtype=torch.float32) / d_model).view(1, 1, d_model)
        ratio_1_to_almost0 = 1.0 - layer_id / n_layer
        self.time_mix_k = nn.Parameter(ddd.pow(ratio_1_to_almost0))
        self.time_mix_r = nn.Parameter(ddd.pow(ratio_1_to_almost0))
        self.key = nn.Linear(d_model, d_ffn, bias=False)
        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_ffn, d_model, bias=False)

    def forward(self, x: Tensor, x_prev: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, L, C) -> (out (B, L, C), last x (B, C))."""
        xx = token_shift(x, x_prev)
        k = torch.relu(self.key(x * self.time_mix_k + xx * (1 - self.time_mix_k))) ** 2
        r = torch.sigmoid(self.receptance(x * self.time_mix_r + xx * (1 - self.time_mix_r)))
        return r * self.value(k), x[:, -1]


class Block(nn.Module):
    """One RWKV-4 residual block; the first argument is the residual stream (B, L, C)."""

    def __init__(self, d_model: int, d_ffn: int, layer_id: int, n_layer: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(d_model)
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.att = TimeMix(d_model, layer_id, n_layer)
        self.ffn = ChannelMix(d_model, d_ffn, layer_id, n_layer)

    def forward(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """(x, (att x, aa, bb, pp, ffn x)) -> (x, next state)."""
        if self.layer_id == 0:
            x = self.ln0(x)
        att, att_x, (aa, bb, pp) = self.att(self.ln1(x), state[0], tuple(state[1:4]))
        x = x + att
        ffn, ffn_x = self.ffn(self.ln2(x), state[4])
        return x + ffn, (att_x, aa, bb, pp, ffn_x)


@register_backbone("rwkv4")
class RWKV4(Backbone):
    """RWKV-4 language model; loads BlinkDL v4 .pth and HF ``RwkvForCausalLM`` checkpoints."""

    def __init__(self, vocab_size: int, d_model: int, n_layer: int, d_ffn: int | None = None,
                 use_kernels: bool | str = "auto") -> None:
        if use_kernels not in ("auto", True, False):
            raise ConfigError(f"rwkv4: use_kernels must be 'auto', true or false, got {use_kernels!r}")
        if use_kernels is True:
            raise ConfigError(
                "rwkv4: there is no optional GPU kernel for RWKV-4 (HF's needs a download at run time); "
                "its chunked PyTorch WKV already runs on CPU and GPU. Set use_kernels='auto' or false."
            )
        d_ffn = d_ffn or 4 * d_model
        super().__init__(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, d_ffn=d_ffn, use_kernels=use_kernels)
        self.emb = nn.Embedding(vocab_size, d_model)
        # filed under _modules["blocks"] (BlinkDL's key prefix); the ``blocks`` property reads it
        self.blocks = nn.ModuleList(Block(d_model, d_ffn, i, n_layer) for i in range(n_layer))
        self.ln_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """BlinkDL v4's init: tiny embeddings, orthogonal matrices, zeros where BlinkDL zeroes."""
        C, V = self.d_model, self.vocab_size
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        nn.init.orthogonal_(self.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
        for block in self.blocks:
            for lin in (block.att.value, block.ffn.key):
                rows, cols = lin.weight.shape
                nn.init.orthogonal_(lin.weight, gain=math.sqrt(rows / cols) if rows > cols else 1.0)
            for lin in (block.att.key, block.att.receptance, block.att.output, block.ffn.value, block.ffn.receptance):
                nn.init.zeros_(lin.weight)

    @property
    def blocks(self) -> nn.ModuleList:
        return self._modules["blocks"]

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.emb(input_ids)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        device, wt, ct = self.state_placement(device)
        shape = (batch_size, self.d_model)
        return tuple(
            (
                torch.zeros(shape, device=device, dtype=wt),
                torch.zeros(shape, device=device, dtype=ct),
                torch.zeros(shape, device=device, dtype=ct),
                torch.full(shape, WKV4_EMPTY_PP, device=device, dtype=ct),
                torch.zeros(shape, device=device, dtype=wt),
            )
            for _ in range(self.config["n_layer"])
        )

    def forward_embeds(self, x: Tensor, state: State | None = None) -> BackboneOutput:
        x, state = self.run_blocks(x, state, per_layer=5)
        return BackboneOutput(self.head(self.ln_out(x)), state)

    def save_pretrained(self, directory: str) -> None:
        """Write a BlinkDL v4 ``.pth`` (``directory`` ending in .pth, else ``directory/model.pth``)."""
        torch.save({k: v.detach().clone().contiguous() for k, v in self.state_dict().items()}, pth_target(directory))


# -- checkpoints ------------------------------------------------------------------------------------

def rwkv4_config(sd: dict[str, Tensor], file: Path) -> dict[str, Any]:
    """RWKV4 constructor arguments inferred from the tensor shapes of a v4 state dict."""
    emb = require(sd, "emb.weight", file, "v4")
    return dict(
        vocab_size=emb.shape[0],
        d_model=emb.shape[1],
        n_layer=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
        d_ffn=require(sd, "blocks.0.ffn.key.weight", file, "v4").shape[0],
    )


def load_rwkv4_pth(path: Path) -> RWKV4:
    """Build an RWKV4 from a BlinkDL v4 .pth (bf16/fp16 weights are loaded into fp32)."""
    file, sd = read_pth(path)
    model = RWKV4(**rwkv4_config(sd, file))
    load_state_strict(model, sd, str(file))
    return model


# HF RwkvForCausalLM name <-> BlinkDL name (transformers' convert_rwkv_checkpoint_to_hf.py, reversed)
_HF_TO_BLINKDL = [
    (r"^rwkv\.embeddings\.", "emb."),
    (r"^rwkv\.blocks\.0\.pre_ln\.", "blocks.0.ln0."),
    (r"^rwkv\.blocks\.(\d+)\.attention\.", r"blocks.\1.att."),
    (r"^rwkv\.blocks\.(\d+)\.feed_forward\.", r"blocks.\1.ffn."),
    (r"^rwkv\.", ""),
    (r"\.time_mix_key$", ".time_mix_k"),
    (r"\.time_mix_value$", ".time_mix_v"),
    (r"\.time_mix_receptance$", ".time_mix_r"),
]
_BLINKDL_TO_HF = [
    (r"^emb\.", "rwkv.embeddings."),
    (r"^blocks\.0\.ln0\.", "rwkv.blocks.0.pre_ln."),
    (r"^blocks\.(\d+)\.att\.", r"rwkv.blocks.\1.attention."),
    (r"^blocks\.(\d+)\.ffn\.", r"rwkv.blocks.\1.feed_forward."),
    (r"^(blocks|ln_out)\.", r"rwkv.\1."),
    (r"\.time_mix_k$", ".time_mix_key"),
    (r"\.time_mix_v$", ".time_mix_value"),
    (r"\.time_mix_r$", ".time_mix_receptance"),
]


def _rename(name: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def hf_to_blinkdl(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF ``RwkvForCausalLM`` state dict -> BlinkDL v4 names (a tied head is filled from the embeddings)."""
    out = {_rename(k, _HF_TO_BLINKDL): v for k, v in sd.items()}
    if "head.weight" not in out and "emb.weight" in out:
        out["head.weight"] = out["emb.weight"]
    return out


def blinkdl_to_hf(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """BlinkDL v4 state dict -> HF ``RwkvForCausalLM`` names."""
    return {_rename(k, _BLINKDL_TO_HF): v for k, v in sd.items()}


def hf_config(model: RWKV4) -> dict[str, Any]:
    """``transformers.RwkvConfig`` arguments describing ``model`` (no inference-time rescaling)."""
    c = model.config
    return dict(vocab_size=c["vocab_size"], hidden_size=c["d_model"], num_hidden_layers=c["n_layer"],
                attention_hidden_size=c["d_model"], intermediate_size=c["d_ffn"], layer_norm_epsilon=1e-5,
                rescale_every=0, tie_word_embeddings=False)


def _detect_hf(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "rwkv"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def load_hf_rwkv4(path: Path) -> RWKV4:
    """Build an RWKV4 from an HF ``RwkvForCausalLM`` directory (config.json + weights)."""
    cfg = read_json(Path(path) / "config.json")
    C = cfg.get("hidden_size")
    if C is None or "num_hidden_layers" not in cfg or "vocab_size" not in cfg:
        raise CheckpointError(f"{str(path)!r}: config.json lacks hidden_size / num_hidden_layers / vocab_size")
    if (cfg.get("attention_hidden_size") or C) != C:
        raise CheckpointError(
            f"{str(path)!r}: attention_hidden_size={cfg['attention_hidden_size']} != hidden_size={C} is not "
            "supported (every released RWKV-4 has them equal)."
        )
    if abs(cfg.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise CheckpointError(
            f"{str(path)!r}: layer_norm_epsilon={cfg['layer_norm_epsilon']} is not supported (RWKV-4 uses 1e-5)"
        )
    weights = find_weight_file(Path(path))
    sd = hf_to_blinkdl(load_weights(weights))
    model = RWKV4(vocab_size=cfg["vocab_size"], d_model=C, n_layer=cfg["num_hidden_layers"],
                  d_ffn=cfg.get("intermediate_size") or 4 * C)
    load_state_strict(model, sd, str(weights))
    return model


register_format(
    "rwkv4-pth",
    lambda p: detect_pth(p, "v4"),
    load_rwkv4_pth,
    "BlinkDL RWKV-4 .pth: a .pth file, or a directory holding exactly one",
)
register_format(
    "rwkv4-hf",
    _detect_hf,
    load_hf_rwkv4,
    "HF RwkvForCausalLM directory: config.json (model_type 'rwkv') + model.safetensors or pytorch_model.bin",
)
