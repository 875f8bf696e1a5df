"""Recurrent decoding with per-step hooks: greedy, temperature, top-k / top-p, stop tokens.

The prompt is read once in parallel by the method (which is also when an SG head computes each
sample's delta); every new token is then one O(1) ``step`` of the backbone with the deltas in place.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from prosg.backbones.base import Backbone
from prosg.errors import ConfigError
from prosg.methods import Method, Plain

# A step hook sees (step index, logits (B, V)) and may return replacement logits.
StepHook = Callable[[int, Tensor], Tensor | None]


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row of logits (B, V): greedy at temperature 0, else filtered sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def as_method(model: Backbone | Method) -> Method:
    """A method to generate with: a bare backbone becomes the plain method."""
    if isinstance(model, Method):
        return model
    if isinstance(model, Backbone):
        method = Plain()
        method.attach(model)
        return method
    raise ConfigError(f"generate() takes a Backbone or a Method (from prosg.methods), got {type(model).__name__}")


@torch.no_grad()
def generate(
    model: Backbone | Method,
    prompt_ids: Tensor,
    max_new_tokens: int,
    *,
    forced: Tensor | None = None,
    answers: Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    hooks: Iterable[StepHook] = (),
    on_token: Callable[[Tensor], None] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue equal-length prompts (B, P) by up to ``max_new_tokens``; returns the new tokens (B, T).

    ``model`` is a backbone (plain decoding) or a method attached to one (its prompt handling and
    whatever it keeps, e.g. the SG delta, apply to every step). ``forced`` (B, F): tokens fed after
    the prompt before sampling starts (teacher-forced text that is not part of the prompt: it reaches
    the model like generated tokens, through the state, with the delta in place). ``answers`` (B, K):
    the samples' answer sets, for methods that read them (the oracle's ``answers`` loss). Rows that emit a stop id keep
    emitting it (so the output stays rectangular); decoding ends early once every row has stopped.
    ``on_token`` receives each new column (B,) for streaming.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ConfigError(f"generate() needs a non-empty batch of prompts (B, P), got {tuple(prompt_ids.shape)}")
    method = as_method(model)
    backbone = method.backbone
    B = prompt_ids.shape[0]
    hooks = list(hooks)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=prompt_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    backbone.check_ids(prompt_ids, ndim=2)
    out = []
    with method.prefill(prompt_ids, answers) as res:
        logits, state = res.logits, res.state
        if forced is not None and forced.shape[1]:
            res = backbone(forced, state)
            logits, state = res.logits[:, -1], res.state
        for t in range(max_new_tokens):
            for hook in hooks:
                new = hook(t, logits)
                logits = logits if new is None else new
            token = sample_next(logits, temperature, top_k, top_p, generator)
            if stop.numel():
                token = torch.where(done, stop[0], token)
                done |= torch.isin(token, stop)
            out.append(token)
            if on_token is not None:
                on_token(token)
            if stop.numel() and bool(done.all()):
                break
            res = backbone.step(token, state)
            logits, state = res.logits, res.state
    return torch.stack(out, dim=1) if out else prompt_ids.new_zeros(B, 0)
