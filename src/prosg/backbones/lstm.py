"""A classic multi-layer LSTM language model, written as residual blocks (plain PyTorch).

Per block (pre-norm, like the other families):

    u = ih(norm(x))                          # (B, L, 4H)  input -> gates, every token at once
    for t: gates = u_t + h_{t-1} W_hh^T      # (B, 4H)     the recurrence, one token at a time
           i, f, g, o = gates.chunk(4)
           c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g)
           h_t = sigmoid(o) tanh(c_t)
    x = x + proj(h)                          # (B, L, D)

``ih`` and ``proj`` are ``nn.Linear`` modules called once on the whole sequence (so forward hooks,
e.g. the SG head's, see every token); the recurrent weight ``w_hh`` is a bare parameter applied with
``F.linear`` once per step. State per layer: (h, c), each (B, H), kept in at least fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prosg.backbones.base import Backbone, BackboneOutput, State
from prosg.backbones.registry import register_backbone


class LSTMBlock(nn.Module):
    """Pre-norm LSTM layer with a residual connection; the first argument is the residual stream."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.ih = nn.Linear(d_model, 4 * d_hidden)  # gates i, f, g, o from the input (bias = the LSTM bias)
        self.w_hh = nn.Parameter(torch.empty(4 * d_hidden, d_hidden))  # gates from h_{t-1}, no bias
        self.proj = nn.Linear(d_hidden, d_model)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, L, D), (h, c) each (B, H) -> (x + proj(h_1..L) (B, L, D), (h_L, c_L))."""
        h, c = state
        ct = h.dtype  # the recurrence runs in the state's dtype (at least fp32)
        u = self.ih(self.norm(x)).to(ct)  # (B, L, 4H)
        w_hh = self.w_hh.to(ct)
        hs = []
        for t in range(x.shape[1]):
            i, f, g, o = (u[:, t] + F.linear(h, w_hh)).chunk(4, dim=-1)  # each (B, H)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h)
        y = torch.stack(hs, dim=1).to(x.dtype)  # (B, L, H)
        return x + self.proj(y), (h, c)


@register_backbone("lstm")
class LSTM(Backbone):
    """Multi-layer LSTM language model with the recurrent-backbone interface (state = (h, c) per layer)."""

    def __init__(self, vocab_size: int, d_model: int = 64, n_layer: int = 2, d_hidden: int | None = None,
                 tie_embeddings: bool = True) -> None:
        d_hidden = d_hidden or d_model
        super().__init__(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, d_hidden=d_hidden,
                         tie_embeddings=tie_embeddings)
        self.emb = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(LSTMBlock(d_model, d_hidden) for _ in range(n_layer))
        self.norm_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.emb.weight
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """GPT-2 style for the projections; nn.LSTM's uniform for the gates, forget-gate bias 1."""
        n_layer, H = self.config["n_layer"], self.config["d_hidden"]
        bound = 1.0 / math.sqrt(H)
        nn.init.normal_(self.emb.weight, std=0.02)
        if not self.config["tie_embeddings"]:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        for block in self.layers:
            nn.init.uniform_(block.ih.weight, -bound, bound)
            nn.init.uniform_(block.w_hh, -bound, bound)
            block.ih.bias.zero_()
            block.ih.bias[H:2 * H] = 1.0  # remember by default
            nn.init.normal_(block.proj.weight, std=0.02 / math.sqrt(2 * n_layer))
            block.proj.bias.zero_()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.emb(input_ids)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        device, _, ct = self.state_placement(device)
        zeros = lambda: torch.zeros(batch_size, self.config["d_hidden"], device=device, dtype=ct)  # noqa: E731
        return tuple((zeros(), zeros()) for _ in range(self.config["n_layer"]))

    def forward_embeds(self, x: Tensor, state: State | None = None) -> BackboneOutput:
        x, state = self.run_blocks(x, state, per_layer=2)  # (B, L, D), ((h, c),) * n_layer
        return BackboneOutput(self.lm_head(self.norm_f(x)), state)
