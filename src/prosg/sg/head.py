"""The ProSG head (docs/method.md): a synthetic-gradient network, rank-r compression, and injection.

Lifecycle: ``SGHead(...)`` holds only the config; ``attach(backbone)`` resolves the target
linears by name and creates the parameters that depend on their shapes. ``session(prompt_len)``
is a context manager that hooks the backbone for one batch:

* in a parallel forward over prompt + response, each target linear computes its delta from the
  first ``prompt_len[b]`` positions of sample b (its inputs X and the residual stream H entering
  its block) and adds it to every later position — one pass, exact, since prompt positions never
  see the delta;
* with ``session(..., defer=True)`` a parallel forward over the prompts only records X and H, and
  every target's delta is computed at once afterwards (``start_steps`` does it), one batched call
  per layer width instead of a few small ones per layer;
* after ``session.start_steps()``, every call (a generated token, or a whole response continuing
  from the prompt's state) gets the stored delta.

The backbone's weights are not modified (except while a single-sample decode folds the delta in,
undone on exit). A forward pre-hook on each targeted block records its input H (and, in a single
pass, computes what depends only on H for all of the block's targets at once); each target
linear's ``forward`` is replaced for the session by one that adds the delta (an instance attribute
over the class method, removed on exit), so a decoding step pays no hook dispatch.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prosg.errors import ConfigError
from prosg.sg.compress import COMPRESSIONS, compress
from prosg.sg.inject import MethodPatch, add_low_rank
from prosg.sg.session import Pass, Session, Target

MODES = ("synthetic", "oracle")


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
        self.by_block: dict[int, list[Target]] = {}  # block -> its targets, in forward order
        for t in sorted(self.targets, key=lambda t: (t.block, t.index)):
            t.slot = len(self.by_block.setdefault(t.block, []))
            self.by_block[t.block].append(t)
        # the order of a batched computation over all targets: equal output widths consecutive, and
        # within them the blocks in turn (a block's k-th target, then the next block's)
        self.batch_order = sorted(self.targets, key=lambda t: (t.d_out, t.slot, t.block))
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
    def features(self, h: Tensor, targets: Sequence[Target], block_of: Sequence[int] | None = None) -> Tensor:
        """Shared trunk over block contexts H (nb, B, P, D) for ``targets`` -> (k, B, P, d_hidden).

        Target j reads context ``block_of[j]`` (None: the only one, nb = 1). The trunk's first layer
        reads [LN(H), e_ℓ]; its weight is applied in two parts, so the H part is computed once per
        block and each target only adds the image of its embedding."""
        first, second = self.trunk[0], self.trunk[2]
        nb, d = h.shape[0], h.shape[-1]
        z = F.linear(self.ctx_norm(h), first.weight[:, :d])  # (nb, B, P, h)
        c = F.linear(self.layer_emb.weight[_rows(targets)], first.weight[:, d:], first.bias)  # (k, h)
        if block_of is None:
            pre = z + c[:, None, None]
        elif list(block_of) == list(range(nb)) * (len(targets) // nb):  # blocks in turn: a broadcast
            pre = (z + c.view(-1, nb, 1, 1, c.shape[-1])).flatten(0, 1)
        else:
            pre = z.index_select(0, torch.tensor(list(block_of), device=z.device)) + c[:, None, None]
        return F.gelu(second(F.gelu(pre)))

    def slot_weights(self, feats: Tensor, targets: Sequence[Target], mask: Tensor) -> Tensor:
        """Attention of each target's r slot queries over the prompt positions: features (k, B, P, h),
        mask (B, P) -> α (k, B, r, P).

        A query q scores position p by q · K f_p = (q K) · f_p: the keys are never formed. The scores
        are made as (k, r, B·P), with the rank as the small outer side of the product."""
        k, B, P, h = feats.shape
        queries = self.slot_queries[_rows(targets)] @ self.slot_keys.weight  # (k, r, h)
        scores = (queries @ feats.reshape(k, B * P, h).mT).view(k, self.rank, B, P)
        scores = scores.masked_fill(~mask, float("-inf")) / math.sqrt(self.d_hidden)
        return torch.softmax(scores, dim=-1).transpose(1, 2)

    def _needs_features(self, oracle: bool) -> bool:
        return not oracle or self.compression == "slots"

    def _synthetic_by_width(self, feats: Tensor, by_out: list[tuple[int, list[int]]]) -> list[Tensor]:
        """Δ̂ (k, B, P, o) of each output-width group of targets from their trunk features: one output head per width."""
        return [self.grad_out[str(d_out)](f) for (d_out, _), f in zip(by_out, _partition(feats, by_out))]

    def factors(self, targets: Sequence[Target], xs: Sequence[Tensor], mask: Tensor, feats: Tensor | None,
                alpha: Tensor | None, grads: Sequence[Tensor] | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(U (B,o,r), V (B,i,r), Δ̂ (B,P,o)) of each target from its prompt inputs X (B, P, i).

        ``feats`` (k, B, P, h) and ``alpha`` (k, B, r, P): the targets' trunk features and slot weights
        (None where the compression and mode do not use them); ``grads``: Δ̂ per target (the oracle's
        true gradients), else the synthetic Δ̂ from the features. Targets of equal output (input)
        width share the output head (input transform), so each width is one batched call."""
        n = len(targets)
        by_out, by_in = _groups(targets, "d_out"), _groups(targets, "d_in")
        gs: list[Tensor | None] = list(grads) if grads is not None else [None] * n
        us: list[Tensor | None] = [None] * n
        slots = self.compression == "slots"
        if grads is None or slots:
            g_parts = (self._synthetic_by_width(feats, by_out) if grads is None
                       else [torch.stack([grads[j] for j in js]) for _, js in by_out])
            a_parts = _partition(alpha, by_out) if slots else [None] * len(by_out)
            for (_, js), g, a in zip(by_out, g_parts, a_parts):
                if grads is None:
                    for j, gj in zip(js, g.unbind(0)):
                        gs[j] = gj
                if slots:  # U = Δ̂ᵀαᵀ, for every target of this width at once
                    for j, u in zip(js, (a @ g).mT.unbind(0)):
                        us[j] = u
        out: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * n
        transform = self.transform_inputs and self.mode == "synthetic"
        f_parts = _partition(feats, by_in) if transform else [None] * len(by_in)
        a_parts = _partition(alpha, by_in) if slots else [None] * len(by_in)
        for (d_in, js), f, a in zip(by_in, f_parts, a_parts):
            x = torch.stack([xs[j] for j in js]) if len(js) > 1 else xs[js[0]][None]  # (k, B, P, i)
            if transform:  # X̃ = X + M_in(X, H)
                key = str(d_in)
                x = x + self.in_write[key](F.gelu(self.in_read[key](self.in_norm[key](x)) + f))
            if slots:  # V = X̃ᵀαᵀ
                for j, v in zip(js, (a @ x).mT.unbind(0)):
                    out[j] = (us[j], v, gs[j])
            else:
                for j, xj in zip(js, x.unbind(0)):
                    out[j] = (*compress(self.compression, gs[j], xj, mask, self.rank), gs[j])
        return out

    def step_sizes(self) -> Tensor:
        """η_ℓ = η̃_ℓ / d_in,ℓ: with unit-scale inputs Vᵀx / d_in is an O(1) match score, so a
        freshly trained head starts at the same scale on every layer width."""
        return self.eta / self.fan_in

    # -- hooks -------------------------------------------------------------------------------
    @contextmanager
    def session(self, prompt_len: Tensor, oracle: dict[str, Tensor] | None = None, defer: bool = False) -> Iterator[Session]:
        """Hook the backbone for one batch whose sample b has a prompt of ``prompt_len[b]`` tokens.

        ``defer``: a parallel forward only reads the prompts (records X, H; no delta is applied) and
        every target's delta is computed at once by ``start_steps()``."""
        if self.mode == "oracle" and oracle is None:
            raise ConfigError("the oracle needs the prompt gradients: pass prompt_gradients() to session()")
        backbone = self.backbone
        s = Session(prompt_len=prompt_len.to(torch.long), eta=self.step_sizes(), index={t.name: t.index for t in self.targets},
                    oracle=oracle, defer=defer)
        s.compute = lambda: self._compute_deferred(s)
        modules = dict(backbone.named_modules())
        try:
            for b in self.by_block:
                s.hooks[f"block.{b}"] = backbone.blocks[b].register_forward_pre_hook(self._context_hook(s, b))
            for t in self.targets:
                s.linears[t.name] = modules[t.name]
                s.hooks[t.name] = MethodPatch(modules[t.name], self._patched_forward(s, t, modules[t.name]))
            yield s
        finally:
            s.close()

    def _context_hook(self, s: Session, block: int):
        targets = self.by_block[block]
        first = block == min(self.by_block)
        features = self._needs_features(s.oracle is not None)

        def hook(module: nn.Module, args: tuple) -> None:
            h = args[0]
            if first:  # a new parallel pass
                s.current = self._new_pass(s, h)
            cur = s.current
            s.context[block] = h[:, : cur.P]
            if features and not s.defer:
                feats = cur.features[block] = self.features(s.context[block][None], targets)
                if self.compression == "slots":
                    cur.alpha[block] = self.slot_weights(feats, targets, cur.mask)
        return hook

    def _new_pass(self, s: Session, h: Tensor) -> Pass:
        L = h.shape[1]
        P = int(s.prompt_len.max().clamp(max=L))
        pos = torch.arange(L, device=h.device)
        cur = Pass(P, pos[None, :P] < s.prompt_len[:, None])  # (B, P) prompt positions
        if not s.defer:
            cur.after = (pos[None, None, :] >= s.prompt_len[:, None, None]).to(h.dtype)  # (B, 1, L) get the delta
            cur.neg_eta = (-s.eta).unbind(0)
        return cur

    def _patched_forward(self, s: Session, t: Target, linear: nn.Module) -> Callable[[Tensor], Tensor]:
        base = type(linear).forward

        def forward(x: Tensor) -> Tensor:
            out = base(linear, x)
            if s.stepping:
                v, u_scaled = s.step_factors[t.name]
                return add_low_rank(out, x, v, u_scaled, inplace=True)
            cur = s.current
            if s.defer:  # reading the prompts: every delta is computed later, at once
                s.inputs[t.name] = x[:, : cur.P]
                return out
            grads = None if s.oracle is None else [s.oracle[t.name][:, : cur.P]]
            one = slice(t.slot, t.slot + 1)
            feats, alpha = cur.features.get(t.block), cur.alpha.get(t.block)
            (u, v, g), = self.factors([t], [x[:, : cur.P]], cur.mask, None if feats is None else feats[one],
                                      None if alpha is None else alpha[one], grads)
            s.factors[t.name] = (u, v)
            s.synthetic[t.name] = g
            # y = W x − η U (Vᵀ x) at the positions after each prompt
            return add_low_rank(out, x, v, cur.neg_eta[t.index] * u.mT, cur.after, inplace=True)
        return forward

    def _session_features(self, s: Session, targets: Sequence[Target], detach: bool = False) -> Tensor:
        """Trunk features (k, B, P, h) of ``targets`` from the session's prompt contexts, every block at once."""
        blocks = list(self.by_block)
        h = torch.stack([s.context[b].detach() if detach else s.context[b] for b in blocks])  # (nb, B, P, D)
        return self.features(h, targets, [blocks.index(t.block) for t in targets] if len(blocks) > 1 else None)

    def _compute_deferred(self, s: Session) -> None:
        """Every target's factors from what a deferred pass recorded: one batched call per width."""
        cur = s.current
        if cur is None or len(s.inputs) < len(self.targets):
            raise RuntimeError("start_steps() in a deferred session before a parallel pass over the prompts")
        targets = self.batch_order
        feats = alpha = None
        if self._needs_features(s.oracle is not None):
            feats = self._session_features(s, targets)
            if self.compression == "slots":
                alpha = self.slot_weights(feats, targets, cur.mask)
        grads = None if s.oracle is None else [s.oracle[t.name][:, : cur.P] for t in targets]
        made = self.factors(targets, [s.inputs[t.name] for t in targets], cur.mask, feats, alpha, grads)
        for t, (u, v, g) in zip(targets, made):
            s.factors[t.name] = (u, v)
            s.synthetic[t.name] = g

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

    def synthetic(self, s: Session) -> dict[str, Tensor]:
        """Δ̂ (B, P, o) per target from the session's prompt contexts H, cut off from the backbone.

        The aux loss's input: as in DNI, the regression trains the synthetic-gradient network only, so a
        jointly trained backbone is not pulled toward states whose prompt gradient is easy to predict.
        Where no gradient reaches H (a frozen backbone) that is the pass's own Δ̂, used as is."""
        if not any(h.requires_grad for h in s.context.values()):
            return {t.name: s.synthetic[t.name] for t in self.targets}
        targets = self.batch_order
        feats = self._session_features(s, targets, detach=True)
        by_out = _groups(targets, "d_out")
        out = {}
        for (_, js), g in zip(by_out, self._synthetic_by_width(feats, by_out)):
            for j, gj in zip(js, g.unbind(0)):
                out[targets[j].name] = gj
        return {t.name: out[t.name] for t in self.targets}

    def aux_loss(self, s: Session | Sequence[Session], true_grads: dict[str, Tensor] | Sequence[dict[str, Tensor]]) -> Tensor:
        """DNI-style regression of Δ̂ (``synthetic``) onto the true prompt gradient (scale-free MSE, mean over layers).

        Sessions over disjoint samples (a list, with a list of their samples' true gradients) pool
        their sums, as one session over all of those samples would."""
        sessions, grads = ([s], [true_grads]) if isinstance(s, Session) else (list(s), list(true_grads))
        return relative_error([self.synthetic(si) for si in sessions], grads, [si.prompt_len for si in sessions])

    def extra_repr(self) -> str:
        return (
            f"targets={len(self.targets) or self.target_patterns}, rank={self.rank}, "
            f"compression={self.compression!r}, mode={self.mode!r}, transform_inputs={self.transform_inputs}"
        )


