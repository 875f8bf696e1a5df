"""Mamba-1 language model, state-dict compatible with mamba_ssm's ``MambaLMHeadModel``.

Module tree (so mamba_ssm checkpoints load without renaming):

    backbone.embedding                       nn.Embedding(padded vocab, d_model)
    backbone.layers.{i}.norm                 RMSNorm (or LayerNorm)
    backbone.layers.{i}.mixer.{in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj}
    backbone.norm_f
    lm_head                                  tied to the embedding by default

Each block computes x + mixer(norm(x)) on the residual stream (mamba_ssm's fused add-norm,
unfused). The per-layer state is mamba_ssm's inference cache: (conv_state (B, d_inner, d_conv)
holding the last d_conv conv inputs, ssm_state (B, d_inner, d_state)). Projections are always
called as modules so forward hooks see every token; the fused CUDA path that bypasses them is
used only when no hook is registered (see kernels/mamba_cuda.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prosg.backbones.base import Backbone, BackboneOutput, State
from prosg.backbones.kernels import mamba_cuda
from prosg.backbones.kernels.selective_scan import selective_scan_bld
from prosg.backbones.registry import register_backbone
from prosg.errors import ConfigError

# mamba_ssm ssm_cfg keys this backbone takes (checkpoints: mamba_formats.py)
SSM_KEYS = ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init_floor", "conv_bias", "bias")
LayerState = tuple[Tensor, Tensor]  # (conv_state (B, d_inner, d_conv), ssm_state (B, d_inner, d_state))


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 like mamba_ssm's RMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class MambaMixer(nn.Module):
    """The selective SSM mixer; parameter names and init follow mamba_ssm's ``Mamba``."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_kernels: bool | str = "auto",
    ) -> None:
        super().__init__()
        self.d_state, self.d_conv = d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_kernels = use_kernels
        self.scan_fn = selective_scan_bld  # swappable (the benchmark's naive reference loop)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        # Only its parameters are used (see _causal_conv); padding kept as mamba_ssm declares it.
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        # dt_proj keeps the input variance (weight) and puts softplus(bias) log-uniform in [dt_min, dt_max].
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        # S4D-real init: A = -(1..N) per channel, stored as log(-A) in fp32.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def init_state(self, batch_size: int, device: Any = None, dtype: torch.dtype = torch.float32) -> LayerState:
        """Zeros: conv inputs in the activation dtype, the SSM state in >= fp32."""
        return (
            torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype),
            torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                        dtype=torch.promote_types(dtype, torch.float32)),
        )

    def forward(self, x: Tensor, state: LayerState | None = None, return_state: bool = True) -> tuple[Tensor, LayerState | None]:
        """x (B, L, d_model) continuing from ``state`` (None = fresh) -> (out (B, L, d_model), state)."""
        kernels = mamba_cuda.kernels_for(self.use_kernels, x)
        if kernels is not None and state is None:  # mamba_ssm 1 kernels take no initial state
            return mamba_cuda.mixer_forward(self, x, kernels, return_state)
        batch, L, _ = x.shape
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, d_inner) each
        # The conv sees the previous d_conv-1 inputs (kept in conv_state) before this chunk.
        prev = state[0].to(xs.dtype) if state is not None else xs.new_zeros(batch, self.d_inner, self.d_conv)
        xfull = torch.cat([prev.transpose(1, 2), xs], dim=1)  # (B, d_conv + L, d_inner)
        u = F.silu(self._causal_conv(xfull, L))  # (B, L, d_inner), contiguous
        dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # (B, L, d_inner)
        ct = torch.promote_types(u.dtype, torch.float32)  # the scan runs in >= fp32
        A = -torch.exp(self.A_log.to(ct))  # (d_inner, d_state)
        uc = u.to(ct)
        y, last = self.scan_fn(uc, dt.to(ct), A, Bm.to(ct), Cm.to(ct), state[1] if state is not None else None)
        y = (y + uc * self.D.to(ct)) * F.silu(z.to(ct))
        out = self.out_proj(y.to(x.dtype))
        # A copy, so a kept state does not pin the whole (B, L, d_inner) input alive.
        return out, ((xfull[:, -self.d_conv :].transpose(1, 2).contiguous(), last) if return_state else None)

    def _causal_conv(self, xfull: Tensor, L: int) -> Tensor:
        """Depthwise causal conv on (B, d_conv + L, d_inner) as d_conv shifted multiply-adds.

        In the batch-time-channel layout every tap is a contiguous slice, which on CPU beats
        F.conv1d (channels-first, plus two transposes) forward and backward.
        """
        w = self.conv1d.weight[:, 0, :]  # (d_inner, d_conv)
        # Row 0 of xfull is the oldest kept input; it has just left the window of the first token.
        out = xfull[:, 1 : 1 + L] * w[:, 0]
        for k in range(1, self.d_conv):
            out = torch.addcmul(out, xfull[:, 1 + k : 1 + k + L], w[:, k])
        return out + self.conv1d.bias if self.conv1d.bias is not None else out

    def step(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """One token x (B, d_model) -> (out (B, d_model), next state); O(1) in history."""
        kernels = mamba_cuda.kernels_for(self.use_kernels, x)
        if kernels is not None:
            return mamba_cuda.mixer_step(self, x, state, kernels)
        conv_state, ssm_state = state
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, d_inner) each
        conv_state = torch.cat([conv_state[..., 1:], xs.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
        u = (conv_state.to(xs.dtype) * self.conv1d.weight.squeeze(1)).sum(-1)  # (B, d_inner)
        if self.conv1d.bias is not None:
            u = u + self.conv1d.bias
        u = F.silu(u)
        dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))
        ct = ssm_state.dtype
        dt, uc = dt.to(ct), u.to(ct)
        dA = torch.exp(dt.unsqueeze(-1) * -torch.exp(self.A_log.to(ct)))  # (B, d_inner, d_state)
        h = torch.addcmul(dA * ssm_state, (dt * uc).unsqueeze(-1), Bm.to(ct).unsqueeze(1))
        y = torch.matmul(h, Cm.to(ct).unsqueeze(-1)).squeeze(-1)  # (B, d_inner)
        y = (y + uc * self.D.to(ct)) * F.silu(z.to(ct))
        return self.out_proj(y.to(x.dtype)), (conv_state, h)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), the residual kept in fp32 if asked."""

    def __init__(self, norm: nn.Module, mixer: MambaMixer, residual_in_fp32: bool) -> None:
        super().__init__()
        self.norm = norm
        self.mixer = mixer
        self.residual_in_fp32 = residual_in_fp32

    def _residual(self, x: Tensor) -> Tensor:
        return x.to(torch.promote_types(x.dtype, torch.float32)) if self.residual_in_fp32 else x

    def forward(self, x: Tensor, state: LayerState | None = None, return_state: bool = True) -> tuple[Tensor, LayerState | None]:
        """Residual stream x (B, L, D) -> (x_out, state after the last token)."""
        out, state = self.mixer(self.norm(x.to(self.norm.weight.dtype)), state, return_state)
        return self._residual(x) + out, state

    def step(self, x: Tensor, state: LayerState) -> tuple[Tensor, LayerState]:
        """One token of the residual stream x (B, D) -> (x_out, next state)."""
        out, state = self.mixer.step(self.norm(x.to(self.norm.weight.dtype)), state)
        return self._residual(x) + out, state


class MixerModel(nn.Module):
    """Embedding, blocks and final norm; named like mamba_ssm's ``MixerModel``."""

    def __init__(self, vocab_size: int, d_model: int, layers: list[Block], norm_f: nn.Module) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(layers)
        self.norm_f = norm_f


