"""WKV-4 (RWKV-4 time mixing) in parallel: chunked, log-space, pure PyTorch (CPU and GPU).

Per channel, with decay rate w = exp(time_decay) > 0 and bonus u = time_first,

    wkv_t = (A_t + e^{u+k_t} v_t) / (B_t + e^{u+k_t}),    A_{t+1} = e^{-w} A_t + e^{k_t} v_t

(B likewise with v = 1), and the state is kept as (aa, bb, pp) with A = aa e^pp, B = bb e^pp
(see ``wkv_ref``). Because w does not depend on t, every output inside a chunk of T tokens is a
weighted average over T + 1 "columns" with log-weights

    state column:  pp - s w            (value aa, weight bb)
    token j < s:   k_j - (s - 1 - j) w
    token j = s:   u + k_s

so a chunk is a (T, T) log-space "attention" per channel, made stable by subtracting each row's
max (the same max-trick as the recurrence, hence the same numbers). Only the hand-over of
(aa, bb, pp) between chunks is sequential: one small (B, C) update per chunk. Memory is
O(L T C) per layer (no O(L^2)), and autograd differentiates it without a per-token graph.
The final pp equals the recurrence's: both are the max over the same log-weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prosg.backbones.kernels.wkv_ref import wkv4_init_state

CHUNK = 8


def _chunks(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, Tensor, Tensor], T: int):
    """WKV-4 over k, v (B, L, C) with L a multiple of T; w = exp(time_decay) (C,)."""
    B, L, C = k.shape
    nc = L // T
    k, v = k.view(B, nc, T, C), v.view(B, nc, T, C)
    s = torch.arange(T, device=k.device, dtype=k.dtype)

    # 1) what each chunk adds to an empty state, as (a, b, p) relative to its own max
    lw_end = k - (T - 1 - s)[:, None] * w  # (B, nc, T, C) log-weight of token j at the chunk end
    p_c = lw_end.amax(2)  # (B, nc, C)
    e = (lw_end - p_c.unsqueeze(2)).exp()
    a_c, b_c = (e * v).sum(2), e.sum(2)

    # 2) sequential hand-over between chunks (T tokens of decay at once)
    aa, bb, pp = state
    starts = []
    decay = T * w
    for ai, bi, pi in zip(a_c.unbind(1), b_c.unbind(1), p_c.unbind(1)):
        starts.append((aa, bb, pp))
        p = torch.maximum(pp - decay, pi)
        e1, e2 = (pp - decay - p).exp(), (pi - p).exp()
        aa, bb, pp = e1 * aa + e2 * ai, e1 * bb + e2 * bi, p
    aa0, bb0, pp0 = (torch.stack(x, 1).unsqueeze(2) for x in zip(*starts))  # (B, nc, 1, C)

    # 3) every output of every chunk at once
    rel = (s[:, None] - 1 - s[None, :])[..., None]  # (T_s, T_j, 1): s - 1 - j
    D = torch.where(rel >= 0, -rel * w, torch.where(rel == -1, u, float("-inf")))  # (T, T, C)
    lw = k.unsqueeze(2) + D  # (B, nc, T_s, T_j, C)
    lw_state = pp0 - s[:, None] * w  # (B, nc, T_s, C)
    # the output does not depend on the shift, so the row max needs no gradient
    m = torch.maximum(lw.amax(3), lw_state).detach()
    e = (lw - m.unsqueeze(3)).exp()
    e_state = (lw_state - m).exp()
    num = (e * v.unsqueeze(2)).sum(3) + e_state * aa0
    den = e.sum(3) + e_state * bb0
    return (num / den).view(B, L, C), (aa, bb, pp)


def wkv4_chunked(
    time_decay: Tensor,
    time_first: Tensor,
    k: Tensor,
    v: Tensor,
    state: tuple[Tensor, Tensor, Tensor] | None = None,
    chunk_size: int = CHUNK,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Chunked WKV-4: time_decay, time_first (C,), k, v (B, L, C), state (aa, bb, pp) -> wkv, state."""
    B, L, C = k.shape
    if state is None:
        state = wkv4_init_state(B, C, k.device, k.dtype)
    w = time_decay.exp()
    main = L - L % chunk_size
    outs = []
    if main:
        y, state = _chunks(w, time_first, k[:, :main], v[:, :main], state, chunk_size)
        outs.append(y)
    if main < L:  # the tail is one shorter chunk: padding would decay the state and break it
        y, state = _chunks(w, time_first, k[:, main:], v[:, main:], state, L - main)
        outs.append(y)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), state
