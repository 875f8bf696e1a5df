"""Per-batch bookkeeping of the SG head: the targets, one parallel pass, and a session (its hooks,
recorded prompts, the deltas' factors, and stepping / merging for generation)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn


@dataclass
class Target:
    """One linear layer the head writes a delta into."""

    name: str
    index: int  # position among the head's targets (selects e_ℓ, η_ℓ, slot queries)
    block: int  # index of the residual block that contains it
    d_in: int
    d_out: int
    slot: int = 0  # position among its block's targets


@dataclass
class Pass:
    """What one parallel forward shares between its hooks (made at the first targeted block)."""

    P: int  # prompt positions read: min(max prompt_len, L)
    mask: Tensor  # (B, P) True at the prompt positions of each sample
    after: Tensor | None = None  # (B, 1, L) 1 at the positions after each prompt (they get the delta)
    neg_eta: Sequence[Tensor] = ()  # −η_ℓ per target
    features: dict[int, Tensor] = field(default_factory=dict)  # block -> trunk features (k, B, P, d_hidden)
    alpha: dict[int, Tensor] = field(default_factory=dict)  # block -> slot weights (k, B, r, P)


@dataclass
class Session:
    """Per-batch state shared by the hooks."""

    prompt_len: Tensor  # (B,)
    eta: Tensor  # (n_targets,) the step sizes η_ℓ of this batch (SGHead.step_sizes())
    index: dict[str, int]  # target name -> position in eta
    oracle: dict[str, Tensor] | None = None  # target name -> ∂L_prompt/∂Y (B, P, o)
    stepping: bool = False
    defer: bool = False  # parallel passes only record the prompts; compute() makes every delta at once
    context: dict[int, Tensor] = field(default_factory=dict)  # block -> H (B, P, D) at the prompt positions
    inputs: dict[str, Tensor] = field(default_factory=dict)  # name -> X (B, P, i) recorded by a deferred pass
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # name -> (U (B,o,r), V (B,i,r))
    synthetic: dict[str, Tensor] = field(default_factory=dict)  # name -> Δ̂ (B, P, o), for the aux loss
    current: Pass | None = None  # the parallel pass in progress (or the deferred pass recorded)
    compute: Callable[[], None] = lambda: None  # a deferred session's: every target's factors from the record

    step_factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # name -> (V, −η Uᵀ)
    linears: dict[str, nn.Module] = field(default_factory=dict)  # name -> the patched target linear
    hooks: dict[str, Any] = field(default_factory=dict)  # name -> removable hook or forward patch
    merged: dict[str, Tensor] = field(default_factory=dict)  # name -> original weight, while merged

    def start_steps(self) -> None:
        """From now on every forward gets the stored deltas at every position (generated tokens, or a
        response continuing from the prompt's state)."""
        if self.defer and not self.factors:
            self.compute()
        if not self.factors:
            raise RuntimeError("start_steps() before a prompt pass computed the deltas")
        # fold −η into U once, so each generated token costs two small batched matmuls per layer
        neg_eta = (-self.eta).unbind(0)
        # without autograd (decoding) V is read as (B, i, r) by every step: lay it out so, once
        layout = (lambda v: v) if torch.is_grad_enabled() else (lambda v: v.contiguous())
        self.step_factors = {n: (layout(v), (neg_eta[self.index[n]] * u.mT).contiguous()) for n, (u, v) in self.factors.items()}
        self.stepping = True
        self.current = None
        for name in [n for n in self.hooks if n not in self.linears]:  # block-context hooks: not needed while stepping
            self.hooks.pop(name).remove()
        if self.prompt_len.numel() == 1 and not torch.is_grad_enabled():
            self._merge()

    def select(self, rows: Tensor) -> None:
        """Keep only samples ``rows`` in the stepping deltas (a later forward carries just those samples)."""
        if not self.stepping:
            raise RuntimeError("select() applies to the stepping deltas: call start_steps() first")
        self.step_factors = {n: (v[rows], u[rows]) for n, (v, u) in self.step_factors.items()}

    @contextmanager
    def only(self, rows: Tensor) -> Iterator[None]:
        """Within the block, the stepping deltas are those of samples ``rows`` (restored after)."""
        kept = self.step_factors
        self.select(rows)
        try:
            yield
        finally:
            self.step_factors = kept

    def _merge(self) -> None:
        # One sample, no autograd: fold ΔW = −η U Vᵀ into W (as LoRA merges) and drop the patches,
        # so generating with the head costs what generating without it does. Undone on exit.
        with torch.no_grad():
            for name, (v, u_scaled) in self.step_factors.items():
                weight = self.linears[name].weight
                self.merged[name] = weight.detach().clone()
                weight.add_((v[0] @ u_scaled[0]).T.to(weight.dtype))
        for handle in self.hooks.values():
            handle.remove()
        self.hooks.clear()

    def close(self) -> None:
        """Remove the hooks and patches and restore merged weights."""
        with torch.no_grad():
            for name, original in self.merged.items():
                self.linears[name].weight.copy_(original)
        self.merged.clear()
        for handle in self.hooks.values():
            handle.remove()
        self.hooks.clear()
        self.current = None
