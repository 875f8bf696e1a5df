"""WKV-7 (RWKV-7 "Goose" time mixing) in parallel: chunked pure PyTorch, or fla's Triton kernel.

Recurrence (per head; see ``wkv_ref``), written on h = S^T (N_k, N_v) as flash-linear-attention
does:

    h_t = diag(w_t) h_{t-1} + b_t (a_t^T h_{t-1}) + k_t v_t^T,      y_t = h_t^T r_t

Chunked form (the WY / "DPLR" trick of fla's ``chunk`` mode). Inside a chunk of T tokens that
starts from h_0, let g = log w, G_t = sum_{s<=t} g_s (cumulative log decay) and
u_t = a_t^T h_{t-1} (the delta-rule read-out). Unrolling the recurrence,

    u_t = (a_t e^{G_{t-1}})^T h_0 + sum_{s<t} (a_t e^{G_{t-1}-G_s})^T (k_s v_s^T + b_s u_s)
    y_t = (r_t e^{G_t})^T h_0     + sum_{s<=t} (r_t e^{G_t-G_s})^T (k_s v_s^T + b_s u_s)
    h_T = e^{G_T} h_0             + sum_s (e^{G_T-G_s})^T (k_s v_s^T + b_s u_s)

so the T read-outs solve one unit-lower-triangular system, u = U0 + W h_0 with
U0 = (I - A_ab)^{-1} A_ak V and W = (I - A_ab)^{-1} (a e^{G_ex}); every intra-chunk term is a
(T, T) or (T, N) batched matmul over all chunks at once. Only the hand-over between chunks is
sequential: u_c = U0_c + W_c h_c, h_{c+1} = e^{G_T} h_c + K_end^T V + B_end^T u_c (two thin
bmm per chunk). Autograd differentiates all of it without a per-token graph.

Numerics: decays are split as e^{G_t - c} * e^{c - G_s} around the chunk midpoint c; RWKV-7's
soft clamp keeps log w in [-0.607, 0), so with T = 16 every factor stays within e^{+-5} in
fp32. Inputs of other ranges stay exact while |log w| * T / 2 is well below ~80.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from prosg.errors import ConfigError

CHUNK = 16


def _unit_lower_inverse(A: Tensor) -> Tensor:
    """(I - A)^{-1} for strictly lower-triangular A (..., T, T), as (I+A)(I+A^2)(I+A^4)...

    A is nilpotent (A^T = 0), so the Neumann series is finite; the product form needs
    2 log2(T) batched matmuls, which beats a batched triangular solve on CPU and GPU alike.
    """
    T = A.shape[-1]
    inv = torch.eye(T, dtype=A.dtype, device=A.device) + A
    power = A
    for _ in range(max(0, (T - 1).bit_length() - 1)):
        power = power @ power
        inv = inv + inv @ power
    return inv


def wkv7_chunked(
    r: Tensor,
    log_w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor | None = None,
    chunk_size: int = CHUNK,
) -> tuple[Tensor, Tensor]:
    """Chunked WKV-7: inputs (B, L, H, N), state (B, H, N, N) [value, key] -> y (B, L, H, N), state."""
    B, L, H, N = r.shape
    T = chunk_size
    pad = (-L) % T
    if pad:  # zero inputs with log_w = 0 leave the state untouched, so padding the end is exact
        r, log_w, k, v, a, b = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (r, log_w, k, v, a, b))
    nc = (L + pad) // T

    def chunks(x: Tensor) -> Tensor:
        # (B, L, H, N) -> (nc, B*H, T, N), contiguous: every matmul below is one flat bmm and
        # the per-chunk slices of the sequential part are contiguous (cheap unbind / stack)
        return x.view(B, nc, T, H, N).permute(1, 0, 3, 2, 4).reshape(nc, B * H, T, N)

    r, g, k, v, a, b = (chunks(x) for x in (r, log_w, k, v, a, b))
    G = g.cumsum(-2)  # inclusive cumulative log decay, <= 0
    G_ex = G - g  # exclusive (decay before token t's own w_t)
    c = G[..., T // 2 : T // 2 + 1, :]  # midpoint reference keeps e^{+-...} factors small

    r_in, a_in = r * (G - c).exp(), a * (G_ex - c).exp()  # "query side" of intra-chunk products
    up = (c - G).exp()
    k_in, b_in = k * up, b * up  # "key side"
    ones = torch.ones(T, T, dtype=torch.bool, device=r.device)
    strict, incl = ones.tril(-1), ones.tril()
    A_ab = (a_in @ b_in.mT).masked_fill(~strict, 0)  # (nc, BH, T, T), s < t
    A_ak = (a_in @ k_in.mT).masked_fill(~strict, 0)
    A_rk = (r_in @ k_in.mT).masked_fill(~incl, 0)  # s <= t
    A_rb = (r_in @ b_in.mT).masked_fill(~incl, 0)

    inv = _unit_lower_inverse(A_ab)
    U0 = inv @ (A_ak @ v)  # (nc, BH, T, N_v): read-outs if h_0 were 0
    Wh = inv @ (a * G_ex.exp())  # (nc, BH, T, N_k): how read-outs depend on h_0
    to_end = (G[..., -1:, :] - G).exp()  # decay from token s to the chunk end
    k_end, b_end = k * to_end, b * to_end
    KV = k_end.mT @ v  # (nc, BH, N_k, N_v): what the chunk's own k v^T adds by its end
    decay = G[..., -1, :].exp().unsqueeze(-1)  # (nc, BH, N_k, 1)

    h = r.new_zeros(B * H, N, N) if state is None else state.transpose(-1, -2).reshape(B * H, N, N).to(r.dtype)
    starts, reads = [], []
    # the only sequential part, two thin bmm per chunk: u = U0 + Wh h, h <- e^{G_T} h + KV + b_end^T u
    per_chunk = (U0.unbind(0), Wh.unbind(0), b_end.mT.unbind(0), KV.unbind(0), decay.unbind(0))
    for U0_i, Wh_i, b_end_i, KV_i, d_i in zip(*per_chunk):
        starts.append(h)
        u_i = torch.baddbmm(U0_i, Wh_i, h)
        reads.append(u_i)
        h = torch.baddbmm(KV_i + d_i * h, b_end_i, u_i)
    h0 = torch.stack(starts, 0)  # (nc, BH, N_k, N_v) state entering each chunk
    u = torch.stack(reads, 0)  # (nc, BH, T, N_v) the delta-rule read-outs
    y = (r * G.exp()) @ h0 + A_rk @ v + A_rb @ u  # (nc, BH, T, N_v)
    y = y.view(nc, B, H, T, N).permute(1, 0, 3, 2, 4).reshape(B, nc * T, H, N)[:, :L]
    return y, h.view(B, H, N, N).transpose(-1, -2)


@functools.cache
def fla_kernel() -> Callable | None:
    """fla's chunked DPLR delta-rule Triton kernel (RWKV-7's WKV), or None when not installed."""
    try:
        from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule
    except Exception:  # not installed, or installed without triton / a CUDA torch
        return None
    return chunk_dplr_delta_rule


def wkv7_fla(
    r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """WKV-7 on CUDA through flash-linear-attention; same contract as ``wkv7_chunked``."""
    kernel = fla_kernel()
    if kernel is None:
        raise ConfigError(
            "use_kernels=True needs flash-linear-attention: `pip install flash-linear-attention` "
            "(with a CUDA build of torch and triton), or set use_kernels='auto' or False."
        )
    if not r.is_cuda:
        raise ConfigError(
            "use_kernels=True runs fla's Triton kernel, which needs CUDA tensors; move the model to a GPU "
            "or set use_kernels='auto' (falls back to the pure-PyTorch path on CPU)."
        )
    h0 = None if state is None else state.transpose(-1, -2).contiguous()  # fla keeps h = S^T (K, V)
    kwargs = dict(q=r, k=k, v=v, a=a, b=b, gk=log_w, scale=1.0, initial_state=h0, output_final_state=True)
    if "head_first" in inspect.signature(kernel).parameters:  # older fla defaulted to (B, H, T, K)
        kwargs["head_first"] = False
    y, hT = kernel(**kwargs)
    return y, hT.transpose(-1, -2)


def wkv7(
    r: Tensor,
    log_w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor | None = None,
    use_kernels: bool | str = "auto",
) -> tuple[Tensor, Tensor]:
    """WKV-7 over a sequence: fla on CUDA when available ("auto") or required (True), else chunked."""
    if use_kernels is True or (use_kernels == "auto" and r.is_cuda and fla_kernel() is not None):
        return wkv7_fla(r, log_w, k, v, a, b, state)
    return wkv7_chunked(r, log_w, k, v, a, b, state)