def relative_error(predicted: Sequence[dict[str, Tensor]], true: Sequence[dict[str, Tensor]],
                   prompt_len: Sequence[Tensor]) -> Tensor:
    """Σ‖Δ̂ − g‖² / Σ‖g‖² over the prompt positions, per target pooled over the groups, then the mean over targets."""
    num = den = 0
    for pred, gi, plen in zip(predicted, true, prompt_len):
        terms = []
        for name, g_hat in pred.items():
            g = gi[name][:, : g_hat.shape[1]]
            mask = (torch.arange(g.shape[1], device=g.device)[None, :] < plen[:, None]).to(g.dtype)[..., None]
            terms.append(torch.stack([((g_hat - g) ** 2 * mask).sum(), (g**2 * mask).sum()]))
        sums = torch.stack(terms)  # (n_targets, 2)
        num, den = num + sums[:, 0], den + sums[:, 1]
    return (num / (den + 1e-12)).mean()


def _zero_linear(d_in: int, d_out: int) -> nn.Linear:
    lin = nn.Linear(d_in, d_out)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def _positions(idx: Sequence[int]) -> slice | list[int]:
    """An index of positions ``idx``: a slice (a view) when they are consecutive."""
    return slice(idx[0], idx[-1] + 1) if list(idx) == list(range(idx[0], idx[-1] + 1)) else list(idx)


def _rows(targets: Sequence[Target]) -> slice | list[int]:
    """Index of the targets' rows in per-target parameters (e_ℓ, slot queries)."""
    return _positions([t.index for t in targets])


def _partition(t: Tensor, groups: list[tuple[int, list[int]]]) -> list[Tensor]:
    """``t[js]`` for each group of positions: one split (a single cat backwards, no zero-filled
    gradient per slice) when the groups are consecutive runs covering ``t``."""
    flat = [j for _, js in groups for j in js]
    if flat == list(range(t.shape[0])):
        return list(t.split([len(js) for _, js in groups])) if len(groups) > 1 else [t]
    return [t[_positions(js)] for _, js in groups]


def _groups(targets: Sequence[Target], width: str) -> list[tuple[int, list[int]]]:
    """(width, positions in ``targets``) for each distinct ``d_in`` / ``d_out`` of the targets."""
    groups: dict[int, list[int]] = {}
    for j, t in enumerate(targets):
        groups.setdefault(getattr(t, width), []).append(j)
    return list(groups.items())


def _in_block(backbone: nn.Module, name: str) -> bool:
    try:
        backbone.block_index(name)
        return True
    except ConfigError:
        return False
