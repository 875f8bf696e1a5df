"""Fast pure-PyTorch selective scan (Mamba-1) for CPU, with a hand-written backward.

Same contract as mamba_ssm's ``selective_scan_fn``, plus an initial state:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t        h: (B, D, N)
    y_t = <h_t, C_t> + D * u_t;   y *= silu(z)

Why not the obvious loop: stepping with ``x[:, :, t]`` under autograd records several nodes
per token, and the backward of every index op writes a full-size zero gradient (O(L^2) memory
traffic). Here the forward walks time in chunks: per chunk, exp(dt A) and dt u B are built with
two batched ops into (k, B, N, D) buffers, the recurrence is one in-place ``addcmul_`` per
token on a contiguous slice, and y is one batched matmul. Only the inputs and the state at
each chunk boundary are saved. The backward recomputes one chunk of states from its
checkpoint, runs the reverse recurrence g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1} with the same
one-op-per-token loop, and gets every parameter gradient from batched reductions over the
chunk. No (B, L, D, N) tensor ever exists; extra memory is three (chunk, B, N, D) buffers.

The state is laid out (B, N, D) internally: D (hundreds) is the contiguous axis, so the
reductions over N and over D both read whole cache lines.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements per (chunk, B, N, D) work buffer (~4 MiB of fp32): the three buffers of the
# backward stay cache-resident while the per-chunk reductions sweep them several times.
_CHUNK_ELEMENTS = 1 << 20
# Per-token ops smaller than this (4 ATen grain sizes) run single-threaded.
_SERIAL_STEP_NUMEL = 1 << 17


# Up to this d_state, C·h is read as a broadcast product and a sum over N: a batched matmul would run
# thousands of 1×N @ N×D products, which small-GEMM kernels do 3-5x slower (on the demo's d_state 2, the
# largest op of a training step); above it the matmul is faster.
_SUM_MAX_STATE = 4


def _read_state(a: Tensor, H: Tensor) -> Tensor:
    """Σ_n a[..., n] H[..., n, :]: (k, B, N) and (k, B, N, D) -> (k, B, D)."""
    if a.shape[-1] <= _SUM_MAX_STATE:
        return (a.unsqueeze(-1) * H).sum(-2)
    return torch.matmul(a.unsqueeze(2), H).squeeze(2)


def default_chunk(batch: int, d_inner: int, d_state: int) -> int:
    """Time steps per chunk so that one (chunk, B, N, D) buffer holds ~_CHUNK_ELEMENTS values."""
    return max(4, min(256, _CHUNK_ELEMENTS // max(1, batch * d_inner * d_state)))


def _coefficients(dt: Tensor, dtu: Tensor, At: Tensor, Bm: Tensor, dA: Tensor, dBu: Tensor) -> None:
    """Fill dA = exp(dt A) and dBu = dt u B for one chunk into (k, B, N, D) buffers."""
    torch.mul(dt.unsqueeze(2), At, out=dA)  # (k, B, 1, D) * (N, D)
    dA.exp_()
    torch.mul(dtu.unsqueeze(2), Bm.unsqueeze(-1), out=dBu)  # (k, B, 1, D) * (k, B, N, 1)


@contextlib.contextmanager
def _serial_if_small(step_numel: int) -> Iterator[None]:
    """Run the per-token loops on one thread when one step is too small to split profitably.

    Each token is one op on B*N*D values; below ~4 grain sizes a second thread gains nothing, and
    on a busy machine every parallel region can stall a scheduler slice waiting for a descheduled
    worker, thousands of times per sequence.
    """
    old = torch.get_num_threads()
    serial = old > 1 and step_numel < _SERIAL_STEP_NUMEL
    if serial:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if serial:
            torch.set_num_threads(old)


def _run_states(dA: Tensor, H: Tensor, h: Tensor) -> None:
    """In place: H[i] <- dA[i] * H[i-1] + H[i]; H holds dt u B on entry, the states on exit."""
    prev = h
    with _serial_if_small(h.numel()):
        for H_i, dA_i in zip(H.unbind(0), dA.unbind(0)):  # unbind: one call, not 2 selects a step
            prev = H_i.addcmul_(dA_i, prev)


class _ScanFn(torch.autograd.Function):
    """Core recurrence: (y, last state) from batch-first, time-second inputs."""

    @staticmethod
    def forward(ctx, u, dt, At, Bm, C, h0, chunk):  # type: ignore[override]
        # u, dt: (B, L, D)   At: (N, D)   Bm, C: (B, L, N)   h0: (B, N, D) or None
        batch, L, d = u.shape
        n = At.shape[0]
        h = h0 if h0 is not None else u.new_zeros(batch, n, d)
        n_chunks = -(-L // chunk)
        ckpts = u.new_empty(n_chunks, batch, n, d)  # state entering each chunk
        y = u.new_empty(batch, L, d)
        k_max = min(chunk, L)
        dA_buf = u.new_empty(k_max, batch, n, d)
        H_buf = u.new_empty(k_max, batch, n, d)
        dtu = dt * u
        for c in range(n_chunks):
            s, e = c * chunk, min((c + 1) * chunk, L)
            dA, H = dA_buf[: e - s], H_buf[: e - s]
            ckpts[c].copy_(h)
            _coefficients(dt[:, s:e].transpose(0, 1), dtu[:, s:e].transpose(0, 1), At,
                          Bm[:, s:e].transpose(0, 1), dA, H)
            _run_states(dA, H, ckpts[c])
            y[:, s:e] = _read_state(C[:, s:e].transpose(0, 1), H).transpose(0, 1)  # y_t = C_t · h_t
            h = H[-1]
        ctx.chunk = chunk
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(u, dt, At, Bm, C, ckpts)
        return y, h.clone()

    @staticmethod
    def backward(ctx, dy, dlast):  # type: ignore[override]
        u, dt, At, Bm, C, ckpts = ctx.saved_tensors
        dy = dy.contiguous()  # strided along D (a transposed y upstream) makes every op below slow
        chunk = ctx.chunk
        batch, L, d = u.shape
        n = At.shape[0]
        du = torch.empty_like(u, memory_format=torch.contiguous_format)
        ddt = torch.empty_like(du)
        dB = torch.empty(Bm.shape, dtype=Bm.dtype, device=Bm.device)
        dC = torch.empty_like(dB)
        dAt = torch.zeros_like(At)
        # g: dLoss/dh flowing backwards into the current chunk from the future.
        g = dlast.clone() if dlast is not None else u.new_zeros(batch, n, d)
        k_max = min(chunk, L)
        dA_buf = u.new_empty(k_max, batch, n, d)
        H_buf = u.new_empty(k_max, batch, n, d)
        G_buf = u.new_empty(k_max, batch, n, d)
        dtu = dt * u
        for c in range(-(-L // chunk) - 1, -1, -1):
            s, e = c * chunk, min((c + 1) * chunk, L)
            k = e - s
            dA, H, G = dA_buf[:k], H_buf[:k], G_buf[:k]
            h_start = ckpts[c]
            dt_c, dtu_c, u_c = (t[:, s:e].transpose(0, 1) for t in (dt, dtu, u))  # (k, B, D)
            B_c, C_c = (t[:, s:e].transpose(0, 1) for t in (Bm, C))  # (k, B, N)
            dy_c = dy[:, s:e].transpose(0, 1).unsqueeze(2)  # (k, B, 1, D)
            # 1. recompute this chunk's states from its checkpoint.
            _coefficients(dt_c, dtu_c, At, B_c, dA, H)
            _run_states(dA, H, h_start)
            # 2. reverse recurrence: G[i] = C_i dy_i + dA[i+1] * G[i+1]; G[k-1] also gets g.
            # (Operand order matters: the one that is contiguous along D first, or ~10x slower.)
            torch.mul(dy_c, C_c.unsqueeze(-1), out=G)  # (k, B, 1, D) * (k, B, N, 1)
            G[k - 1].add_(g)
            G_s, dA_s = G.unbind(0), dA.unbind(0)
            with _serial_if_small(g.numel()):
                for i in range(k - 2, -1, -1):
                    G_s[i].addcmul_(dA_s[i + 1], G_s[i + 1])
            g = dA[0] * G[0]  # into the previous chunk's last state
            # 3. batched gradients over the chunk; (1, D) @ (D, N) matmuls are the fast reductions.
            dC[:, s:e] = torch.matmul(dy_c, H.transpose(-1, -2)).squeeze(2).transpose(0, 1)
            dB[:, s:e] = torch.matmul(dtu_c.unsqueeze(2), G.transpose(-1, -2)).squeeze(2).transpose(0, 1)
            ddtu = _read_state(B_c, G)  # (k, B, D)
            # d/d(dt A) of exp(dt A) * h_prev is Y = G * dA * h_prev (built in place over dA).
            Y = dA.mul_(G)
            Y[0].mul_(h_start)
            if k > 1:
                Y[1:].mul_(H[:-1])
            dAt += torch.mul(Y, dt_c.unsqueeze(2), out=G).sum((0, 1))  # G is free by now
            ddt_a = Y.mul_(At).sum(2)  # (k, B, D)
            du[:, s:e] = (ddtu * dt_c).transpose(0, 1)
            ddt[:, s:e] = torch.addcmul(ddt_a, ddtu, u_c).transpose(0, 1)
        dh0 = g if ctx.has_h0 else None
        return du, ddt, dAt, dB, dC, dh0, None


def selective_scan_bld(
    u: Tensor,  # (B, L, D)
    dt: Tensor,  # (B, L, D), already positive (after softplus)
    A: Tensor,  # (D, N)
    B: Tensor,  # (B, L, N)
    C: Tensor,  # (B, L, N)
    initial_state: Tensor | None = None,  # (B, D, N)
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The bare recurrence on batch-first (B, L, .) tensors: y (B, L, D) without the D/z terms,
    and the last state (B, D, N). Computes in u's dtype (callers upcast)."""
    batch, L, d = u.shape
    n = A.shape[1]
    h0 = initial_state.to(u.dtype).transpose(1, 2).contiguous() if initial_state is not None else None
    k = chunk or default_chunk(batch, d, n)
    y, last = _ScanFn.apply(u, dt, A.to(u.dtype).t().contiguous(), B.to(u.dtype), C.to(u.dtype), h0, k)
    return y, last.transpose(1, 2)


def selective_scan(
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
    chunk: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba_ssm's shapes; y (B, D, L) [and the last state (B, D, N)].

    Computes in fp32 (fp64 stays fp64); y is cast back to u's dtype, the state is not.
    Unlike mamba_ssm, gradients flow into ``initial_state`` and out of the last state.
    """
    dtype_in = u.dtype
    ct = torch.promote_types(dtype_in, torch.float32)
    u_c = u.to(ct).transpose(1, 2).contiguous()  # (B, L, D)
    dt = delta.to(ct).transpose(1, 2)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)
    if delta_softplus:
        dt = F.softplus(dt)
    y, last = selective_scan_bld(
        u_c, dt.contiguous(), A.to(ct), B.to(ct).transpose(1, 2).contiguous(),
        C.to(ct).transpose(1, 2).contiguous(), initial_state, chunk,
    )
    if D is not None:
        y = y + u_c * D.to(ct)
    y = y.transpose(1, 2)  # (B, D, L)
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y
