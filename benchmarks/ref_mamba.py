"""Reference implementations of Mamba-1, run on the SAME weights as our ``Mamba``.

``REFERENCES`` entries are (name, family, make_fn); ``make_fn(our_model)`` returns
``fn(ids) -> loss`` (mean next-token cross-entropy) that ``benchmarks/backbones.py`` times
(forward + backward) against our model:

- ``mamba_naive_loop``: our Mamba with its scan replaced by ``kernels.scan_ref`` — one autograd
  step per token with ``[:, :, t]`` indexing, like mamba_ssm's ``selective_scan_ref``.
- ``hf_mambapy``: HF transformers' ``MambaForCausalLM`` with ``use_mambapy=True`` (parallel scan
  from the ``mambapy`` package). transformers silently falls back to its sequential loop when
  mambapy is missing, so ``fn.info["mambapy_used"]`` records whether the pscan really ran.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor

from prosg.backbones.kernels.scan_ref import selective_scan_bld_ref
from prosg.backbones.mamba import Mamba


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean cross-entropy of predicting ids[:, 1:] from logits[:, :-1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def mamba_naive_loop(model: Mamba) -> Callable[[Tensor], Tensor]:
    """A copy of ``model`` whose selective scan steps token by token under autograd."""
    ref = copy.deepcopy(model)
    for block in ref.blocks:
        block.mixer.scan_fn = selective_scan_bld_ref
    return lambda ids: next_token_loss(ref(ids).logits, ids)


def hf_config(model: Mamba) -> dict[str, Any]:
    """transformers ``MambaConfig`` kwargs equivalent to ``model`` (vocab = our padded table)."""
    c, mixer = model.config, model.blocks[0].mixer
    if not c["rms_norm"]:
        raise ValueError("HF Mamba has RMSNorm only; build the model with rms_norm=True")
    return dict(
        vocab_size=model.backbone.embedding.num_embeddings, hidden_size=c["d_model"], state_size=c["d_state"],
        num_hidden_layers=c["n_layer"], expand=c["expand"], conv_kernel=c["d_conv"], time_step_rank=mixer.dt_rank,
        use_bias=c["bias"], use_conv_bias=c["conv_bias"], layer_norm_epsilon=c["norm_epsilon"],
        residual_in_fp32=c["residual_in_fp32"], tie_word_embeddings=c["tie_embeddings"],
    )


def hf_mambapy(model: Mamba) -> Callable[[Tensor], Tensor]:
    """HF ``MambaForCausalLM(use_mambapy=True)`` holding ``model``'s weights."""
    from transformers import MambaConfig, MambaForCausalLM

    p = model.backbone.embedding.weight
    hf = MambaForCausalLM(MambaConfig(**hf_config(model), use_mambapy=True)).to(device=p.device, dtype=p.dtype)
    sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in model.state_dict().items()}
    hf.load_state_dict(sd, strict=True)
    hf.train(model.training)
    info: dict[str, Any] = {"mambapy_used": False}
    try:
        import mambapy.pscan
    except ImportError:  # transformers then runs its sequential loop, very slowly; say so
        info["note"] = "mambapy not installed: HF fell back to its sequential loop"
    else:
        real_pscan = mambapy.pscan.pscan

        def counting_pscan(*args: Any) -> Tensor:
            info["mambapy_used"] = True
            return real_pscan(*args)

        # transformers imports pscan from mambapy.pscan at call time, so this sees every use.
        mambapy.pscan.pscan = counting_pscan

    def fn(ids: Tensor) -> Tensor:
        logits = hf(ids, use_cache=False).logits[..., : model.vocab_size]
        return next_token_loss(logits, ids)

    fn.info = info  # type: ignore[attr-defined]
    return fn


REFERENCES: list[tuple[str, str, Callable]] = [
    ("mamba_naive_loop", "mamba", mamba_naive_loop),
    ("hf_mambapy", "mamba", hf_mambapy),
]