def _check_config(c: dict[str, Any]) -> None:
    """Reject sizes and options that cannot build a Mamba, naming the fix."""
    for key in ("vocab_size", "d_model", "n_layer", "d_state", "d_conv", "pad_vocab_size_multiple"):
        v = c[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"Mamba {key} must be a positive integer, got {v!r}")
    if isinstance(c["expand"], bool) or not isinstance(c["expand"], (int, float)) or int(c["expand"] * c["d_model"]) < 1:
        raise ConfigError(f"Mamba expand must be a positive number (d_inner = expand * d_model), got {c['expand']!r}")
    r = c["dt_rank"]
    if r != "auto" and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ConfigError(f"Mamba dt_rank must be 'auto' (= ceil(d_model / 16)) or a positive integer, got {r!r}")
    for key in ("dt_min", "dt_max", "dt_init_floor", "norm_epsilon"):
        if isinstance(c[key], bool) or not isinstance(c[key], (int, float)) or c[key] <= 0:
            raise ConfigError(f"Mamba {key} must be a positive number, got {c[key]!r}")
    if not c["dt_min"] <= c["dt_max"]:
        raise ConfigError(f"Mamba needs 0 < dt_min <= dt_max, got dt_min={c['dt_min']}, dt_max={c['dt_max']}")
    if c["use_kernels"] not in ("auto", True, False):
        raise ConfigError(f"Mamba use_kernels must be 'auto', true or false, got {c['use_kernels']!r}")


