"""The ProSG head (docs/method.md): a synthetic-gradient network, rank-r compression, and injection.

Lifecycle: ``SGHead(...)`` holds only the config; ``attach(backbone)`` resolves the target
linears by name and creates the parameters that depend on their shapes. ``session(prompt_len)``
is a context manager that hooks the backbone for one batch:

* in a parallel forward over prompt + response, each target linear computes its delta from the
  first ``prompt_len[b]`` positions of sample b (its inputs X and the residual stream H entering
  its block) and adds it to every later position — one pass, exact, since prompt positions never
  see the delta;
* after ``session.start_steps()``, every call (one generated token) gets the stored delta.

The backbone is not modified: everything goes through forward hooks on its modules.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prosg.errors import ConfigError
from prosg.sg.compress import COMPRESSIONS, compress

MODES = ("synthetic", "oracle")


@dataclass
class Target:
    """One linear layer the head writes a delta into."""

    name: str
    index: int  # position among the head's targets (selects e_ℓ, η_ℓ, slot queries)
    block: int  # index of the residual block that contains it
    d_in: int
    d_out: int


@dataclass
class Session:
    """Per-batch state shared by the hooks."""

    prompt_len: Tensor  # (B,)
    eta: Tensor  # (n_targets,) the step sizes η_ℓ of this batch (SGHead.step_sizes())
    index: dict[str, int]  # target name -> position in eta
    oracle: dict[str, Tensor] | None = None  # target name -> ∂L_prompt/∂Y (B, P, o)
    stepping: bool = False
    context: dict[int, Tensor] = field(default_factory=dict)  # block -> H (B, L, D) of the parallel pass
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # name -> (U (B,o,r), V (B,i,r))
    synthetic: dict[str, Tensor] = field(default_factory=dict)  # name -> Δ̂ (B, P, o), for the aux loss

    step_factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # name -> (V, −η Uᵀ)
    linears: dict[str, nn.Module] = field(default_factory=dict)  # name -> the hooked target linear
    hooks: dict[str, Any] = field(default_factory=dict)  # name -> removable hook handle
    merged: dict[str, Tensor] = field(default_factory=dict)  # name -> original weight, while merged

    def start_steps(self) -> None:
        """From now on every forward is one generated token: apply the stored deltas everywhere."""
        if not self.factors:
            raise RuntimeError("start_steps() before a prompt pass computed the deltas")
        # fold −η into U once, so each generated token costs two small batched matmuls per layer
        self.step_factors = {
            n: (v, (-self.eta[self.index[n]] * u).transpose(1, 2).contiguous()) for n, (u, v) in self.factors.items()
        }
        self.stepping = True
        if self.prompt_len.numel() == 1 and not torch.is_grad_enabled():
            self._merge()

    def select(self, rows: Tensor) -> None:
        """Keep only samples ``rows`` in the stepping deltas (a later forward carries just those samples)."""
        if not self.stepping:
            raise RuntimeError("select() applies to the stepping deltas: call start_steps() first")
        self.step_factors = {n: (v[rows], u[rows]) for n, (v, u) in self.step_factors.items()}

    def _merge(self) -> None:
        # One sample, no autograd: fold ΔW = −η U Vᵀ into W (as LoRA merges) and drop the hooks,
        # so generating with the head costs what generating without it does. Undone on exit.
        with torch.no_grad():
            for name, (v, u_scaled) in self.step_factors.items():
                weight = self.linears[name].weight
                self.merged[name] = weight.detach().clone()
                weight.add_((v[0] @ u_scaled[0]).T.to(weight.dtype))
                self.hooks.pop(name).remove()
        for handle in self.hooks.values():  # block-context hooks are not needed while stepping
            handle.remove()
        self.hooks.clear()

    def close(self) -> None:
        """Remove the hooks and restore merged weights."""
        with torch.no_grad():
            for name, original in self.merged.items():
                self.linears[name].weight.copy_(original)
        self.merged.clear()
        for handle in self.hooks.values():
            handle.remove()
        self.hooks.clear()


class SGHead(nn.Module):
    """Prompt synthetic gradients -> per-sample low-rank deltas on named target linears.

    ``targets``: linear-name patterns (None = every block linear that can hold a rank-``rank``
    delta); ``compression``: slots | svd | full; ``d_hidden`` / ``d_layer_emb``: width of the shared
    network M and of the per-layer embedding e_ℓ; ``transform_inputs``: learn X̃ = M_in(X, H) (False
    = the paper-literal X̃ = X); ``mode``: synthetic (M predicts Δ̂) or oracle (Δ̂ given: the true
    prompt gradient); ``eta_init``: initial step size η̃ (scaled by 1/fan-in).
    """

    def __init__(
        self,
        targets: Sequence[str] | None = None,  # name patterns; None = every block linear of size >= rank
        rank: int = 8,
        compression: str = "slots",
        d_hidden: int = 128,
        d_layer_emb: int = 32,
        transform_inputs: bool = True,
        mode: str = "synthetic",
        eta_init: float = 1.0,
    ) -> None:
        super().__init__()
        if compression not in COMPRESSIONS:
            raise ConfigError(f"model.method.init_args.compression={compression!r}; choose one of {', '.join(COMPRESSIONS)}")
        if mode not in MODES:
            raise ConfigError(f"SGHead mode={mode!r}; choose one of {', '.join(MODES)}")
        if rank < 1:
            raise ConfigError(f"model.method.init_args.rank={rank} must be >= 1")
        for knob, v in (("d_hidden", d_hidden), ("d_layer_emb", d_layer_emb)):
            if v < 1:
                raise ConfigError(f"model.method.init_args.{knob}={v} must be >= 1 (the width of the SG network)")
        self.target_patterns = list(targets) if targets else None
        self.rank, self.compression, self.mode = rank, compression, mode
        self.d_hidden, self.d_layer_emb = d_hidden, d_layer_emb
        self.transform_inputs, self.eta_init = transform_inputs, eta_init
        self.targets: list[Target] = []
        self._backbone_ref: list[nn.Module] = []  # a list so the backbone is not registered as a submodule

    # -- construction --------------------------------------------------------------------
    def attach(self, backbone: nn.Module) -> None:
        """Resolve target linears on ``backbone`` and build the shape-dependent parameters."""
        if self.targets:
            raise RuntimeError("this SGHead is already attached to a backbone")
        if self.target_patterns:
            linears = backbone.target_linears(self.target_patterns)
        else:  # default: every linear inside a block that can hold a rank-r delta
            linears = {
                n: m for n, m in backbone.target_linears([n for n in backbone.linear_names() if _in_block(backbone, n)]).items()
                if self.compression == "full" or min(m.in_features, m.out_features) >= self.rank
            }
        if not linears:
            sizes = sorted({min(m.in_features, m.out_features) for n, m in backbone.target_linears(
                [n for n in backbone.linear_names() if _in_block(backbone, n)]).items()})
            raise ConfigError(
                f"the SG head: no block linear of {type(backbone).__name__} can hold a rank-{self.rank} delta "
                f"(their smaller sides are {sizes}); lower the rank to at most {max(sizes) if sizes else 0} "
                "or build a wider backbone — a head with no targets would train as the plain model"
            )
        for k, (name, lin) in enumerate(linears.items()):
            limit = min(lin.in_features, lin.out_features)
            if self.compression != "full" and self.rank > limit:
                raise ConfigError(
                    f"model.method.init_args.rank={self.rank} exceeds what layer {name!r} ({lin.out_features}x"
                    f"{lin.in_features}) allows (max {limit}); lower the rank or target larger layers."
                )
            self.targets.append(Target(name, k, backbone.block_index(name), lin.in_features, lin.out_features))
        self._backbone_ref = [backbone]
        n, d_ctx, h = len(self.targets), backbone.d_model, self.d_hidden
        self.layer_emb = nn.Embedding(n, self.d_layer_emb)
        self.ctx_norm = nn.LayerNorm(d_ctx)
        self.trunk = nn.Sequential(  # shared by all layers (MEND-style), told apart by e_ℓ
            nn.Linear(d_ctx + self.d_layer_emb, h), nn.GELU(), nn.Linear(h, h), nn.GELU()
        )
        # Output heads are shared between layers of equal shape; zero-initialised so a fresh
        # head produces Δ̂ = 0 and leaves the backbone's outputs exactly unchanged.
        self.grad_out = nn.ModuleDict({str(o): _zero_linear(h, o) for o in sorted({t.d_out for t in self.targets})})
        if self.transform_inputs:
            dims = sorted({t.d_in for t in self.targets})
            self.in_read = nn.ModuleDict({str(i): nn.Linear(i, h) for i in dims})
            self.in_norm = nn.ModuleDict({str(i): nn.LayerNorm(i) for i in dims})
            self.in_write = nn.ModuleDict({str(i): _zero_linear(h, i) for i in dims})
        if self.compression == "slots":
            self.slot_queries = nn.Parameter(torch.randn(n, self.rank, h) / math.sqrt(h))
            self.slot_keys = nn.Linear(h, h, bias=False)
        self.eta = nn.Parameter(torch.full((n,), float(self.eta_init)))
        self.register_buffer("fan_in", torch.tensor([float(t.d_in) for t in self.targets]), persistent=False)
        ref = next(backbone.parameters())
        self.to(device=ref.device, dtype=ref.dtype)

    @property
    def backbone(self) -> nn.Module:
        """The backbone this head is attached to."""
        if not self._backbone_ref:
            raise RuntimeError("SGHead.attach(backbone) has not been called")
        return self._backbone_ref[0]

    # -- the method ------------------------------------------------------------------------
    def features(self, h: Tensor, target: Target) -> Tensor:
        """Shared trunk over the block context H (B, P, D) and the layer embedding -> (B, P, d_hidden)."""
        e = self.layer_emb.weight[target.index].expand(*h.shape[:-1], -1)
        return self.trunk(torch.cat([self.ctx_norm(h), e], dim=-1))

    def factors(self, target: Target, x: Tensor, h: Tensor, mask: Tensor, grad: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Prompt inputs X (B,P,i), context H (B,P,D), mask (B,P) -> (U, V, Δ̂) for one target."""
        feats = self.features(h, target)
        if grad is None:
            grad = self.grad_out[str(target.d_out)](feats)  # Δ̂ (B, P, o)
        if self.transform_inputs and self.mode == "synthetic":
            key = str(target.d_in)
            x = x + self.in_write[key](F.gelu(self.in_read[key](self.in_norm[key](x)) + feats))
        alpha = None
        if self.compression == "slots":
            scores = torch.einsum("rh,bph->brp", self.slot_queries[target.index], self.slot_keys(feats))
            scores = scores.masked_fill(~mask[:, None, :], float("-inf")) / math.sqrt(self.d_hidden)
            alpha = torch.softmax(scores, dim=-1)
        u, v = compress(self.compression, grad, x, mask, self.rank, alpha)
        return u, v, grad

    def step_sizes(self) -> Tensor:
        """η_ℓ = η̃_ℓ / d_in,ℓ: with unit-scale inputs Vᵀx / d_in is an O(1) match score, so a
        freshly trained head starts at the same scale on every layer width."""
        return self.eta / self.fan_in

    def apply_delta(self, x: Tensor, u: Tensor, v: Tensor, eta: Tensor) -> Tensor:
        """−η U (Vᵀ x) for inputs x (B, ..., i): the delta's contribution to the layer output."""
        xv = torch.einsum("b...i,bir->b...r", x, v)
        return -eta * torch.einsum("b...r,bor->b...o", xv, u)

    # -- hooks -------------------------------------------------------------------------------
    @contextmanager
    def session(self, prompt_len: Tensor, oracle: dict[str, Tensor] | None = None) -> Iterator[Session]:
        """Hook the backbone for one batch whose sample b has a prompt of ``prompt_len[b]`` tokens."""
        if self.mode == "oracle" and oracle is None:
            raise ConfigError("the oracle needs the prompt gradients: pass prompt_gradients() to session()")
        backbone = self.backbone
        s = Session(prompt_len=prompt_len.to(torch.long), eta=self.step_sizes(), index={t.name: t.index for t in self.targets}, oracle=oracle)
        modules = dict(backbone.named_modules())
        for b in sorted({t.block for t in self.targets}):
            s.hooks[f"block.{b}"] = backbone.blocks[b].register_forward_pre_hook(self._context_hook(s, b))
        for t in self.targets:
            s.linears[t.name] = modules[t.name]
            s.hooks[t.name] = modules[t.name].register_forward_hook(self._linear_hook(s, t))
        try:
            yield s
        finally:
            s.close()

    def _context_hook(self, s: Session, block: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if not s.stepping:
                s.context[block] = args[0]
        return hook

    def _linear_hook(self, s: Session, t: Target):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            x = args[0]
            if s.stepping:
                v, u_scaled = s.step_factors[t.name]
                if x.dim() == 2:  # (B, i): one token
                    return out + torch.bmm(torch.bmm(x[:, None], v), u_scaled)[:, 0]
                return torch.baddbmm(out, torch.bmm(x, v), u_scaled)
            L = x.shape[1]
            P = int(s.prompt_len.max().clamp(max=L))
            pos = torch.arange(L, device=x.device)
            mask = pos[None, :P] < s.prompt_len[:, None]  # (B, P) prompt positions
            grad = None if s.oracle is None else s.oracle[t.name][:, :P]
            u, v, g = self.factors(t, x[:, :P], s.context[t.block][:, :P], mask, grad)
            s.factors[t.name] = (u, v)
            s.synthetic[t.name] = g
            after = (pos[None, :] >= s.prompt_len[:, None]).to(out.dtype)  # (B, L)
            return out + self.apply_delta(x, u, v, s.eta[t.index]) * after[..., None]
        return hook

    # -- oracle and the DNI auxiliary loss ---------------------------------------------------
    def prompt_gradients(self, input_ids: Tensor, prompt_len: Tensor, answers: Tensor | None = None) -> dict[str, Tensor]:
        """∂L_prompt/∂Y_ℓ (B, P, o) for every target: L = per-sample mean next-token CE on the prompt.

        ``answers`` (B, K), -1 padded: count only prompt tokens that are among the sample's answers
        (e.g. recall's values: the loss of reading each value off its key), else every prompt token.
        """
        if torch.is_inference_mode_enabled():
            raise ConfigError(
                "the true-gradient oracle (and aux_weight > 0) needs autograd during evaluation: "
                "set `trainer.inference_mode: false` in the config."
            )
        backbone = self.backbone
        P = int(prompt_len.max())
        ids = input_ids[:, :P]
        modules = dict(backbone.named_modules())
        probes: dict[str, Tensor] = {}

        def probe(name: str):
            def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
                eps = torch.zeros_like(out, requires_grad=True)  # ∂L/∂eps == ∂L/∂Y
                probes[name] = eps
                return out + eps
            return hook

        handles = [modules[t.name].register_forward_hook(probe(t.name)) for t in self.targets]
        try:
            with torch.enable_grad():
                logits = backbone(ids).logits[:, :-1]
                pos = torch.arange(1, P, device=ids.device)
                valid = pos[None, :] < prompt_len[:, None]  # target t is a prompt token
                if answers is not None:
                    valid &= ((ids[:, 1:, None] == answers[:, None, :]) & (answers[:, None, :] >= 0)).any(-1)
                valid = valid.to(logits.dtype)
                nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
                loss = ((nll * valid).sum(1) / valid.sum(1).clamp(min=1)).sum()
                names = [t.name for t in self.targets]
                grads = torch.autograd.grad(loss, [probes[n] for n in names], allow_unused=True)
        finally:
            for hd in handles:
                hd.remove()
        return {n: (torch.zeros_like(probes[n]) if g is None else g.detach()) for n, g in zip(names, grads)}

    def aux_loss(self, s: Session, true_grads: dict[str, Tensor]) -> Tensor:
        """DNI-style regression of Δ̂ onto the true prompt gradient (scale-free MSE, mean over layers)."""
        terms = []
        for t in self.targets:
            g_hat, g = s.synthetic[t.name], true_grads[t.name][:, : s.synthetic[t.name].shape[1]]
            P = g.shape[1]
            mask = (torch.arange(P, device=g.device)[None, :] < s.prompt_len[:, None]).to(g.dtype)[..., None]
            err = ((g_hat - g) ** 2 * mask).sum() / ((g**2 * mask).sum() + 1e-12)
            terms.append(err)
        return torch.stack(terms).mean()

    def extra_repr(self) -> str:
        return (
            f"targets={len(self.targets) or self.target_patterns}, rank={self.rank}, "
            f"compression={self.compression!r}, mode={self.mode!r}, transform_inputs={self.transform_inputs}"
        )


def _zero_linear(d_in: int, d_out: int) -> nn.Linear:
    lin = nn.Linear(d_in, d_out)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def _in_block(backbone: nn.Module, name: str) -> bool:
    try:
        backbone.block_index(name)
        return True
    except ConfigError:
        return False
