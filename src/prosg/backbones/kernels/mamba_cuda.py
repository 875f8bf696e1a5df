"""Optional CUDA kernels for Mamba-1 (mamba_ssm + causal_conv1d), imported lazily.

The ``[cuda]`` extra's kernels (source builds on pip, prebuilt on conda-forge) fail to import on CPU machines, so nothing here is
imported at module import time: ``load_kernels`` tries once, caches the outcome, and the
mixer falls back to the pure-PyTorch path whenever tensors are not on CUDA, the import
failed (with ``use_kernels="auto"``) or the call needs something the kernels lack (an initial
state). ``mixer_forward`` / ``mixer_step`` mirror mamba_ssm's ``Mamba.forward`` / ``Mamba.step``
but always call the projections as modules, except in the fused ``mamba_inner_fn`` path,
which is taken only when no hook could observe the difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prosg.errors import ConfigError

INSTALL_HINT = ("`conda env create -f environment.yml` (prebuilt kernels from conda-forge), or "
                "`pip install --no-build-isolation -e .[cuda]` (needs nvcc and a CUDA build of torch)")


@dataclass(frozen=True)
class MambaKernels:
    """The kernel entry points mamba_ssm and causal_conv1d provide."""

    selective_scan_fn: Callable[..., Any]
    mamba_inner_fn: Callable[..., Any]
    causal_conv1d_fn: Callable[..., Any]
    causal_conv1d_update: Callable[..., Any]
    selective_state_update: Callable[..., Any]


_kernels: MambaKernels | None = None
_error: str | None = None
_tried = False


def load_kernels() -> MambaKernels | None:
    """Import the CUDA kernels once; None if they are unavailable (see ``import_error``)."""
    global _kernels, _error, _tried
    if not _tried:
        _tried = True
        try:
            from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
            from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update

            _kernels = MambaKernels(
                selective_scan_fn, mamba_inner_fn, causal_conv1d_fn, causal_conv1d_update, selective_state_update
            )
        except Exception as e:  # ImportError, missing .so symbols, triton without a GPU, ...
            _error = f"{type(e).__name__}: {e}"
    return _kernels


def import_error() -> str | None:
    """Why the kernels could not be imported (None if they were, or were never tried)."""
    return _error


def require_kernels() -> MambaKernels:
    """The kernels, or a ConfigError telling how to install them."""
    kernels = load_kernels()
    if kernels is None:
        raise ConfigError(
            f"use_kernels=True but the Mamba CUDA kernels cannot be imported ({_error}). Install them "
            f"with {INSTALL_HINT}, or set use_kernels='auto' (kernels when available) or False."
        )
    return kernels


def kernels_for(setting: bool | str, x: Tensor) -> MambaKernels | None:
    """The kernels to use for tensor ``x`` under ``use_kernels=setting``; None = pure PyTorch."""
    if setting is False or not x.is_cuda:
        return None
    return require_kernels() if setting is True else load_kernels()


def has_hooks(*modules: nn.Module) -> bool:
    """True if any forward (pre-)hook, on these modules or global, would see their calls, or one of
    them has its ``forward`` replaced (as an SG session does, ``prosg.sg.inject.MethodPatch``)."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in modules)


def mixer_forward(mixer: nn.Module, x: Tensor, kernels: MambaKernels, return_state: bool) -> tuple[Tensor, Any]:
    """Mamba mixer over a fresh sequence x (B, L, D) with the CUDA kernels -> (out, state|None)."""
    L = x.shape[1]
    xz = mixer.in_proj(x).transpose(1, 2).contiguous()  # (B, 2*d_inner, L), L-contiguous like mamba_ssm's
    A = -torch.exp(mixer.A_log.float())  # (d_inner, d_state)
    conv_w = mixer.conv1d.weight.squeeze(1)  # (d_inner, d_conv)
    linears = (mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj)
    if not return_state and not has_hooks(*linears):
        # Fused conv + projections + scan + out_proj; it reads the weights directly, hence the
        # hook check, and it cannot return the final state.
        out = kernels.mamba_inner_fn(
            xz, mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight,
            mixer.out_proj.weight, mixer.out_proj.bias, A, None, None, mixer.D.float(),
            delta_bias=mixer.dt_proj.bias.float(), delta_softplus=True,
        )
        return out, None
    xs, z = xz.chunk(2, dim=1)  # (B, d_inner, L) each
    conv_state = F.pad(xs, (mixer.d_conv - L, 0))  # last d_conv inputs, zeros before the start
    u = kernels.causal_conv1d_fn(x=xs, weight=conv_w, bias=mixer.conv1d.bias, activation="silu")
    dt, Bm, Cm = mixer.x_proj(u.transpose(1, 2)).split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    dt = mixer.dt_proj(dt).transpose(1, 2)  # (B, d_inner, L), bias included
    y, last = kernels.selective_scan_fn(
        u, dt, A, Bm.transpose(1, 2).contiguous(), Cm.transpose(1, 2).contiguous(), mixer.D.float(),
        z=z, delta_bias=None, delta_softplus=True, return_last_state=True,
    )
    out = mixer.out_proj(y.transpose(1, 2))
    state = (conv_state, last.float()) if return_state else None
    return out, state


def mixer_step(mixer: nn.Module, x: Tensor, state: tuple[Tensor, Tensor], kernels: MambaKernels) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One token x (B, D) with the CUDA step kernels -> (out (B, D), new state)."""
    # The kernels update the state in place; clone so callers' states stay immutable.
    conv_state, ssm_state = state[0].clone(), state[1].clone()
    xs, z = mixer.in_proj(x).chunk(2, dim=-1)  # (B, d_inner) each
    # causal_conv1d_update requires x in the conv state's dtype (a TORCH_CHECK): under autocast xs is
    # bf16 while a state from init_state is fp32. The state keeps its dtype, as in the pure step.
    u = kernels.causal_conv1d_update(
        xs.to(conv_state.dtype), conv_state, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, "silu"
    )
    dt, Bm, Cm = mixer.x_proj(u).split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    dt = mixer.dt_proj(dt)  # bias included (dt_proj stays a module call, for hooks): a zero dt_bias below
    A = -torch.exp(mixer.A_log.float())
    # dt_bias=None is not an option: selective_state_update then unpacks `*0` into its kernel's arguments
    # (mamba-ssm 2.3.2: `*(dt_bias.stride(0), dt_bias.stride(1)) if dt_bias is not None else 0`), a TypeError.
    y = kernels.selective_state_update(
        ssm_state, u, dt, A, Bm, Cm, mixer.D, z=z, dt_bias=dt.new_zeros(dt.shape[-1]), dt_softplus=True
    )
    return mixer.out_proj(y), (conv_state, ssm_state)