@register_backbone("mamba")
class Mamba(Backbone):
    """Mamba-1 LM (mamba_ssm ``MambaLMHeadModel`` layout); logits sliced to ``vocab_size``."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layer: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        rms_norm: bool = True,
        residual_in_fp32: bool = True,
        norm_epsilon: float = 1e-5,
        pad_vocab_size_multiple: int = 8,
        tie_embeddings: bool = True,
        use_kernels: bool | str = "auto",
    ) -> None:
        config = dict(
            vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, d_state=d_state, d_conv=d_conv,
            expand=expand, dt_rank=dt_rank, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
            conv_bias=conv_bias, bias=bias, rms_norm=rms_norm, residual_in_fp32=residual_in_fp32,
            norm_epsilon=norm_epsilon, pad_vocab_size_multiple=pad_vocab_size_multiple,
            tie_embeddings=tie_embeddings, use_kernels=use_kernels,
        )
        _check_config(config)
        if use_kernels is True:
            mamba_cuda.require_kernels()
        super().__init__(**config)
        self.tie_embeddings = tie_embeddings
        padded = -(-vocab_size // pad_vocab_size_multiple) * pad_vocab_size_multiple

        def norm() -> nn.Module:
            return RMSNorm(d_model, norm_epsilon) if rms_norm else nn.LayerNorm(d_model, eps=norm_epsilon)

        mixer_kw = dict(d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, dt_min=dt_min,
                        dt_max=dt_max, dt_init_floor=dt_init_floor, conv_bias=conv_bias, bias=bias,
                        use_kernels=use_kernels)
        layers = [Block(norm(), MambaMixer(d_model, **mixer_kw), residual_in_fp32) for _ in range(n_layer)]
        self.backbone = MixerModel(padded, d_model, layers, norm())
        self.lm_head = nn.Linear(d_model, padded, bias=False)
        self._init_weights(n_layer)
        if tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @torch.no_grad()
    def _init_weights(self, n_layer: int) -> None:
        """mamba_ssm's ``_init_weights``: zero biases (not dt_proj's), N(0, 0.02) embedding,
        out_proj re-drawn and scaled by 1/sqrt(n_layer) (GPT-2 prenorm-residual scheme)."""
        keep = {id(layer.mixer.dt_proj.bias) for layer in self.backbone.layers}
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None and id(m.bias) not in keep:
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for layer in self.backbone.layers:
            p = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            p /= math.sqrt(n_layer)

    # -- Backbone interface ------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        """The residual blocks (``backbone.layers``)."""
        return self.backbone.layers

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token ids (B, L) or (B,) -> embeddings (B, L, D) or (B, D)."""
        return self.backbone.embedding(input_ids)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """Per layer (conv_state, ssm_state), all zeros."""
        device, dtype, _ = self.state_placement(device)  # the mixers promote the carry themselves
        return tuple(layer.mixer.init_state(batch_size, device, dtype) for layer in self.blocks)

    def forward(self, input_ids: Tensor, state: State | None = None, *, return_state: bool = True) -> BackboneOutput:
        """Token ids (B, L) -> logits (B, L, V) and the state (None if ``return_state=False``,
        which lets CUDA training use the fused kernel)."""
        self.check_ids(input_ids, ndim=2)
        return self.forward_embeds(self.embed(input_ids), state, return_state=return_state)

    def forward_embeds(self, x: Tensor, state: State | None = None, *, return_state: bool = True) -> BackboneOutput:
        """Embeddings (B, L, D) continuing from ``state`` (None = fresh) -> logits and state."""
        states = self._check_state(state, x.shape[0]) if state is not None else [None] * len(self.blocks)
        new_states = []
        for block, s in zip(self.blocks, states):
            x, s = block(x, s, return_state)
            new_states.append(s)
        return BackboneOutput(self._logits(x), tuple(new_states) if return_state else None)

    def step_embeds(self, x: Tensor, state: State) -> BackboneOutput:
        """One token's embedding (B, D) -> logits (B, V) and the next state."""
        states = self._check_state(state, x.shape[0])
        new_states = []
        for block, s in zip(self.blocks, states):
            x, s = block.step(x, s)
            new_states.append(s)
        return BackboneOutput(self._logits(x), tuple(new_states))

    def _logits(self, x: Tensor) -> Tensor:
        h = self.backbone.norm_f(x.to(self.backbone.norm_f.weight.dtype))
        return self.lm_head(h)[..., : self.vocab_size]  # drop the padding rows of the vocab

    def _check_state(self, state: State, batch: int) -> State:
        ok = isinstance(state, (tuple, list)) and len(state) == len(self.blocks) and all(
            isinstance(s, (tuple, list)) and len(s) == 2 and s[0].shape[0] == batch for s in state
        )
        if not ok:
            raise ConfigError(
                f"Mamba state must be {len(self.blocks)} (conv_state, ssm_state) pairs with batch size "
                f"{batch}; pass the .state returned by this model (or model.init_state({batch}))."
            )
        return state

    # -- checkpoints -------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write mamba_ssm's layout: ``config.json`` + ``pytorch_model.bin`` (lm_head included)."""
        c = self.config
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ssm_cfg = {k: c[k] for k in SSM_KEYS}
        cfg = dict(
            d_model=c["d_model"], n_layer=c["n_layer"], vocab_size=c["vocab_size"], ssm_cfg=ssm_cfg,
            rms_norm=c["rms_norm"], residual_in_fp32=c["residual_in_fp32"], fused_add_norm=True,
            pad_vocab_size_multiple=c["pad_vocab_size_multiple"], tie_embeddings=c["tie_embeddings"],
        )
        if c["norm_epsilon"] != 1e-5:  # mamba_ssm's MambaConfig has no such field; only write it when needed
            cfg["norm_epsilon"] = c["norm_epsilon"]
        (directory / "config.json").write_text(json.dumps(cfg, indent=2))
        torch.save({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, directory / "pytorch_model.bin")
