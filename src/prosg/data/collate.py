"""Collation of examples into the batch every ProSG model and metric reads.

Collated batch (prompt + response concatenated, right-padded):
    input_ids (B, T) long, prompt_len (B,) long, attention_mask (B, T) bool,
    answer_kind (B, T) long, distance (B, T) long, loss_weight (B, T) float  (aligned with input_ids;
    prompt and padding positions: kind 0, distance -1, weight 0; position t's label is
    input_ids[:, t], predicted from logits at t-1), task list[str], n_facts (B,) long, index (B,) long,
    candidates (B, K) long: the prompt's answer set (the ids a model that remembers *which* answers the
    prompt held, but not where each belongs, would choose among; -1 padding, all -1 when the data has
    none), chance (B,) float: the accuracy of a uniform guess over the task's answers (NaN if unknown).

The per-example fields are described in ``prosg.data.tasks``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from prosg.errors import DataError

# The (B, T) fields: one value per token of input_ids (what a method that moves tokens must move alike).
POSITION_FIELDS = ("input_ids", "attention_mask", "answer_kind", "distance", "loss_weight")


def collate(examples: Sequence[dict[str, Any]], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Examples -> a right-padded batch dict of tensors (the batch contract in this module's docstring)."""
    if not examples:
        raise DataError("cannot collate an empty list of examples")
    b = len(examples)
    plens = [len(ex["prompt_ids"]) for ex in examples]
    rlens = [len(ex["response_ids"]) for ex in examples]
    t_max = max(p + r for p, r in zip(plens, rlens))
    t_max = int(math.ceil(t_max / pad_to_multiple_of) * pad_to_multiple_of)
    n_cand = max(1, max(len(ex.get("candidates", ())) for ex in examples))

    # Rows are padded as Python lists and converted once per field: one tensor per example and field
    # costs more than generating the example (the data loader runs on the training thread).
    def rows(fill: Any, prompt_fill: Any, key: str | None, width: int = t_max) -> list[list[Any]]:
        out = []
        for ex, p, r in zip(examples, plens, rlens):
            head = ex["prompt_ids"] + ex["response_ids"] if key is None else [prompt_fill] * p + list(ex[key])
            out.append(head + [fill] * (width - p - r))
        return out

    cands = [list(ex.get("candidates", ())) for ex in examples]
    return {
        "input_ids": torch.tensor(rows(pad_id, None, None), dtype=torch.long).view(b, t_max),
        "prompt_len": torch.tensor(plens, dtype=torch.long),
        "attention_mask": torch.tensor([[True] * (p + r) + [False] * (t_max - p - r) for p, r in zip(plens, rlens)],
                                       dtype=torch.bool).view(b, t_max),
        "answer_kind": torch.tensor(rows(0, 0, "answer_kind"), dtype=torch.long).view(b, t_max),
        "distance": torch.tensor(rows(-1, -1, "distance"), dtype=torch.long).view(b, t_max),
        "loss_weight": torch.tensor(rows(0.0, 0.0, "loss_weight"), dtype=torch.float32).view(b, t_max),
        "task": [ex["task"] for ex in examples],
        "n_facts": torch.tensor([int(ex["n_facts"]) for ex in examples], dtype=torch.long),
        "index": torch.tensor([int(ex["meta"]["index"]) for ex in examples], dtype=torch.long),
        "candidates": torch.tensor([c + [-1] * (n_cand - len(c)) for c in cands], dtype=torch.long).view(b, n_cand),
        "chance": torch.tensor([float(ex.get("chance", math.nan)) for ex in examples], dtype=torch.float32),
    }


class Collator:
    """Picklable ``collate_fn`` (DataLoader workers may be spawned) bound to a pad id."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate(examples, self.pad_id, self.pad_to_multiple_of)

