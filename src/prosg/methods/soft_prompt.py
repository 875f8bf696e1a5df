"""Soft prompt tuning (Lester et al. 2021): learned embeddings before every prompt, backbone frozen."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from prosg.backbones.base import Backbone, BackboneOutput
from prosg.errors import ConfigError
from prosg.methods.base import Method, MethodOutput


class SoftPrompt(Method):
    """``n_tokens`` learned input embeddings placed before every prompt."""

    freezes_backbone = True
    needs_frozen_backbone = True

    def __init__(self, n_tokens: int = 16) -> None:
        super().__init__()
        if n_tokens < 1:
            raise ConfigError(f"soft prompt n_tokens={n_tokens} must be >= 1")
        self.n_tokens = n_tokens

    def attach(self, backbone: Backbone) -> None:
        super().attach(backbone)
        with torch.no_grad():  # start from real token embeddings, as Lester et al. recommend
            vocab = backbone.embed(torch.arange(backbone.vocab_size, device=next(backbone.parameters()).device))
        idx = torch.randint(0, vocab.shape[0], (self.n_tokens,), generator=torch.Generator().manual_seed(0))
        self.prefix = nn.Parameter(vocab[idx].detach().clone())

    def prepend(self, embeds: Tensor) -> Tensor:
        """Embeddings (B, L, D) -> (B, n + L, D) with the learned prefix in front."""
        return torch.cat([self.prefix.expand(embeds.shape[0], -1, -1).to(embeds.dtype), embeds], dim=1)

    def forward(self, batch: dict) -> MethodOutput:
        bb = self.backbone
        bb.check_ids(batch["input_ids"], ndim=2)
        logits = bb.forward_embeds(self.prepend(bb.embed(batch["input_ids"]))).logits
        return MethodOutput(logits[:, self.n_tokens :])

    @contextmanager
    def prefill(self, prompt_ids: Tensor, answers: Tensor | None = None) -> Iterator[BackboneOutput]:
        bb = self.backbone
        bb.check_ids(prompt_ids, ndim=2)
        out = bb.forward_embeds(self.prepend(bb.embed(prompt_ids)))
        yield BackboneOutput(out.logits[:, -1], out.state)
