"""Rank-r factors (U, V) of G = Σ_p Δ̂_p X̃_pᵀ without ever forming the (o × i) matrix G.

All functions take a batch of prompts: Δ̂ (B, P, o), X̃ (B, P, i) and a prompt mask (B, P);
they return U (B, o, r) and V (B, i, r) with U Vᵀ ≈ G per sample.
"""

from __future__ import annotations

import torch
from torch import Tensor

COMPRESSIONS = ("slots", "svd", "full")


def full_factors(grad: Tensor, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Exact: rank P, U = Δ̂ᵀ, V = X̃ᵀ over the masked prompt positions (analysis only)."""
    m = mask.to(grad.dtype)[..., None]
    return (grad * m).transpose(1, 2), (x * m).transpose(1, 2)


def slot_factors(grad: Tensor, x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """r slots read the prompt with attention weights α (B, r, P): U = Δ̂ᵀαᵀ, V = X̃ᵀαᵀ."""
    return (alpha @ grad).mT, (alpha @ x).mT  # (B, o, r), (B, i, r) as views of the (B, r, .) products


@torch.no_grad()
def top_left_subspace(grad: Tensor, x: Tensor, rank: int, oversample: int = 8, power_iters: int = 2, seed: int = 0) -> Tensor:
    """Orthonormal basis (B, o, r) of the top-r left singular subspace of G = Δ̂ᵀX̃ (randomized, factored)."""
    B, P, i = x.shape
    k = min(rank + oversample, P, i)
    gen = torch.Generator(device="cpu").manual_seed(seed)  # fixed sketch: same numbers every call
    omega = torch.randn(i, k, generator=gen).to(device=x.device, dtype=x.dtype)
    y = grad.transpose(1, 2) @ (x @ omega)  # G Ω: (B, o, k)
    q = torch.linalg.qr(y).Q
    for _ in range(power_iters):  # (G Gᵀ)^q Ω sharpens the spectrum
        z = x.transpose(1, 2) @ (grad @ q)  # Gᵀ Q: (B, i, k)
        q = torch.linalg.qr(grad.transpose(1, 2) @ (x @ torch.linalg.qr(z).Q)).Q
    small = (grad @ q).transpose(1, 2) @ x  # Qᵀ G: (B, k, i)
    u_small = torch.linalg.svd(small, full_matrices=False).U  # (B, k, k)
    return q @ u_small[..., :rank]


def svd_factors(grad: Tensor, x: Tensor, mask: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-r approximation Q_r Q_rᵀ G: U = Q_r, V = Gᵀ Q_r = X̃ᵀ(Δ̂ Q_r).

    The basis Q_r is treated as a constant, so gradients flow linearly through Δ̂ and X̃
    and never through an SVD (whose backward is undefined at repeated singular values,
    e.g. the all-zero G of a freshly initialised head).
    """
    m = mask.to(grad.dtype)[..., None]
    grad, x = grad * m, x * m
    q = top_left_subspace(grad, x, rank)
    if q.shape[-1] < rank:  # fewer prompt positions than the rank: pad with zero columns
        q = torch.nn.functional.pad(q, (0, rank - q.shape[-1]))
    return q, x.transpose(1, 2) @ (grad @ q)


def compress(method: str, grad: Tensor, x: Tensor, mask: Tensor, rank: int, alpha: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dispatch to one compression; ``alpha`` (B, r, P) is required by ``slots``."""
    if method == "full":
        return full_factors(grad, x, mask)
    if method == "svd":
        return svd_factors(grad, x, mask, rank)
    if method == "slots":
        assert alpha is not None, "slots compression needs attention weights"
        return slot_factors(grad, x, alpha)
    raise ValueError(f"unknown compression {method!r}; choose one of {COMPRESSIONS}")
