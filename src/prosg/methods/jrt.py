"""JRT ("just read twice", Arora et al. 2024): the prompt is repeated before the response."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from prosg.backbones.base import BackboneOutput
from prosg.data.collate import POSITION_FIELDS
from prosg.methods.base import Method

# per-position fields of a collated batch that follow the tokens they annotate
FILL = {"attention_mask": False, "answer_kind": 0, "distance": -1, "loss_weight": 0.0}


def repeat_prompt(batch: dict, pad_id: int) -> dict:
    """Each sample's prompt is repeated before its response; annotations stay with their tokens."""
    P = batch["prompt_len"]
    T = batch["input_ids"].shape[1]
    new_T = T + int(P.max())
    out = dict(batch)
    for key in POSITION_FIELDS:
        if key not in batch:
            continue
        src = batch[key]
        fill = pad_id if key == "input_ids" else FILL[key]
        dst = torch.full((src.shape[0], new_T), fill, dtype=src.dtype, device=src.device)
        for b, p in enumerate(P.tolist()):
            # the second copy is where the original prompt stood
            head = src[b, :p] if key in ("input_ids", "attention_mask") else torch.full_like(src[b, :p], fill)
            dst[b, :p] = head
            dst[b, p : p + T] = src[b]
        out[key] = dst
    out["prompt_len"] = 2 * P
    return out


class JRT(Method):
    """The prompt read twice: training, scoring and generation all see ``prompt prompt response``."""

    def prepare(self, batch: dict, pad_id: int) -> dict:
        return repeat_prompt(batch, pad_id)

    @contextmanager
    def prefill(self, prompt_ids: Tensor, answers: Tensor | None = None) -> Iterator[BackboneOutput]:
        with super().prefill(torch.cat([prompt_ids, prompt_ids], dim=1), answers) as out:
            yield out
