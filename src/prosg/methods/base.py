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
from typing import ClassVar, Iterator

from torch import Tensor, nn

from prosg.backbones.base import Backbone, BackboneOutput


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


class Plain(Method):
    """The backbone alone (with the ``gpt`` backbone: the attention reference)."""
