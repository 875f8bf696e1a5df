"""The obviously-correct selective scan: one autograd step per token (tests and benchmarks only).

Same contract as ``selective_scan`` (mamba_ssm's shapes); slow on purpose, never used by models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_ref(
    u: Tensor,  # (B, D, L)
    delta: Tensor,  # (B, D, L)
    A: Tensor,  # (D, N)
    B: Tensor,  # (B, N, L)
    C: Tensor,  # (B, N, L)
    D: Tensor | None = None,  # (D,)
    z: Tensor | None = None,  # (B, D, L)
    delta_bias: Tensor | None = None,  # (D,)
    delta_softplus: bool = True,
    initial_state: Tensor | None = None,  # (B, D, N)
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,  y_t = C_t . h_t + D u_t,  y *= silu(z)."""
    dtype_in = u.dtype
    ct = torch.promote_types(dtype_in, torch.float32)
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], A.shape[0], A.shape[1]) if initial_state is None else initial_state.to(ct)
    ys = []
    for t in range(u.shape[2]):
        dA = torch.exp(delta[:, :, t, None] * A)  # (B, D, N)
        dBu = (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]  # (B, D, N)
        h = dA * h + dBu
        ys.append((h * C[:, None, :, t]).sum(-1))  # (B, D)
    y = torch.stack(ys, dim=2) if ys else u.new_zeros(u.shape)
    if D is not None:
        y = y + u * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


def selective_scan_bld_ref(
    u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
    initial_state: Tensor | None = None, chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``selective_scan_bld``'s contract (batch-first (B, L, .), dt already positive) on the loop above."""
    y, last = selective_scan_ref(u.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                                 delta_softplus=False, initial_state=initial_state, return_last_state=True)
    return y.transpose(1, 2), last
