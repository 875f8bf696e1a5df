"""The interface every backbone family implements (Mamba, RWKV-7, RWKV-4, gpt, LSTM; docs/backbones.md).

A backbone maps token ids to logits and carries a recurrent state:

    out = model(input_ids, state=None)      # out.logits (B, L, V), out.state
    out = model.step(token_ids, out.state)  # out.logits (B, V),    out.state

A state is a pytree (tuples/lists) of tensors, every tensor batch-first, so generic code
can index, reorder or concatenate states without knowing the family.

Families implement ``embed``, ``forward_embeds`` and ``step_embeds``; the public ``forward``
and ``step`` validate ids and go through the embedding, so soft prompts can feed embeddings
directly. ``blocks`` are the residual blocks: the first positional argument of a block's
``forward`` is the residual stream entering it, which the SG head reads as context.
Target linears are reached by name (``target_linears``) and are always invoked as modules
(``linear(x)``), so forward hooks on them see every token in parallel and step mode.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from prosg.errors import ConfigError

State = Any  # pytree of batch-first tensors


@dataclass
class BackboneOutput:
    """Logits and the recurrent state after the last token."""

    logits: Tensor  # (B, L, V) from forward, (B, V) from step
    state: State


class Backbone(nn.Module):
    """Base class: id validation, target-linear lookup and config bookkeeping."""

    family: ClassVar[str] = ""

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(config)
        self.vocab_size: int = int(config["vocab_size"])

    # -- to implement per family -------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        """Token ids (B, L) -> input embeddings (B, L, D)."""
        raise NotImplementedError

    def forward_embeds(self, x: Tensor, state: State | None = None) -> BackboneOutput:
        """Parallel forward over embeddings (B, L, D) from ``state`` (None = initial)."""
        raise NotImplementedError

    def step_embeds(self, x: Tensor, state: State) -> BackboneOutput:
        """One token's embedding (B, D) -> logits (B, V) and the next state.

        Default: a length-1 parallel forward (O(1) for a recurrent family); families with a
        cheaper single-token recurrence (Mamba's step kernels) override it.
        """
        out = self.forward_embeds(x[:, None], state)
        return BackboneOutput(out.logits[:, 0], out.state)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """The state before any token (zeros, or what the family starts from)."""
        raise NotImplementedError

    def state_placement(self, device: torch.device | str | None) -> tuple[torch.device | str, torch.dtype, torch.dtype]:
        """(device, weight dtype, carry dtype) of a fresh state: the weights' device unless given, and at
        least fp32 for what a recurrence accumulates (a bf16 running sum drifts over long sequences)."""
        p = next(self.parameters())
        return (device if device is not None else p.device), p.dtype, torch.promote_types(p.dtype, torch.float32)

    @property
    def blocks(self) -> nn.ModuleList:
        """The residual blocks, in order."""
        raise NotImplementedError

    def state_size(self, seq_len: int = 0) -> int:
        """Numbers the state carries per sample after ``seq_len`` tokens (as Zoology reports a mixer's state).

        A recurrent state has a fixed size, counted here from ``init_state``; a family whose
        state grows with the sequence (the gpt KV cache) overrides this.
        """
        with torch.device("meta"):
            leaves = torch.utils._pytree.tree_leaves(self.init_state(1, device="meta"))
        return sum(t[0].numel() for t in leaves)

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(self.config["d_model"])

    # -- shared ------------------------------------------------------------------------
    def run_blocks(self, x: Tensor, state: State | None, per_layer: int) -> tuple[Tensor, State]:
        """Residual stream x through every block, each ``block(x, layer_state) -> (x, next layer_state)``.

        ``state`` (None = ``init_state``) holds ``per_layer`` tensors per layer; returns the stream
        after the last block and the new state (a tuple over layers).
        """
        if state is None:
            state = self.init_state(x.shape[0], x.device)
        check_state(self, state, per_layer)
        new_state = []
        for block, layer_state in zip(self.blocks, state):
            x, layer_state = block(x, layer_state)
            new_state.append(layer_state)
        return x, tuple(new_state)

    def forward(self, input_ids: Tensor, state: State | None = None) -> BackboneOutput:
        """Token ids (B, L) -> logits (B, L, V) and the state after the last token."""
        self.check_ids(input_ids, ndim=2)
        return self.forward_embeds(self.embed(input_ids), state)

    def step(self, token_ids: Tensor, state: State) -> BackboneOutput:
        """One token per sample (B,) -> logits (B, V) and the next state; O(1) in history."""
        self.check_ids(token_ids, ndim=1)
        return self.step_embeds(self.embed(token_ids), state)

    def check_ids(self, ids: Tensor, ndim: int) -> None:
        """Reject ids of the wrong shape, dtype or range with a message naming the fix."""
        if ids.dim() != ndim or ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
            shape = "(B, L)" if ndim == 2 else "(B,)"
            raise ConfigError(
                f"{type(self).__name__} expects integer token ids of shape {shape}, got "
                f"{tuple(ids.shape)} {ids.dtype}."
            )
        if ids.numel() and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            raise ConfigError(
                f"token id {int(ids.max()) if int(ids.max()) >= self.vocab_size else int(ids.min())} "
                f"is outside the vocabulary [0, {self.vocab_size}) of this "
                f"{type(self).__name__}; use the tokenizer the model was built for, or build "
                f"the model with vocab_size >= {int(ids.max()) + 1}."
            )

    def linear_names(self) -> list[str]:
        """Qualified names of every nn.Linear in the model (candidates for a delta)."""
        return [n for n, m in self.named_modules() if isinstance(m, nn.Linear)]

    def target_linears(self, patterns: Sequence[str] | str) -> dict[str, nn.Linear]:
        """Linears whose name matches a glob (full name, or a suffix like ``mixer.in_proj``)."""
        if isinstance(patterns, str):
            patterns = [patterns]
        modules = dict(self.named_modules())
        names = self.linear_names()
        found: dict[str, nn.Linear] = {}
        for pattern in patterns:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, "*." + pattern)]
            if not hits:
                short = sorted({_generic_name(n) for n in names})
                raise ConfigError(
                    f"target pattern {pattern!r} matches no linear layer of {type(self).__name__}. "
                    f"Available (block index as *): {', '.join(short)}"
                )
            for n in hits:
                found[n] = modules[n]
        return dict(sorted(found.items(), key=lambda kv: names.index(kv[0])))

    def block_index(self, module_name: str) -> int:
        """Index of the block that contains the named module."""
        prefix = {id(b): i for i, b in enumerate(self.blocks)}
        modules = dict(self.named_modules())
        parts = module_name.split(".")
        for k in range(len(parts), 0, -1):
            m = modules.get(".".join(parts[:k]))
            if m is not None and id(m) in prefix:
                return prefix[id(m)]
        raise ConfigError(f"module {module_name!r} is not inside any block of {type(self).__name__}")

    def save_pretrained(self, directory: str) -> None:
        """Save config + weights so ``from_pretrained(directory)`` rebuilds this model."""
        from prosg.backbones.native import save_native

        save_native(self, directory)

    def num_parameters(self) -> int:
        """Total parameter count."""
        return sum(p.numel() for p in self.parameters())


def check_state(model: Backbone, state: State, per_layer: int) -> None:
    """Reject a state from another model (a tuple of ``per_layer`` tensors per layer) with a message naming the fix."""
    n_layer = model.config["n_layer"]
    if len(state) != n_layer or any(len(s) != per_layer for s in state):
        raise ConfigError(
            f"{type(model).__name__} state must hold {n_layer} layers of {per_layer} tensors, got "
            f"{len(state)} entries; pass the state returned by this model, or model.init_state(batch_size)."
        )


def _generic_name(name: str) -> str:
    return ".".join("*" if p.isdigit() else p for p in name.split("."))
