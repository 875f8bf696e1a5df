"""The ``Method`` seam: how a batch runs through a backbone, in training and in generation.

A method is everything that distinguishes one row of the comparison from another on the same
backbone and data: the plain model, JRT, a soft prompt, the ProSG head (synthetic or true
gradients), and whatever comes next. ``ProSGModule`` and ``generate()`` only call this interface:

    method.attach(backbone)                 # once: build parameters that depend on the backbone
    batch = method.prepare(batch, pad_id)   # e.g. JRT repeats the prompt (annotations follow tokens)
    out = method(batch)                     # teacher-forced: out.logits (B, T, V), out.aux {name: loss}
    with method.prefill(prompt_ids) as o:   # generation: read the prompts, o.logits (B, V), o.state;
        backbone.step(...)                  #   whatever the method keeps (a delta) stays in place inside
    method.memory_size()                    # extra numbers per sample it holds while generating
    method.extra_state()                    # non-parameter state a checkpoint carries (load_extra_state)

A method owns its trainable parameters (they are its submodules) and says whether it trains on a
frozen backbone by default (``freezes_backbone``) or only on one (``needs_frozen_backbone``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, ClassVar, ContextManager, Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from prosg.backbones.base import Backbone, BackboneOutput, State
from prosg.errors import ConfigError


@dataclass
class MethodOutput:
    """Teacher-forced logits aligned with the (prepared) batch, and weighted auxiliary losses."""

    logits: Tensor  # (B, T, V)
    aux: dict[str, Tensor] = field(default_factory=dict)  # name -> term added to the training loss


class Method(nn.Module):
    """Base class and the plain model: the backbone alone, prompt and response in one pass."""

    freezes_backbone: ClassVar[bool] = False  # default of model.freeze_backbone when unset
    needs_frozen_backbone: ClassVar[bool] = False  # a config that trains the backbone is an error

    def __init__(self) -> None:
        super().__init__()
        self._backbone: list[Backbone] = []  # a list, so the backbone is not registered as a submodule

    def attach(self, backbone: Backbone) -> None:
        """Bind to ``backbone`` and build the parameters that depend on it."""
        if self._backbone:
            raise RuntimeError(f"this {type(self).__name__} is already attached to a backbone")
        self._backbone = [backbone]

    @property
    def backbone(self) -> Backbone:
        """The backbone this method runs on."""
        if not self._backbone:
            raise RuntimeError(f"{type(self).__name__}.attach(backbone) has not been called")
        return self._backbone[0]

    @property
    def name(self) -> str:
        """Short name for tables and checkpoints."""
        return type(self).__name__

    def prepare(self, batch: dict, pad_id: int) -> dict:
        """The batch this method trains and is scored on (identity unless it rewrites the input)."""
        return batch

    def forward(self, batch: dict) -> MethodOutput:
        """Teacher-forced logits for ``batch['input_ids']`` (B, T) with prompts of ``batch['prompt_len']``."""
        return MethodOutput(self.backbone(batch["input_ids"]).logits)

    @contextmanager
    def prefill(self, prompt_ids: Tensor, answers: Tensor | None = None) -> Iterator[BackboneOutput]:
        """Read equal-length prompts (B, P); yield the last position's logits (B, V) and the state.

        Steps taken inside the ``with`` block see whatever the method keeps for these prompts.
        ``answers`` (B, K): the samples' answer sets, for methods that use them (the oracle's loss).
        """
        out = self.backbone(prompt_ids)
        yield BackboneOutput(out.logits[:, -1], out.state)

    def memory_size(self) -> int:
        """Numbers per sample the method holds during generation beyond the backbone's state."""
        return 0

    def on_before_optimizer_step(self) -> None:
        """Hook for constraints on the method's parameters (e.g. clamping step sizes)."""

    def extra_state(self) -> dict:
        """What a checkpoint must carry beyond the parameters for a resumed run to continue identically
        (e.g. a random generator's state); ``load_extra_state`` restores it."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what ``extra_state`` returned (a checkpoint from before it existed gives {})."""


class DropsPromptState:
    """Mixin for a method that keeps the prompt outside the recurrent state (ProSG's delta, GPC's writes):
    prompt-state dropout p. In training a fraction p of the samples run their response from an empty state, so
    only what the method keeps carries their prompt (docs/method.md). It has no meaning for a method whose prompt
    lives only in the state (plain, JRT, a soft prompt): emptying the state would remove the prompt itself.

    The draws come from the method's own generator, seeded from the run's seed at ``attach`` and saved in
    checkpoints (``extra_state``), so a resumed run drops the samples the uninterrupted one would."""

    prompt_state_dropout: float = 0.0
    training: bool

    def init_dropout(self, p: float) -> None:
        """Set p (checked: in [0, 1))."""
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"prompt_state_dropout={p} must be in [0, 1)")
        self.prompt_state_dropout = p

    def seed_dropout(self) -> None:
        """(Re)start the draws from the run's seed; torch.initial_seed() reads it without consuming the global stream."""
        self.dropout_generator = torch.Generator().manual_seed(torch.initial_seed())

    def extra_state(self) -> dict:
        return {"dropout_generator": self.dropout_generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        if "dropout_generator" in state:
            self.dropout_generator.set_state(state["dropout_generator"])

    def draw_dropout(self, batch_size: int) -> Tensor | None:
        """The samples whose prompt state is dropped in this training step (None: no dropout now)."""
        if not (self.training and self.prompt_state_dropout > 0):
            return None
        return torch.rand(batch_size, generator=self.dropout_generator) < self.prompt_state_dropout


def responses_with_dropout(backbone: Backbone, resp_ids: Tensor, state: State, drop: Tensor,
                           only: Callable[[Tensor], ContextManager]) -> Tensor:
    """Response logits (B, R, V) under prompt-state dropout: rows ``drop`` (B,) from an empty state, the others from
    ``state`` (the prompts'); ``only(rows)`` narrows what the method adds in a pass to those rows."""
    bb = backbone
    empty = bb.init_state(resp_ids.shape[0], resp_ids.device)
    if [t.shape for t in tree_leaves(state)] == [t.shape for t in tree_leaves(empty)]:  # a fixed-size state
        state = tree_map(lambda t, e: torch.where(drop.view(-1, *[1] * (t.dim() - 1)), e.to(t.dtype), t), state, empty)
        return bb.forward_embeds(bb.embed(resp_ids), state).logits
    # a state that grows with the sequence (a KV cache) cannot be emptied row by row: two passes
    keep, cut = (~drop).nonzero().squeeze(1), drop.nonzero().squeeze(1)
    parts = []
    if keep.numel():
        with only(keep):
            parts.append(bb.forward_embeds(bb.embed(resp_ids[keep]), tree_map(lambda t: t[keep], state)).logits)
    with only(cut):
        parts.append(bb.forward_embeds(bb.embed(resp_ids[cut])).logits)
    return torch.cat(parts)[torch.cat([keep, cut]).argsort()]


class Plain(Method):
    """The backbone alone (with the ``gpt`` backbone: the attention reference)."""
