"""Injection of the per-sample low-rank delta into a linear's output: the fused autograd op and the
forward patch that puts it in place of a target linear's ``forward``."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn


class LowRankAdd(torch.autograd.Function):
    """y = out + ((x Vtᵀ) ⊙ m) Ut per sample: x (B, L, i), Vt (B, r, i), Ut (B, r, o), out (B, L, o), and an
    optional constant 0/1 mask m (B, 1, L) of the positions that get the delta.

    Autograd would compute x Vtᵀ as (B, L, r) and its gradients with r as the narrow inner side of
    each product; here every product is laid out with the rank as its small *outer* dimension
    (Vt xᵀ is (B, r, L)), which small-matrix GEMMs on CPU run 2-4x faster.

    Every operand must have ``out``'s dtype (``add_low_rank`` casts them); autocast is off inside, in
    forward and backward alike, so under bf16 mixed precision the saved tensors and the incoming
    gradient share one dtype. ``inplace``: ``out`` is a fresh tensor nothing else reads (a linear's
    output), so the delta is accumulated into it rather than into a copy of it."""

    @staticmethod
    def forward(ctx, out: Tensor, x: Tensor, vt: Tensor, ut: Tensor, mask: Tensor | None = None,
                inplace: bool = False) -> Tensor:
        with torch.autocast(out.device.type, enabled=False):
            xvt = torch.bmm(vt, x.mT)  # (B, r, L)
            if mask is not None:
                xvt = xvt * mask
            ctx.save_for_backward(x, vt, ut, xvt, mask)
            if inplace:
                ctx.mark_dirty(out)
                return out.baddbmm_(xvt.mT, ut)
            return torch.baddbmm(out, xvt.mT, ut)

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, vt, ut, xvt, mask = ctx.saved_tensors
        with torch.autocast(gy.device.type, enabled=False):
            gy = gy.to(x.dtype)
            g_xvt = torch.bmm(ut, gy.mT)  # (B, r, L)
            if mask is not None:
                g_xvt = g_xvt * mask
            g_x = torch.bmm(g_xvt.mT, vt) if ctx.needs_input_grad[1] else None
            g_vt = torch.bmm(g_xvt, x) if ctx.needs_input_grad[2] else None
            g_ut = torch.bmm(xvt, gy) if ctx.needs_input_grad[3] else None
        return gy, g_x, g_vt, g_ut, None, None


def add_low_rank(out: Tensor, x: Tensor, v: Tensor, ut: Tensor, mask: Tensor | None = None,
                 inplace: bool = False) -> Tensor:
    """out + ((x V) ⊙ mask) Ut for x (B, L, i) or one token (B, i), V (B, i, r), Ut (B, r, o): ``LowRankAdd``
    under autograd, else two plain batched matmuls (a decoding step's x·V is a row vector per sample, for
    which this layout is the fast one). ``inplace``: ``out`` is a fresh tensor nothing else reads (the
    target linear's output), and the delta is added into it."""
    dt = out.dtype  # under autocast the linear's output may be bf16 while x or the factors are fp32
    if x.dtype != dt or v.dtype != dt or ut.dtype != dt:  # compared in Python: a decode step pays no cast dispatch
        x, v, ut = x.to(dt), v.to(dt), ut.to(dt)
    grad = torch.is_grad_enabled() and (out.requires_grad or x.requires_grad or v.requires_grad or ut.requires_grad)
    if x.dim() == 2:  # (B, i): one decoding step
        if inplace and not grad:
            out.unsqueeze(1).baddbmm_(torch.bmm(x.unsqueeze(1), v), ut)
            return out
        return torch.baddbmm(out.unsqueeze(1), torch.bmm(x.unsqueeze(1), v), ut).squeeze(1)
    if grad:
        return LowRankAdd.apply(out, x, v.mT, ut, None if mask is None else mask.to(dt), inplace)
    xv = torch.bmm(x, v)
    xv = xv if mask is None else xv * mask.mT.to(dt)
    return out.baddbmm_(xv, ut) if inplace else torch.baddbmm(out, xv, ut)


class MethodPatch:
    """Replaces one module's method ``name`` (``forward``, or a block's ``step``) until ``remove()``: an instance
    attribute over the class method, so a patched ``forward`` skips hook dispatch (``nn.Module.__call__``
    takes its fast path). A second patch of the same method is refused: it would be undone by the first."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any], name: str = "forward") -> None:
        if name in vars(module):
            raise RuntimeError(
                f"{type(module).__name__} already has a patched {name}: one SG session per backbone at a time "
                "(a prompt cell's included)"
            )
        self.module: nn.Module | None = module
        self.name = name
        setattr(module, name, fn)

    def remove(self) -> None:
        if self.module is not None:
            delattr(self.module, self.name)
            self.module = None
