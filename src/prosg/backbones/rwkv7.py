"""RWKV-7 "Goose" (x070), parameter-for-parameter compatible with BlinkDL's ``.pth`` checkpoints.

Follows BlinkDL/RWKV-LM ``RWKV-v7`` (``rwkv_v7_demo.py`` GPT mode, ``rwkv_v7_demo_rnn.py`` RNN
mode, ``train_temp`` init). Per block: token-shifted mixes x_{r,w,k,v,a,g}; decay
w = exp(-e^{-1/2} sigmoid(w0 + tanh(x_w W1) W2)) (BlinkDL's soft clamp of the log decay to
[-e^{-1/2}, 0)); in-context learning rate a = sigmoid(a0 + x_a A1 A2); value residual towards
layer 0's v; output gate g = sigmoid(x_g G1) G2; normalised removal key kk; then the WKV-7
delta rule (``kernels.wkv7``), GroupNorm ``ln_x`` (eps 64e-5), the r.k "bonus" term, ``output``.
Channel mix: relu(key(x_k))^2 -> value.

State per layer: (x of the last token entering time mix (B, C), WKV matrix (B, H, N, N) laid
out [value, key] like BlinkDL, x of the last token entering channel mix (B, C)). layer 0's v
("v_first") is recomputed per token and handed from block to block inside one call.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prosg.backbones.base import Backbone, BackboneOutput, State, check_state
from prosg.backbones.blinkdl import detect_pth, pth_target, read_pth, require, token_shift
from prosg.backbones.checkpoint import load_state_strict
from prosg.backbones.kernels.wkv7 import fla_kernel, wkv7
from prosg.backbones.kernels.wkv_ref import wkv7_step
from prosg.backbones.registry import register_backbone, register_format
from prosg.errors import ConfigError

LN_X_EPS = 64e-5  # BlinkDL: 1e-5 * head_size_divisor**2 with divisor 8, fixed for every x070 model
LOG_DECAY_SCALE = math.exp(-0.5)  # log w = -e^{-1/2} sigmoid(.)  (BlinkDL's 0.606531)
# Layer 0 takes v_first from itself, so BlinkDL's trainer creates v0/v1/v2 there but never uses them.
UNUSED_LAYER0 = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def lora_dim(d_model: int, factor: float) -> int:
    """BlinkDL's suggested LoRA width: factor * sqrt(C), rounded to a multiple of 32, at least 32."""
    return max(32, int(round(factor * d_model**0.5 / 32) * 32))


