"""Reference implementations of the RWKV families, run on the SAME weights as our models.

``REFERENCES`` entries are (name, family, make_fn); ``make_fn(our_model)`` returns
``fn(ids) -> loss`` (mean next-token cross-entropy), which ``benchmarks/backbones.py`` times
against our model (forward + backward):

- ``rwkv7_per_token_loop``: our RWKV-7 with its WKV replaced by the token-by-token reference
  loop (``kernels.wkv_ref.wkv7_loop``), i.e. the straightforward autograd recurrence.
- ``rwkv7_indexed_loop``: the same with the loop written the common naive way (``x[:, t]``
  reads, ``out[:, t] = ...`` writes, as BlinkDL's pure-PyTorch fallback in ``rwkv_v7_demo.py``),
  whose backward writes a full-size gradient per token (O(L^2) memory traffic).
- ``hf_rwkv4``: HF transformers' ``RwkvForCausalLM`` (pure-torch CPU path) with our weights
  renamed the way transformers' ``convert_rwkv_checkpoint_to_hf.py`` does.

Run directly for the headline train-step comparison (B=4, L=1024, d_model=256, 4 layers):

    PYTHONPATH=src python benchmarks/ref_rwkv.py [--repeats 3] [--seq-len 1024]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from prosg.backbones.kernels.wkv_ref import wkv7_loop
from prosg.backbones.rwkv4 import RWKV4, blinkdl_to_hf, hf_config
from prosg.backbones.rwkv7 import RWKV7


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean cross-entropy of predicting ids[:, 1:] from logits[:, :-1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def rwkv7_per_token_loop(model: RWKV7) -> Callable[[Tensor], Tensor]:
    """A copy of ``model`` whose WKV steps token by token under autograd."""
    ref = copy.deepcopy(model)
    for block in ref.blocks:
        block.att.wkv_fn = wkv7_loop
    return lambda ids: next_token_loss(ref(ids).logits, ids)


def wkv7_indexed_loop(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
                      state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """WKV-7 token by token with x[:, t] indexing and in-place output writes (the naive loop)."""
    B, L, H, N = r.shape
    state = r.new_zeros(B, H, N, N) if state is None else state
    out = torch.zeros_like(v)
    w = log_w.exp()
    for t in range(L):
        state = (state * w[:, t, :, None, :] + (state @ a[:, t, :, :, None]) @ b[:, t, :, None, :]
                 + v[:, t, :, :, None] @ k[:, t, :, None, :])
        out[:, t] = (state @ r[:, t, :, :, None])[..., 0]
    return out, state


def rwkv7_indexed_loop(model: RWKV7) -> Callable[[Tensor], Tensor]:
    """A copy of ``model`` whose WKV is the naive indexed loop."""
    ref = copy.deepcopy(model)
    for block in ref.blocks:
        block.att.wkv_fn = wkv7_indexed_loop
    return lambda ids: next_token_loss(ref(ids).logits, ids)


def hf_rwkv4(model: RWKV4) -> Callable[[Tensor], Tensor]:
    """HF ``RwkvForCausalLM`` holding ``model``'s weights."""
    from transformers import RwkvConfig, RwkvForCausalLM

    p = model.emb.weight
    hf = RwkvForCausalLM(RwkvConfig(**hf_config(model))).to(device=p.device, dtype=p.dtype)
    hf.load_state_dict(blinkdl_to_hf(model.state_dict()), strict=True)
    hf.train(model.training)
    return lambda ids: next_token_loss(hf(ids, use_cache=False).logits, ids)


REFERENCES: list[tuple[str, str, Callable]] = [
    ("rwkv7_per_token_loop", "rwkv7", rwkv7_per_token_loop),
    ("rwkv7_indexed_loop", "rwkv7", rwkv7_indexed_loop),
    ("hf_rwkv4", "rwkv4", hf_rwkv4),
]


def _train_step_seconds(fn: Callable[[Tensor], Tensor], params: list, ids: Tensor, repeats: int) -> tuple[float, float]:
    """Best (wall, process CPU) seconds of loss + backward over ``repeats`` runs, after a warm-up.

    On a shared machine wall time swings with other jobs; with --threads 1 the CPU time is
    the steadier figure (with more threads it also counts OpenMP spin-waiting).
    """
    best_wall = best_cpu = float("inf")
    for i in range(repeats + 1):
        for p in params:
            p.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        fn(ids).backward()
        if i:
            best_wall = min(best_wall, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--only", choices=[name for name, _, _ in REFERENCES])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    builders = {"rwkv7": lambda: RWKV7(args.vocab, args.d_model, args.n_layer, head_size=64),
                "rwkv4": lambda: RWKV4(args.vocab, args.d_model, args.n_layer)}
    for name, family, make in REFERENCES:
        if args.only and name != args.only:
            continue
        model = builders[family]().train()
        ours, ours_cpu = _train_step_seconds(lambda x: next_token_loss(model(x).logits, x), list(model.parameters()),
                                             ids, args.repeats)
        ref, ref_cpu = _train_step_seconds(make(model), [], ids, args.ref_repeats)
        print(json.dumps({"reference": name, "family": family, "batch": args.batch, "seq_len": args.seq_len,
                          "d_model": args.d_model, "n_layer": args.n_layer, "threads": torch.get_num_threads(),
                          "ours_s": round(ours, 3), "reference_s": round(ref, 3), "speedup": round(ref / ours, 2),
                          "ours_cpu_s": round(ours_cpu, 3), "reference_cpu_s": round(ref_cpu, 3),
                          "cpu_speedup": round(ref_cpu / ours_cpu, 2)}))


if __name__ == "__main__":
    main()
