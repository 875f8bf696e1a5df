"""Baselines that share the module, data and metrics with ProSG: JRT and soft prompts.

(The plain backbone is ``method: plain`` with no head; the attention reference is the ``gpt``
backbone.) Both transform a collated batch (see ``prosg.data``) so that metrics stay aligned
with the original response positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# per-position fields of a collated batch that follow the tokens they annotate
POSITION_FIELDS = ("input_ids", "attention_mask", "answer_kind", "distance", "loss_weight")
FILL = {"attention_mask": False, "answer_kind": 0, "distance": -1, "loss_weight": 0.0}


def repeat_prompt(batch: dict, pad_id: int) -> dict:
    """JRT ("just read twice"): each sample's prompt is repeated before its response."""
    P = batch["prompt_len"]
    T = batch["input_ids"].shape[1]
    new_T = T + int(P.max())
    out = dict(batch)
    for key in POSITION_FIELDS:
        src = batch[key]
        fill = pad_id if key == "input_ids" else FILL[key]
        dst = torch.full((src.shape[0], new_T), fill, dtype=src.dtype, device=src.device)
        for b, p in enumerate(P.tolist()):
            # the second copy is where the original prompt stood; annotations stay with their tokens
            head = src[b, :p] if key in ("input_ids", "attention_mask") else torch.full_like(src[b, :p], fill)
            dst[b, :p] = head
            dst[b, p : p + T] = src[b]
        out[key] = dst
    out["prompt_len"] = 2 * P
    return out


class SoftPrompt(nn.Module):
    """``n_tokens`` learned embeddings placed before every prompt (prefix tuning of the input)."""

    def __init__(self, n_tokens: int, d_model: int, init_from: Tensor | None = None) -> None:
        super().__init__()
        if init_from is not None:  # start from real token embeddings, as Lester et al. recommend
            idx = torch.randint(0, init_from.shape[0], (n_tokens,), generator=torch.Generator().manual_seed(0))
            self.prefix = nn.Parameter(init_from[idx].detach().clone())
        else:
            self.prefix = nn.Parameter(torch.randn(n_tokens, d_model) * 0.02)

    @property
    def n_tokens(self) -> int:
        """Number of prefix positions."""
        return self.prefix.shape[0]

    def prepend(self, embeds: Tensor) -> Tensor:
        """Embeddings (B, L, D) -> (B, n + L, D) with the learned prefix in front."""
        return torch.cat([self.prefix.expand(embeds.shape[0], -1, -1).to(embeds.dtype), embeds], dim=1)
