"""ProSG as a method: the SG head's delta in every step after the prompt (synthetic or true gradients)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor

from prosg.backbones.base import Backbone, BackboneOutput
from prosg.errors import ConfigError
from prosg.methods.base import Method, MethodOutput
from prosg.sg.head import Session, SGHead


class ProSG(Method):
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
        if not 0.0 <= prompt_state_dropout < 1.0:
            raise ConfigError(f"prompt_state_dropout={prompt_state_dropout} must be in [0, 1)")
        if aux_weight < 0:
            raise ConfigError(f"aux_weight={aux_weight} must be >= 0")
        self.head = SGHead(targets, rank, compression, d_hidden, d_layer_emb, transform_inputs, self.mode, eta_init)
        self.aux_weight, self.prompt_state_dropout, self.eta_clip = aux_weight, prompt_state_dropout, eta_clip
        self.max_prompt_len = 0  # longest prompt seen: the rank of a `full` delta

    def attach(self, backbone: Backbone) -> None:
        super().attach(backbone)
        self.head.attach(backbone)

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
        with self.head.session(plen, true if self.mode == "oracle" else None) as s:
            logits = bb.forward_embeds(bb.embed(ids)).logits
            p = self.prompt_state_dropout
            if self.training and p > 0:
                drop = torch.rand(ids.shape[0], device=ids.device) < p
                if drop.any():
                    logits = self._response_without_state(ids, plen, logits, drop, s)
        aux = {}
        if true is not None and self.mode == "synthetic":
            aux["aux"] = self.aux_weight * self.head.aux_loss(s, true)
        return MethodOutput(logits, aux)

    def _response_without_state(self, ids: Tensor, plen: Tensor, logits: Tensor, drop: Tensor, s: Session) -> Tensor:
        """Re-run the responses of samples ``drop`` from an empty state with only the delta holding the prompt.

        Prompt-state dropout: a jointly trained backbone can keep the prompt in its state within the
        training distances and ignore the delta, which then does not help beyond them. Cutting the
        state for some samples makes the delta carry the prompt; the other samples keep both paths.
        """
        rows = drop.nonzero().squeeze(1)  # (n,)
        T = ids.shape[1]
        R = int(T - plen[rows].min())
        idx = plen[rows, None] + torch.arange(R, device=ids.device)  # (n, R) response positions
        valid = idx < T
        # positions past a row's end hold token 0: causal, so they never reach a valid position's logits
        resp = torch.where(valid, ids[rows].gather(1, idx.clamp(max=T - 1)), 0)
        s.start_steps()
        s.select(rows)
        bb = self.backbone
        resp_logits = bb.forward_embeds(bb.embed(resp)).logits  # (n, R, V)
        out = logits.clone()
        out[rows[:, None].expand_as(idx)[valid], idx[valid]] = resp_logits[valid].to(out.dtype)
        return out

    @contextmanager
    def prefill(self, prompt_ids: Tensor, answers: Tensor | None = None) -> Iterator[BackboneOutput]:
        B, P = prompt_ids.shape
        plen = torch.full((B,), P, dtype=torch.long, device=prompt_ids.device)
        self.max_prompt_len = max(self.max_prompt_len, P)
        true = self._true_gradients(prompt_ids, plen, answers) if self.mode == "oracle" else None
        with self.head.session(plen, true) as s:
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
