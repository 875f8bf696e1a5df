"""A small causal transformer with a KV cache: the no-forgetting attention reference.

Pre-LayerNorm GPT with rotary position embeddings (relative positions, so recall by content
works at distances longer than those seen in training), tied input/output embeddings, and key
shift (each key mixed with the previous token's, the attention analogue of the recurrent
backbones' conv1d / token shift): without it a 2-layer model left the demo's recall task at
chance for 3000 steps; with it, 100% at every distance within 250.
State = per-layer (k, v) caches of shape (B, n_head, T, head_dim), plus the last raw key with key
shift; ``step`` attends over the cache, so its cost grows with T — attention re-reads the prompt
every step, by design.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prosg.backbones.base import Backbone, BackboneOutput, State
from prosg.backbones.registry import register_backbone
from prosg.errors import ConfigError


def rope_cache(seq_len: int, head_dim: int, offset: int, device: torch.device, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables (seq_len, head_dim // 2) for positions offset .. offset + seq_len - 1."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs of x (B, H, L, hd) by position-dependent angles."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention over (cache + new tokens), optionally with key shift.

    Key shift mixes each key with the previous token's key per channel (k'_t = k_t + mu (k_{t-1} - k_t),
    mu in [0, 1] learned), the attention analogue of Mamba's conv1d and RWKV's token shift: a key
    then says "what came before me", so associative recall needs one attention hop instead of an
    induction circuit that a small model takes thousands of steps to discover.
    """

    def __init__(self, d_model: int, n_head: int, bias: bool, key_shift: bool = False) -> None:
        super().__init__()
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        # per channel of each head: from "this token" (0) to "previous token" (1)
        self.key_shift = nn.Parameter(torch.linspace(0, 1, self.head_dim).repeat(n_head, 1)[:, None]) if key_shift else None

    def forward(self, x: Tensor, cache: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, L, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
        past_k, past_v = cache[0], cache[1]
        T0 = past_k.shape[2]
        extra: tuple[Tensor, ...] = ()
        if self.key_shift is not None:  # cache[2]: the last raw (unshifted, unrotated) key, (B, H, 1, hd)
            prev = torch.cat([cache[2], k[:, :, :-1]], dim=2)
            extra = (k[:, :, -1:],)
            k = k + self.key_shift.clamp(0, 1) * (prev - k)
        cos, sin = rope_cache(L, self.head_dim, T0, x.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        if T0 == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new query i sits at absolute position T0 + i and sees keys 0 .. T0 + i
            mask = torch.ones(L, T0 + L, dtype=torch.bool, device=x.device).tril(diagonal=T0)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, L, C)
        return self.proj(y), (k, v) + extra


class MLP(nn.Module):
    """Position-wise feed-forward with GELU."""

    def __init__(self, d_model: int, d_ffn: int, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ffn, bias=bias)
        self.proj = nn.Linear(d_ffn, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block; the first argument is the residual stream."""

    def __init__(self, d_model: int, n_head: int, d_ffn: int, bias: bool, key_shift: bool = False) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = CausalSelfAttention(d_model, n_head, bias, key_shift)
        self.ln_2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = MLP(d_model, d_ffn, bias)

    def forward(self, x: Tensor, cache: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        a, cache = self.attn(self.ln_1(x), cache)
        x = x + a
        return x + self.mlp(self.ln_2(x)), cache


@register_backbone("gpt")
class GPT(Backbone):
    """Causal transformer reference with the recurrent-backbone interface (state = KV cache)."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layer: int = 2,
        n_head: int = 4,
        d_ffn: int | None = None,
        bias: bool = True,
        key_shift: bool = True,
    ) -> None:
        if d_model % n_head or (d_model // n_head) % 2:
            raise ConfigError(
                f"gpt: d_model={d_model} must be divisible by n_head={n_head} into an even head size "
                "(rotary embeddings rotate channel pairs); pick e.g. n_head=4 with d_model=128."
            )
        d_ffn = d_ffn or 4 * d_model
        super().__init__(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, n_head=n_head, d_ffn=d_ffn, bias=bias, key_shift=key_shift)
        self.wte = nn.Embedding(vocab_size, d_model)
        self.h = nn.ModuleList(Block(d_model, n_head, d_ffn, bias, key_shift) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model, bias=bias)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.h

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.wte(input_ids)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        n_head = self.config["n_head"]
        hd = self.d_model // n_head
        device, dtype, _ = self.state_placement(device)  # a KV cache holds activations: the weights' dtype
        empty = torch.zeros(batch_size, n_head, 0, hd, device=device, dtype=dtype)
        # with key shift the cache also carries the last raw key (zeros before the first token)
        extra = (torch.zeros(batch_size, n_head, 1, hd, device=device, dtype=dtype),) if self.config["key_shift"] else ()
        return [(empty, empty) + extra for _ in range(self.config["n_layer"])]

    def state_size(self, seq_len: int = 0) -> int:
        """The KV cache grows: keys and values of every layer for each of ``seq_len`` tokens (+ the shift key)."""
        n_layer = self.config["n_layer"]
        return 2 * n_layer * self.d_model * seq_len + (n_layer * self.d_model if self.config["key_shift"] else 0)

    def forward_embeds(self, x: Tensor, state: State | None = None) -> BackboneOutput:
        if state is None:
            state = self.init_state(x.shape[0], x.device)
        new_state = []
        for block, cache in zip(self.h, state):
            x, cache = block(x, cache)
            new_state.append(cache)
        return BackboneOutput(self.lm_head(self.ln_f(x)), new_state)
