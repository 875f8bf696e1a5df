"""Global Prompt Cell (GPC, Liu et al. 2023), rebuilt for decoders: a soft prompt plus a gated prompt memory per block.

GPC is "a portable control module for prompt tuning that selectively preserves prompt information
across all encoder layers". Here, on a frozen decoder backbone with blocks 0..N-1:

* ``n_tokens`` learned embeddings are placed before every prompt (``SoftPrompt``, whose code this reuses);
  sample b's prompt is then its first p_b = n + prompt_len[b] positions;
* entering block ℓ, with x̂_t = LayerNorm(x_t) (no affine: the residual stream's scale grows with depth),
  the prompt is summarised by attention pooling over its positions with a learned query q_ℓ
  (zero at init, so it starts as the mean over the prompt, soft tokens included):
      s_ℓ = Σ_{t < p_b} a_t x̂_t,   a = softmax_t(q_ℓ · x̂_t / √D);
* one gated cell, shared by all blocks and told apart by a layer embedding e_ℓ (an LSTM over depth,
  as GPC runs its cell across layers), keeps a prompt memory m_ℓ ∈ R^{d_cell}, m_{-1} = 0:
      z = [s_ℓ, m_{ℓ-1}, e_ℓ],  i = σ(W_i z + b_i),  f = σ(W_f z + b_f),  c̃ = tanh(W_c z + b_c),
      m_ℓ = f ⊙ m_{ℓ-1} + i ⊙ c̃;
* the memory is written into the residual stream of every position after the prompt, at the input of
  block ℓ: x_t ← x_t + W_o,ℓ m_ℓ for t ≥ p_b, with W_o,ℓ zero at init, so a fresh GPC computes exactly
  what plain prompt tuning with the same prefix computes.

Prompt positions never receive a write, so one parallel pass is exact (the memories depend only on the
prompt). In generation (``prefill``) the memories come from the prompt pass and the n_layer vectors
w_ℓ = W_o,ℓ m_ℓ (B, D) are added to every later token at every block: where ProSG keeps the prompt in a
rank-r change of the linear layers, GPC keeps it in a per-layer vector added to the residual stream.
Parameters: the prefix, q_ℓ, W_o,ℓ and e_ℓ per block, one shared cell (W_{i,f,c}, b_{i,f,c}).
Prompt-state dropout (as ProSG's; ``DropsPromptState``): in training a fraction of the samples run their
response from an empty state with the writes in place, so only the writes carry their prompt.
The injection goes through forward pre-hooks on ``backbone.blocks`` (and a patched ``block.step`` on a
family that steps its blocks through that method: Mamba), so any backbone works.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prosg.backbones.base import Backbone, BackboneOutput
from prosg.errors import ConfigError
from prosg.methods.base import DropsPromptState, MethodOutput, responses_with_dropout
from prosg.methods.soft_prompt import SoftPrompt
from prosg.sg.inject import MethodPatch

# (block, args) -> replacement args or None, like a forward pre-hook
BlockHook = Callable[[nn.Module, tuple], "tuple | None"]


@dataclass
class CellSession:
    """Per-batch state the block hooks share."""

    prompt_len: Tensor  # (B,) prompt positions per sample, soft tokens included
    memory: list[Tensor] = field(default_factory=list)  # m_ℓ (B, d_cell) of the blocks passed so far
    writes: list[Tensor] = field(default_factory=list)  # W_o,ℓ m_ℓ (B, D): what every later position gets
    stepping: bool = False  # every forward is after the prompt (generated or forced tokens)
    handles: list[Any] = field(default_factory=list)
    masks: dict[int, tuple[int, Tensor, Tensor]] = field(default_factory=dict)  # L -> (P, prompt, after)

    def positions(self, L: int, device: torch.device) -> tuple[int, Tensor, Tensor]:
        """For a pass over L positions: P prompt positions read, the (B, P) prompt mask and the (B, L) mask of the
        positions after the prompt; made once per pass length, not at every block (a host sync each on GPU)."""
        if L not in self.masks:
            P = int(self.prompt_len.max().clamp(max=L))
            pos = torch.arange(L, device=device)[None, :]
            self.masks[L] = (P, pos[:, :P] < self.prompt_len[:, None], pos >= self.prompt_len[:, None])
        return self.masks[L]

    @contextmanager
    def only(self, rows: Tensor) -> Iterator[None]:
        """Within the block, the writes are those of samples ``rows`` (restored after)."""
        kept = self.writes
        self.writes = [w[rows] for w in kept]
        try:
            yield
        finally:
            self.writes = kept

    def start_steps(self, n_blocks: int) -> None:
        """From now on every call is after the prompt: add the stored writes everywhere."""
        if len(self.writes) != n_blocks:
            raise RuntimeError("start_steps() before a prompt pass computed the prompt memories")
        self.stepping = True


def step_patch(block: nn.Module, hook: BlockHook) -> MethodPatch:
    """Runs ``hook`` on the arguments of ``block.step`` until the patch is removed."""
    original = block.step

    def step(*args: Any, **kwargs: Any) -> Any:
        new = hook(block, args)
        return original(*(args if new is None else new), **kwargs)

    return MethodPatch(block, step, name="step")


def hook_block_inputs(block: nn.Module, hook: BlockHook) -> list[Any]:
    """Run ``hook`` on the residual stream entering ``block`` in parallel and step mode; removable handles."""
    handles = [block.register_forward_pre_hook(hook)]
    if callable(getattr(block, "step", None)):  # Mamba steps a block with block.step(x (B, D), state), not forward
        handles.append(step_patch(block, hook))
    return handles


class GlobalPromptCell(DropsPromptState, SoftPrompt):
    """Soft prompt + a gated prompt memory carried across blocks and added after the prompt (module docstring).

    ``n_tokens``: prefix length; ``d_cell``: width of the memory (None = d_model); ``d_layer_emb``:
    width of the layer embedding that tells the shared cell which block it is at; ``prompt_state_dropout``: the
    fraction of training samples whose response runs from an empty state (``DropsPromptState``).
    """

    def __init__(self, n_tokens: int = 16, d_cell: int | None = None, d_layer_emb: int = 16,
                 prompt_state_dropout: float = 0.0) -> None:
        super().__init__(n_tokens)
        self.init_dropout(prompt_state_dropout)
        for knob, v in (("d_cell", d_cell), ("d_layer_emb", d_layer_emb)):
            if v is not None and v < 1:
                raise ConfigError(f"model.method.init_args.{knob}={v} must be >= 1")
        self.d_cell_arg, self.d_layer_emb = d_cell, d_layer_emb

    def attach(self, backbone: Backbone) -> None:
        super().attach(backbone)
        self.seed_dropout()
        n, D = len(backbone.blocks), backbone.d_model
        c = self.d_cell = self.d_cell_arg or D
        self.query = nn.Parameter(torch.zeros(n, D))  # zero: the pooling starts as the mean over the prompt
        self.layer_emb = nn.Parameter(torch.randn(n, self.d_layer_emb))
        self.gates = nn.Linear(D + c + self.d_layer_emb, 3 * c)  # input, forget, candidate
        with torch.no_grad():
            self.gates.bias[c : 2 * c].fill_(1.0)  # forget gate open at init, as for LSTMs
        self.write = nn.Parameter(torch.zeros(n, D, c))  # W_o,ℓ: zero, so a fresh cell is plain prompt tuning
        ref = next(backbone.parameters())
        self.to(device=ref.device, dtype=ref.dtype)

    # -- the cell --------------------------------------------------------------------------------
    def cell(self, layer: int, x: Tensor, s: CellSession) -> Tensor:
        """Read the prompt positions of the stream x (B, L, D) entering ``layer``: update m, return W_o m (B, D)."""
        L, D = x.shape[1], x.shape[2]
        P, prompt, _ = s.positions(L, x.device)
        h = F.layer_norm(x[:, :P], (D,)).to(self.query.dtype)
        scores = (h @ self.query[layer] / math.sqrt(D)).masked_fill(~prompt, float("-inf"))
        summary = torch.einsum("bp,bpd->bd", torch.softmax(scores, dim=-1), h)
        prev = s.memory[layer - 1] if layer > 0 else h.new_zeros(h.shape[0], self.d_cell)
        z = torch.cat([summary, prev, self.layer_emb[layer].expand(h.shape[0], -1)], dim=-1)
        i, f, cand = self.gates(z).chunk(3, dim=-1)
        m = torch.sigmoid(f) * prev + torch.sigmoid(i) * torch.tanh(cand)
        del s.memory[layer:], s.writes[layer:]  # a new parallel pass starts over at block 0
        s.memory.append(m)
        s.writes.append(m @ self.write[layer].T)
        return s.writes[layer]

    def _hook(self, s: CellSession, layer: int) -> BlockHook:
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            if s.stepping:  # a generated token (B, D) or (B, 1, D), or forced text (B, L, D): all after the prompt
                w = s.writes[layer]
                return (x + (w if x.dim() == 2 else w[:, None]).to(x.dtype), *args[1:])
            w = self.cell(layer, x, s)
            after = s.positions(x.shape[1], x.device)[2]  # (B, L)
            return (x + w[:, None].to(x.dtype) * after[..., None].to(x.dtype), *args[1:])
        return hook

    @contextmanager
    def session(self, prompt_len: Tensor) -> Iterator[CellSession]:
        """Hook every block for one batch whose sample b reads ``prompt_len[b]`` prompt positions (soft tokens included)."""
        s = CellSession(prompt_len.to(torch.long))
        try:
            for layer, block in enumerate(self.backbone.blocks):
                s.handles += hook_block_inputs(block, self._hook(s, layer))
            yield s
        finally:
            for handle in s.handles:
                handle.remove()

    # -- the Method seam -------------------------------------------------------------------------
    def forward(self, batch: dict) -> MethodOutput:
        plen = batch["prompt_len"]
        drop = self.draw_dropout(batch["input_ids"].shape[0])
        # checked on every batch dropout draws for, not only those that drop a sample: the error must not depend on the draw
        if drop is not None and not bool((plen == plen[0]).all()):
            raise ConfigError("GPC's prompt_state_dropout needs prompts of one length in a batch (got lengths "
                              f"{sorted(set(plen.tolist()))}); set model.method.init_args.prompt_state_dropout=0 for this task")
        if drop is not None and drop.any():
            return MethodOutput(self._forward_with_dropout(batch["input_ids"], plen, drop))
        with self.session(plen + self.n_tokens):
            return super().forward(batch)

    def _forward_with_dropout(self, ids: Tensor, plen: Tensor, drop: Tensor) -> Tensor:
        """Logits (B, T, V) of prompts of one length: the prompts in one pass (it computes the memories), then the
        responses with the writes in place, rows ``drop`` from an empty state, the others from their prompt's state."""
        bb, n, P = self.backbone, self.n_tokens, int(plen[0])
        bb.check_ids(ids, ndim=2)
        drop = drop.to(ids.device)
        with self.session(plen + n) as s:
            prompt = bb.forward_embeds(self.prepend(bb.embed(ids[:, :P])))
            s.start_steps(len(bb.blocks))
            resp = responses_with_dropout(bb, ids[:, P:], prompt.state, drop, s.only)
        return torch.cat([prompt.logits[:, n:], resp.to(prompt.logits.dtype)], dim=1)

    @contextmanager
    def prefill(self, prompt_ids: Tensor, answers: Tensor | None = None) -> Iterator[BackboneOutput]:
        B, P = prompt_ids.shape
        plen = torch.full((B,), self.n_tokens + P, dtype=torch.long, device=prompt_ids.device)
        with self.session(plen) as s, super().prefill(prompt_ids, answers) as out:
            s.start_steps(len(self.backbone.blocks))
            yield out

    def memory_size(self) -> int:
        """The writes W_o,ℓ m_ℓ (D numbers per block) kept for every generated token."""
        return len(self.backbone.blocks) * self.backbone.d_model
