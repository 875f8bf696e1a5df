"""ProSG as a method: the SG head's delta in every step after the prompt (synthetic or true gradients)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor

from prosg.backbones.base import Backbone, BackboneOutput
from prosg.errors import ConfigError
from prosg.methods.base import DropsPromptState, Method, MethodOutput, responses_with_dropout
from prosg.sg.head import SGHead
from prosg.sg.session import Session


class ProSG(DropsPromptState, Method):
    """Prompt synthetic gradients -> a per-sample low-rank delta on the target linears (docs/method.md).

    The head's arguments (targets .. eta_init) are documented on ``SGHead``. ``aux_weight`` > 0 adds
    the DNI-style regression of the synthetic gradient onto the true prompt gradient to the loss.
    ``prompt_state_dropout`` p: in training, a fraction p of the samples run their response from an
    empty state, so only the delta carries their prompt. ``eta_clip`` bounds |η̃| after each step.
    """

    freezes_backbone = True  # the paper's setting: a head on a frozen model
    mode = "synthetic"

    def __init__(
        self,
        targets: Sequence[str] | None = None,
        rank: int = 8,
        compression: str = "slots",
        d_hidden: int = 128,
        d_layer_emb: int = 32,
        transform_inputs: bool = True,
        eta_init: float = 1.0,
        aux_weight: float = 0.0,
        prompt_state_dropout: float = 0.0,
        eta_clip: float | None = None,
    ) -> None:
        super().__init__()
        self.init_dropout(prompt_state_dropout)
        if aux_weight < 0:
            raise ConfigError(f"aux_weight={aux_weight} must be >= 0")
        self.head = SGHead(targets, rank, compression, d_hidden, d_layer_emb, transform_inputs, self.mode, eta_init)
        self.aux_weight, self.eta_clip = aux_weight, eta_clip
        self.max_prompt_len = 0  # longest prompt seen: the rank of a `full` delta

    def attach(self, backbone: Backbone) -> None:
        super().attach(backbone)
        self.head.attach(backbone)
        self.seed_dropout()

    @property
    def name(self) -> str:
        return "oracle" if self.mode == "oracle" else "sg"

    def _true_gradients(self, ids: Tensor, plen: Tensor, answers: Tensor | None = None) -> dict[str, Tensor] | None:
        """∂L_prompt/∂Y per target when the oracle or the aux loss needs them."""
        if self.mode == "oracle" or (self.aux_weight > 0 and self.training):
            return self.head.prompt_gradients(ids, plen, answers if self.loss == "answers" else None)
        return None

    loss = "prompt"  # the prompt loss the true gradient is taken of (Oracle: prompt or answers)

    def forward(self, batch: dict) -> MethodOutput:
        ids, plen = batch["input_ids"], batch["prompt_len"]
        bb = self.backbone
        bb.check_ids(ids, ndim=2)
        self.max_prompt_len = max(self.max_prompt_len, int(plen.max()))
        true = self._true_gradients(ids, plen, batch.get("candidates"))
        drop = self.draw_dropout(ids.shape[0])
        drop = drop.to(ids.device) if drop is not None and drop.any() else None
        oracle = true if self.mode == "oracle" else None
        P = int(plen[0])
        rows: list[Tensor | None] = [None]
        if P < ids.shape[1] and bool((plen == P).all()):
            logits, s = self._prompt_then_response(ids, plen, P, drop, oracle)
            sessions = [s]
        elif drop is None:
            with self.head.session(plen, oracle) as s:
                logits = bb.forward_embeds(bb.embed(ids)).logits
            sessions = [s]
        else:
            logits, sessions, rows = self._forward_with_dropout(ids, plen, drop, true)
        aux = {}
        if true is not None and self.mode == "synthetic":
            grads = [true if r is None else {n: g[r] for n, g in true.items()} for r in rows]
            aux["aux"] = self.aux_weight * self.head.aux_loss(sessions, grads)
        return MethodOutput(logits, aux)

    def _prompt_then_response(self, ids: Tensor, plen: Tensor, P: int, drop: Tensor | None,
                              oracle: dict[str, Tensor] | None) -> tuple[Tensor, Session]:
        """Equal prompts of P tokens: one parallel pass over the prompts records what every target reads,
        every delta is computed at once, then the responses run in parallel from the prompts' state with
        the deltas in place — the generation path, and the numbers of one pass over prompt + response.

        Prompt-state dropout (``drop``, docs/method.md): a jointly trained backbone can keep the prompt in
        its state within the training distances and ignore the delta, which then does not help beyond
        them; samples ``drop`` run their response from an empty state, so only the delta holds their prompt.
        """
        bb = self.backbone
        with self.head.session(plen, oracle, defer=True) as s:
            prompt = bb.forward_embeds(bb.embed(ids[:, :P]))
            s.start_steps()
            resp_ids = ids[:, P:]
            if drop is None:
                resp = bb.forward_embeds(bb.embed(resp_ids), prompt.state).logits
            else:
                resp = responses_with_dropout(bb, resp_ids, prompt.state, drop, s.only)
        return torch.cat([prompt.logits, resp.to(prompt.logits.dtype)], dim=1), s

    def _forward_with_dropout(self, ids: Tensor, plen: Tensor, drop: Tensor, true: dict[str, Tensor] | None
                              ) -> tuple[Tensor, list[Session], list[Tensor]]:
        """Prompt-state dropout with prompts of different lengths: the kept samples run prompt + response in
        one pass (one session); the dropped ones, in another, their prompts, then their responses from an
        empty state. Returns the logits in batch order, the sessions, and the rows each session covers.
        """
        bb = self.backbone
        parts, sessions, groups = [], [], []
        for rows, dropped in (((~drop).nonzero().squeeze(1), False), (drop.nonzero().squeeze(1), True)):
            if not rows.numel():
                continue
            groups.append(rows)
            oracle = {n: g[rows] for n, g in true.items()} if self.mode == "oracle" else None
            with self.head.session(plen[rows], oracle, defer=dropped) as s:
                if dropped:
                    parts.append(self._response_without_state(ids[rows], plen[rows], s))
                else:
                    parts.append(bb.forward_embeds(bb.embed(ids[rows])).logits)
            sessions.append(s)
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)[torch.cat(groups).argsort()]
        return logits, sessions, groups

    def _response_without_state(self, ids: Tensor, plen: Tensor, s: Session) -> Tensor:
        """Logits (n, T, V) of samples whose response runs from an empty state: the prompts (read by the
        deferred session ``s``, which then computes every delta), then the responses with the deltas alone
        holding the prompt."""
        bb = self.backbone
        n, T = ids.shape
        P = int(plen.max())
        logits = bb.forward_embeds(bb.embed(ids[:, :P])).logits  # (n, P, V)
        R = T - int(plen.min())
        if R == 0:
            return logits
        idx = plen[:, None] + torch.arange(R, device=ids.device)  # (n, R) response positions
        valid = idx < T
        # positions past a row's end hold token 0: causal, so they never reach a valid position's logits
        resp = torch.where(valid, ids.gather(1, idx.clamp(max=T - 1)), 0)
        s.start_steps()
        resp_logits = bb.forward_embeds(bb.embed(resp)).logits  # (n, R, V)
        if R == T - P:  # equal prompts: the responses follow them
            return torch.cat([logits, resp_logits.to(logits.dtype)], dim=1)
        # ragged prompts: a row's positions from its own prompt length on are its response's
        out = torch.cat([logits, logits.new_zeros(n, T - P, logits.shape[-1])], dim=1)
        rows = torch.arange(n, device=ids.device)[:, None].expand_as(idx)
        return out.index_put((rows[valid], idx[valid]), resp_logits[valid].to(out.dtype))

    @contextmanager
    def prefill(self, prompt_ids: Tensor, answers: Tensor | None = None) -> Iterator[BackboneOutput]:
        B, P = prompt_ids.shape
        plen = torch.full((B,), P, dtype=torch.long, device=prompt_ids.device)
        self.max_prompt_len = max(self.max_prompt_len, P)
        true = self._true_gradients(prompt_ids, plen, answers) if self.mode == "oracle" else None
        with self.head.session(plen, true, defer=True) as s:
            out = self.backbone(prompt_ids)
            s.start_steps()
            yield BackboneOutput(out.logits[:, -1], out.state)

    def memory_size(self) -> int:
        """U (o x r) and V (i x r) per target; a `full` delta has rank = the longest prompt seen."""
        r = self.max_prompt_len if self.head.compression == "full" else self.head.rank
        return sum(r * (t.d_in + t.d_out) for t in self.head.targets)

    def on_before_optimizer_step(self) -> None:
        if self.eta_clip is not None:
            with torch.no_grad():
                self.head.eta.clamp_(-self.eta_clip, self.eta_clip)


class Oracle(ProSG):
    """True-gradient oracle: Δ̂ replaced by ∂L/∂Y from autograd, same compression and injection (one
    step of test-time training on the prompt, with learned per-layer step sizes). ``loss``: ``prompt``
    = the next-token loss of the whole prompt; ``answers`` = only of the prompt tokens that are the
    sample's answers (``candidates``: recall's values), the part of the prompt the response needs.
    Needs ``trainer.inference_mode: false``."""

    mode = "oracle"

    def __init__(
        self,
        targets: Sequence[str] | None = None,
        rank: int = 8,
        compression: str = "svd",
        eta_init: float = 1.0,
        prompt_state_dropout: float = 0.0,
        eta_clip: float | None = None,
        loss: str = "prompt",
    ) -> None:
        super().__init__(targets, rank, compression, transform_inputs=False, eta_init=eta_init,
                         prompt_state_dropout=prompt_state_dropout, eta_clip=eta_clip)
        if loss not in ("prompt", "answers"):
            raise ConfigError(f"Oracle loss={loss!r}; choose 'prompt' (every prompt token) or 'answers'")
        self.loss = loss
