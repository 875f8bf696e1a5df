"""The obviously-correct WKV recurrences, one token at a time (single steps, tests, benchmarks).

RWKV-7 (x070), per head, state S (N_v, N_k) exactly as BlinkDL stores it:

    S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T,     y_t = S_t r_t,    w_t = exp(log_w_t)

RWKV-4, per channel, with the numerically stable (aa, bb, pp) state of BlinkDL / HF / ``rwkv``
(numerator = aa * e^pp, denominator = bb * e^pp), decay e^{-exp(time_decay)} per token:

    wkv_t = (e^pp aa + e^(u + k_t) v_t) / (e^pp bb + e^(u + k_t))

The ``*_step`` functions are what models use for one-token generation; the ``*_loop`` functions
step through a whole sequence under autograd and are slow on purpose (models never use them).
"""

from __future__ import annotations

import torch
from torch import Tensor

# pp of an empty RWKV-4 state: e^pp is 0 without producing inf - inf anywhere.
WKV4_EMPTY_PP = -1e30


def wkv7_step(
    r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One token: r, log_w, k, v, a, b (B, H, N), state (B, H, N, N) -> y (B, H, N), next state."""
    sa = state @ a.unsqueeze(-1)  # (B, H, N, 1): S a
    state = state * log_w.exp().unsqueeze(-2) + sa @ b.unsqueeze(-2) + v.unsqueeze(-1) @ k.unsqueeze(-2)
    return (state @ r.unsqueeze(-1)).squeeze(-1), state


def wkv7_loop(
    r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Whole sequence, token by token: inputs (B, L, H, N), state (B, H, N, N) -> y (B, L, H, N), state."""
    B, L, H, N = r.shape
    if state is None:
        state = r.new_zeros(B, H, N, N)
    ys = []
    for rt, wt, kt, vt, at, bt in zip(*(x.unbind(1) for x in (r, log_w, k, v, a, b))):
        y, state = wkv7_step(rt, wt, kt, vt, at, bt, state)
        ys.append(y)
    return torch.stack(ys, 1), state


def wkv4_init_state(batch: int, channels: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """(aa, bb, pp), each (B, C): the empty RWKV-4 state."""
    zeros = torch.zeros(batch, channels, device=device, dtype=dtype)
    return zeros, zeros.clone(), torch.full_like(zeros, WKV4_EMPTY_PP)


def wkv4_step(
    time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """One token: time_decay, time_first (C,), k, v (B, C), state (aa, bb, pp) -> wkv (B, C), next state."""
    aa, bb, pp = state
    w = -torch.exp(time_decay)  # raw parameter -> log decay, as BlinkDL, HF and ``rwkv`` do
    ww = time_first + k
    p = torch.maximum(pp, ww)
    e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
    ww = pp + w
    p = torch.maximum(ww, k)
    e1, e2 = torch.exp(ww - p), torch.exp(k - p)
    return y, (e1 * aa + e2 * v, e1 * bb + e2, p)


def wkv4_loop(
    time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, Tensor, Tensor] | None = None
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Whole sequence, token by token: k, v (B, L, C) -> wkv (B, L, C), final (aa, bb, pp)."""
    if state is None:
        state = wkv4_init_state(k.shape[0], k.shape[2], k.device, k.dtype)
    ys = []
    for kt, vt in zip(k.unbind(1), v.unbind(1)):
        y, state = wkv4_step(time_decay, time_first, kt, vt, state)
        ys.append(y)
    return torch.stack(ys, 1), state
