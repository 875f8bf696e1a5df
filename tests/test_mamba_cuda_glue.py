"""kernels/mamba_cuda.py's glue on CPU: the Mamba model dispatched to stand-ins of the CUDA kernels.

The stand-ins compute what mamba-ssm's and causal-conv1d's entry points compute (their reference
semantics) and check what the real ones refuse (dtype TORCH_CHECKs, argument shapes, a None dt_bias),
so the layout, state and dtype handling around the kernels is tested without a GPU; the kernels
themselves are checked on a GPU by benchmarks/gpu_check.py.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from prosg.backbones import Mamba
from prosg.backbones.kernels import mamba_cuda
from prosg.backbones.kernels.scan_ref import selective_scan_ref

V = 32


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    # selective_scan_cuda.fwd: delta, variable B/C and z in u's dtype; A, D, delta_bias fp32
    assert delta.dtype == B.dtype == C.dtype == u.dtype and (z is None or z.dtype == u.dtype)
    assert A.dtype == torch.float32 and D.dtype == torch.float32 and B.dim() == 3
    assert delta_bias is None or delta_bias.dtype == torch.float32
    out = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=return_last_state)
    return (out[0], out[1].float()) if return_last_state else out


def conv(x, weight, bias, activation):
    width = weight.shape[-1]
    y = F.conv1d(x.float(), weight.float()[:, None], None if bias is None else bias.float(), padding=width - 1,
                 groups=x.shape[1])[..., : x.shape[-1]]
    return (F.silu(y) if activation in ("silu", True) else y).to(x.dtype)


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    assert weight.dim() == 2 and (bias is None or bias.dtype == weight.dtype)
    assert x.stride(2) == 1 or x.stride(1) == 1
    return conv(x, weight, bias, activation)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None, conv_state_indices=None):
    assert conv_state.dtype == x.dtype, "causal_conv1d_update: TORCH_CHECK(conv_state.scalar_type() == input_type)"
    assert conv_state.shape[-1] >= weight.shape[-1] - 1
    conv_state.copy_(torch.cat([conv_state[..., 1:], x[..., None]], dim=-1))  # in place, like the kernel
    y = (conv_state[..., -weight.shape[-1]:].float() * weight.float()).sum(-1)
    y = y + bias.float() if bias is not None else y
    return (F.silu(y) if activation in ("silu", True) else y).to(x.dtype)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None):
    # mamba-ssm 2.3.2 unpacks `*(dt_bias.stride(0), dt_bias.stride(1)) if dt_bias is not None else 0`
    if dt_bias is None:
        raise TypeError("Value after * must be an iterable, not int")
    dt = dt.float() + dt_bias.float()
    dt = F.softplus(dt) if dt_softplus else dt
    h = torch.exp(dt[..., None] * A) * state + (dt * x.float())[..., None] * B.float()[:, None]
    state.copy_(h)  # in place, like the kernel
    y = (h * C.float()[:, None]).sum(-1) + (x.float() * D.float() if D is not None else 0)
    return (y * F.silu(z.float()) if z is not None else y).to(x.dtype)


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias,
                   A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True):
    assert conv1d_weight.dim() == 3  # (d, 1, w): rearranged inside
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d_fn(x, conv1d_weight[:, 0], conv1d_bias, activation="silu")
    rank, n = delta_proj_weight.shape[1], A.shape[-1]
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (b, l, rank + 2n)
    delta = (x_dbl[..., :rank] @ delta_proj_weight.T).transpose(1, 2)
    Bm, Cm = x_dbl[..., rank : rank + n].transpose(1, 2), x_dbl[..., -n:].transpose(1, 2)
    y = selective_scan_fn(x, delta, A, Bm.contiguous(), Cm.contiguous(), D, z, delta_bias, delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


STAND_INS = mamba_cuda.MambaKernels(selective_scan_fn, mamba_inner_fn, causal_conv1d_fn, causal_conv1d_update,
                                    selective_state_update)


@pytest.fixture
def pair(monkeypatch):
    """(model dispatching to the stand-ins, the same weights on the pure path)."""
    monkeypatch.setattr(mamba_cuda, "kernels_for", lambda setting, x: None if setting is False else STAND_INS)
    fast = Mamba(vocab_size=V, d_model=32, n_layer=2, d_state=8)
    pure = copy.deepcopy(fast)
    for block in pure.blocks:
        block.mixer.use_kernels = False
    return fast, pure


def grads(model, ids, **kw):
    out = model(ids, **kw)
    loss = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten())
    return out, torch.autograd.grad(loss, list(model.parameters()))


def test_parallel_paths_match_the_pure_model(pair):
    fast, pure = pair
    ids = torch.randint(0, V, (2, 19))
    (o_fast, g_fast), (o_pure, g_pure) = grads(fast, ids), grads(pure, ids)  # causal_conv1d_fn + selective_scan_fn
    torch.testing.assert_close(o_fast.logits, o_pure.logits)
    for (c_f, s_f), (c_p, s_p) in zip(o_fast.state, o_pure.state):
        torch.testing.assert_close(c_f, c_p)
        torch.testing.assert_close(s_f, s_p)
    for a, b in zip(g_fast, g_pure):
        torch.testing.assert_close(a, b)
    o_fused, g_fused = grads(fast, ids, return_state=False)  # mamba_inner_fn
    torch.testing.assert_close(o_fused.logits, o_pure.logits)
    for a, b in zip(g_fused, g_pure):
        torch.testing.assert_close(a, b)


def test_step_kernels_match_the_pure_step(pair):
    fast, pure = pair
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        s_fast, s_pure = fast(ids[:, :5]).state, pure(ids[:, :5]).state
        kept = [t.clone() for layer in s_fast for t in layer]
        for t in range(5, 12):
            a, b = fast.step(ids[:, t], s_fast), pure.step(ids[:, t], s_pure)
            torch.testing.assert_close(a.logits, b.logits)
            s_fast, s_pure = a.state, b.state
        first = fast(ids[:, :5]).state
        # the in-place kernels never touch a state the caller holds
        for x, y in zip(kept, [t for layer in first for t in layer]):
            torch.testing.assert_close(x, y)


def test_step_from_an_fp32_state_under_bf16_autocast(pair):
    fast, pure = pair
    ids = torch.randint(0, V, (2,))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = fast.step(ids, fast.init_state(2))  # bf16 activations meet an fp32 conv state
        b = pure.step(ids, pure.init_state(2))
    assert a.state[0][0].dtype == b.state[0][0].dtype == torch.float32
    torch.testing.assert_close(a.logits.float(), b.logits.float(), atol=3e-2, rtol=3e-2)