class TimeMix(nn.Module):
    """RWKV-7 time mixing (BlinkDL ``RWKV_Tmix_x070``); parameter names and shapes as in the .pth."""

    def __init__(self, d_model: int, head_size: int, layer_id: int, n_layer: int, d_decay: int, d_aaa: int,
                 d_mv: int, d_gate: int, use_kernels: bool | str = "auto") -> None:
        super().__init__()
        C, N = d_model, head_size
        H = C // N
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        self.use_kernels = use_kernels
        # Replaces the WKV kernel (same contract as kernels.wkv7.wkv7_chunked); benchmarks and
        # tests set it to the per-token reference loop.
        self.wkv_fn: Callable | None = None

        ratio_0_to_1 = layer_id / max(1, n_layer - 1)
        ratio_1_to_almost0 = 1.0 - layer_id / n_layer
        ddd = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
        self.x_r = nn.Parameter(1.0 - ddd.pow(0.2 * ratio_1_to_almost0))
        self.x_w = nn.Parameter(1.0 - ddd.pow(0.9 * ratio_1_to_almost0))
        self.x_k = nn.Parameter(1.0 - ddd.pow(0.7 * ratio_1_to_almost0))
        self.x_v = nn.Parameter(1.0 - ddd.pow(0.7 * ratio_1_to_almost0))
        self.x_a = nn.Parameter(1.0 - ddd.pow(0.9 * ratio_1_to_almost0))
        self.x_g = nn.Parameter(1.0 - ddd.pow(0.2 * ratio_1_to_almost0))

        n = torch.arange(C, dtype=torch.float32)
        linear = n / max(1, C - 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / max((N - 1) / 2, 1e-9)
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / max(1, C - 1)) ** (1 + 1 * ratio_0_to_1**0.3)

        self.w0 = nn.Parameter((www + 0.5 + zigzag * 2.5).view(1, 1, C))
        self.w1 = nn.Parameter(torch.zeros(C, d_decay))
        self.w2 = nn.Parameter(_ortho(torch.zeros(d_decay, C), 0.1))
        self.a0 = nn.Parameter((torch.zeros(C) - 0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
        self.a1 = nn.Parameter(torch.zeros(C, d_aaa))
        self.a2 = nn.Parameter(_ortho(torch.zeros(d_aaa, C), 0.1))
        if layer_id > 0:  # value residual: layer 0 *is* v_first
            self.v0 = nn.Parameter((torch.zeros(C) + 0.73 - linear * 0.4).view(1, 1, C))
            self.v1 = nn.Parameter(torch.zeros(C, d_mv))
            self.v2 = nn.Parameter(_ortho(torch.zeros(d_mv, C), 0.1))
        self.g1 = nn.Parameter(torch.zeros(C, d_gate))
        self.g2 = nn.Parameter(_ortho(torch.zeros(d_gate, C), 0.1))
        self.k_k = nn.Parameter((torch.zeros(C) + 0.71 - linear * 0.1).view(1, 1, C))
        self.k_a = nn.Parameter(torch.full((1, 1, C), 1.02))
        self.r_k = nn.Parameter(torch.full((H, N), -0.04))

        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)

    def forward(
        self, x: Tensor, v_first: Tensor | None, x_prev: Tensor, wkv_state: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (B, L, C) -> (out (B, L, C), v_first (B, L, C), last x (B, C), WKV state (B, H, N, N))."""
        B, L, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, x_prev) - x
        xr, xw, xk, xv, xa, xg = (x + xx * m for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

        r = self.receptance(xr)
        w = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, L, H, N), dim=-1, p=2.0).view(B, L, C)
        k = k * (1 + (a - 1) * self.k_a)

        # the recurrence runs in (at least) fp32, as BlinkDL's kernels do
        ct = torch.promote_types(x.dtype, torch.float32)
        log_w = -LOG_DECAY_SCALE * torch.sigmoid(w.to(ct))
        heads = [t.to(ct).view(B, L, H, N) for t in (r, log_w, k, v, -kk, kk * a)]
        if self.wkv_fn is not None:
            y, wkv_state = self.wkv_fn(*heads, wkv_state)
        elif L == 1:  # generation: one recurrent step is cheaper than any parallel form
            y, wkv_state = wkv7_step(*(t[:, 0] for t in heads), wkv_state)
            y = y.unsqueeze(1)
        else:
            y, wkv_state = wkv7(*heads, wkv_state, use_kernels=self.use_kernels)
        y = self.ln_x(y.reshape(B * L, C).to(x.dtype)).view(B, L, C)
        bonus = (r.view(B, L, H, N) * k.view(B, L, H, N) * self.r_k).sum(-1, keepdim=True) * v.view(B, L, H, N)
        y = y + bonus.view(B, L, C)
        return self.output(y * g), v_first, x[:, -1], wkv_state


class ChannelMix(nn.Module):
    """RWKV-7 channel mixing (BlinkDL ``RWKV_CMix_x070``): relu(key(x_k))^2 -> value."""

    def __init__(self, d_model: int, d_ffn: int, layer_id: int, n_layer: int) -> None:
        super().__init__()
        ddd = (torch.arange(d_model, dtype=torch.float32) / d_model).view(1, 1, d_model)
        self.x_k = nn.Parameter(1.0 - ddd.pow((1.0 - layer_id / n_layer) ** 4))
        self.key = nn.Linear(d_model, d_ffn, bias=False)
        self.value = nn.Linear(d_ffn, d_model, bias=False)

    def forward(self, x: Tensor, x_prev: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, L, C) -> (out (B, L, C), last x (B, C))."""
        k = x + (token_shift(x, x_prev) - x) * self.x_k
        return self.value(torch.relu(self.key(k)) ** 2), x[:, -1]


class Block(nn.Module):
    """One RWKV-7 residual block; the first argument is the residual stream (B, L, C)."""

    def __init__(self, cfg: dict[str, Any], layer_id: int) -> None:
        super().__init__()
        C = cfg["d_model"]
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(C, cfg["head_size"], layer_id, cfg["n_layer"], cfg["d_decay_lora"], cfg["d_aaa_lora"],
                           cfg["d_mv_lora"], cfg["d_gate_lora"], cfg["use_kernels"])
        self.ffn = ChannelMix(C, cfg["d_ffn"], layer_id, cfg["n_layer"])

    def forward(
        self, x: Tensor, v_first: Tensor | None, state: tuple[Tensor, Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, tuple]:
        """(x, v_first, (att x, WKV, ffn x)) -> (x, v_first, next state)."""
        if self.layer_id == 0:
            x = self.ln0(x)
        att, v_first, att_x, wkv_state = self.att(self.ln1(x), v_first, state[0], state[1])
        x = x + att
        ffn, ffn_x = self.ffn(self.ln2(x), state[2])
        return x + ffn, v_first, (att_x, wkv_state, ffn_x)


@register_backbone("rwkv7")
class RWKV7(Backbone):
    """RWKV-7 "Goose" (x070) language model; loads BlinkDL .pth checkpoints directly."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layer: int,
        head_size: int = 64,
        d_ffn: int | None = None,
        d_decay_lora: int | None = None,
        d_aaa_lora: int | None = None,
        d_mv_lora: int | None = None,
        d_gate_lora: int | None = None,
        use_kernels: bool | str = "auto",
    ) -> None:
        if d_model % head_size:
            raise ConfigError(
                f"rwkv7: d_model={d_model} must be a multiple of head_size={head_size}; BlinkDL models use "
                "head_size=64 (pick e.g. d_model=256 with head_size=64, or a smaller head_size for tiny models)."
            )
        if use_kernels not in ("auto", True, False):
            raise ConfigError(f"rwkv7: use_kernels must be 'auto', true or false, got {use_kernels!r}")
        if use_kernels is True and fla_kernel() is None:
            raise ConfigError(
                "rwkv7: use_kernels=true needs flash-linear-attention's RWKV-7 kernel: `pip install "
                "flash-linear-attention` (CUDA torch + triton), or set use_kernels='auto' (pure PyTorch on CPU)."
            )
        super().__init__(
            vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, head_size=head_size,
            d_ffn=d_ffn or 4 * d_model,
            d_decay_lora=d_decay_lora or lora_dim(d_model, 2.5),
            d_aaa_lora=d_aaa_lora or lora_dim(d_model, 2.5),
            d_mv_lora=d_mv_lora or lora_dim(d_model, 1.7),
            d_gate_lora=d_gate_lora or lora_dim(d_model, 5.0),
            use_kernels=use_kernels,
        )
        self.emb = nn.Embedding(vocab_size, d_model)
        # nn.Module.__setattr__ files it under _modules["blocks"] (BlinkDL's key prefix); the
        # ``blocks`` property below reads it back
        self.blocks = nn.ModuleList(Block(self.config, i) for i in range(n_layer))
        self.ln_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """BlinkDL's ``generate_init_weight`` for the matrices; the mixing vectors init themselves."""
        C, V, n_layer = self.d_model, self.vocab_size, self.config["n_layer"]
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        nn.init.orthogonal_(self.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
        for i, block in enumerate(self.blocks):
            att, ffn = block.att, block.ffn
            for lin in (att.receptance, att.value, ffn.key):
                nn.init.orthogonal_(lin.weight, gain=1.0)
            nn.init.orthogonal_(att.key.weight, gain=0.1)
            nn.init.zeros_(att.output.weight)
            nn.init.zeros_(ffn.value.weight)
            att.ln_x.weight.fill_(((1 + i) / n_layer) ** 0.7)

    @property
    def blocks(self) -> nn.ModuleList:
        return self._modules["blocks"]

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.emb(input_ids)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        C, H, N = self.d_model, self.d_model // self.config["head_size"], self.config["head_size"]
        device, wt, ct = self.state_placement(device)
        return tuple(
            (
                torch.zeros(batch_size, C, device=device, dtype=wt),
                torch.zeros(batch_size, H, N, N, device=device, dtype=ct),
                torch.zeros(batch_size, C, device=device, dtype=wt),
            )
            for _ in range(self.config["n_layer"])
        )

    def forward_embeds(self, x: Tensor, state: State | None = None) -> BackboneOutput:
        if state is None:
            state = self.init_state(x.shape[0], x.device)
        check_state(self, state, 3)
        v_first = None
        new_state = []
        for block, layer_state in zip(self.blocks, state):
            x, v_first, layer_state = block(x, v_first, layer_state)
            new_state.append(layer_state)
        return BackboneOutput(self.head(self.ln_out(x)), tuple(new_state))

    def save_pretrained(self, directory: str) -> None:
        """Write a BlinkDL x070 ``.pth`` (``directory`` ending in .pth, else ``directory/model.pth``)."""
        sd = {k: v.detach().clone().contiguous() for k, v in self.state_dict().items()}
        C, d_mv = self.d_model, self.config["d_mv_lora"]
        ref = self.emb.weight
        # BlinkDL's trainer has these in every layer and loads strictly; they are never read
        for name, shape in zip(UNUSED_LAYER0, ((1, 1, C), (C, d_mv), (d_mv, C))):
            sd[name] = torch.zeros(shape, dtype=ref.dtype)
        torch.save(sd, pth_target(directory))


def _ortho(x: Tensor, scale: float) -> Tensor:
    """BlinkDL's ortho_init for a LoRA matrix: orthogonal with gain scale * sqrt(rows / cols) if tall."""
    gain = math.sqrt(x.shape[0] / x.shape[1]) if x.shape[0] > x.shape[1] else 1.0
    return nn.init.orthogonal_(x, gain=gain * scale)


# -- checkpoints ------------------------------------------------------------------------------------

def rwkv7_config(sd: dict[str, Tensor], file: Path) -> dict[str, Any]:
    """RWKV7 constructor arguments inferred from the tensor shapes of an x070 state dict."""
    emb = require(sd, "emb.weight", file, "x070")
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    H, N = require(sd, "blocks.0.att.r_k", file, "x070").shape
    mv_layer = 1 if n_layer > 1 else 0
    d_mv = sd.get(f"blocks.{mv_layer}.att.v1")
    return dict(
        vocab_size=emb.shape[0],
        d_model=emb.shape[1],
        n_layer=n_layer,
        head_size=N,
        d_ffn=require(sd, "blocks.0.ffn.key.weight", file, "x070").shape[0],
        d_decay_lora=require(sd, "blocks.0.att.w1", file, "x070").shape[1],
        d_aaa_lora=require(sd, "blocks.0.att.a1", file, "x070").shape[1],
        d_mv_lora=d_mv.shape[1] if d_mv is not None else None,
        d_gate_lora=require(sd, "blocks.0.att.g1", file, "x070").shape[1],
    )


def load_rwkv7_pth(path: Path) -> RWKV7:
    """Build an RWKV7 from a BlinkDL x070 .pth (bf16/fp16 weights are loaded into fp32)."""
    file, sd = read_pth(path)
    sd = {k: v for k, v in sd.items() if k not in UNUSED_LAYER0}
    model = RWKV7(**rwkv7_config(sd, file))
    load_state_strict(model, sd, str(file))
    return model


register_format(
    "rwkv7-pth",
    lambda p: detect_pth(p, "x070"),
    load_rwkv7_pth,
    "BlinkDL RWKV-7 (x070) .pth: a .pth file, or a directory holding exactly one",
)
