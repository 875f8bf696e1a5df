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
    lens = [len(ex["prompt_ids"]) + len(ex["response_ids"]) for ex in examples]
    t_max = max(lens)
    t_max = int(math.ceil(t_max / pad_to_multiple_of) * pad_to_multiple_of)
    b = len(examples)
    input_ids = torch.full((b, t_max), pad_id, dtype=torch.long)
    answer_kind = torch.zeros((b, t_max), dtype=torch.long)
    distance = torch.full((b, t_max), -1, dtype=torch.long)
    loss_weight = torch.zeros((b, t_max), dtype=torch.float32)
    attention_mask = torch.zeros((b, t_max), dtype=torch.bool)
    prompt_len = torch.empty(b, dtype=torch.long)
    n_cand = max(1, max(len(ex.get("candidates", ())) for ex in examples))
    candidates = torch.full((b, n_cand), -1, dtype=torch.long)
    chance = torch.tensor([float(ex.get("chance", math.nan)) for ex in examples], dtype=torch.float32)
    for i, ex in enumerate(examples):
        cand = ex.get("candidates", ())
        if cand:
            candidates[i, : len(cand)] = torch.tensor(cand, dtype=torch.long)
        p, r = len(ex["prompt_ids"]), len(ex["response_ids"])
        input_ids[i, : p + r] = torch.tensor(ex["prompt_ids"] + ex["response_ids"], dtype=torch.long)
        answer_kind[i, p : p + r] = torch.tensor(ex["answer_kind"], dtype=torch.long)
        distance[i, p : p + r] = torch.tensor(ex["distance"], dtype=torch.long)
        loss_weight[i, p : p + r] = torch.tensor(ex["loss_weight"], dtype=torch.float32)
        attention_mask[i, : p + r] = True
        prompt_len[i] = p
    return {
        "input_ids": input_ids,
        "prompt_len": prompt_len,
        "attention_mask": attention_mask,
        "answer_kind": answer_kind,
        "distance": distance,
        "loss_weight": loss_weight,
        "task": [ex["task"] for ex in examples],
        "n_facts": torch.tensor([int(ex["n_facts"]) for ex in examples], dtype=torch.long),
        "index": torch.tensor([int(ex["meta"]["index"]) for ex in examples], dtype=torch.long),
        "candidates": candidates,
        "chance": chance,
    }


class Collator:
    """Picklable ``collate_fn`` (DataLoader workers may be spawned) bound to a pad id."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate(examples, self.pad_id, self.pad_to_multiple_of)

