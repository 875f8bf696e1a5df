"""The fast CPU selective scan against the per-token reference loop: values and gradients."""

import pytest
import torch

from prosg.backbones.kernels.scan_ref import selective_scan_ref
from prosg.backbones.kernels.selective_scan import default_chunk, selective_scan


def make_inputs(b=2, d=5, n=3, L=13, dtype=torch.float64, initial_state=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    return dict(
        u=r(b, d, L), delta=r(b, d, L), A=(-torch.rand(d, n, generator=g, dtype=dtype) * 2).requires_grad_(),
        B=r(b, n, L), C=r(b, n, L), D=r(d), z=r(b, d, L), delta_bias=r(d, scale=0.5),
        initial_state=r(b, d, n) if initial_state else None,
    )


def run(fn, x, **kw):
    """Outputs and gradients of a loss that uses y (weighted) and the last state."""
    y, last = fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], delta_bias=x["delta_bias"],
                 delta_softplus=True, initial_state=x["initial_state"], return_last_state=True, **kw)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    loss = (y * w).sum() + (last.to(y.dtype) ** 2).sum()
    leaves = {k: v for k, v in x.items() if v is not None}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y, last, dict(zip(leaves, grads))


@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 13, 64])
@pytest.mark.parametrize("n", [3, 8])  # d_state read by a product-and-sum (<= 4) or by a batched matmul
def test_matches_reference_fp64(initial_state, chunk, n):
    x = make_inputs(n=n, initial_state=initial_state)
    y, last, grads = run(selective_scan, x, chunk=chunk)
    y_ref, last_ref, grads_ref = run(selective_scan_ref, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, last_ref, rtol=1e-10, atol=1e-10)
    assert set(grads) == set(grads_ref)
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=1e-9, atol=1e-9, msg=f"gradient of {k}")


@pytest.mark.parametrize("initial_state", [False, True])
def test_matches_reference_fp32(initial_state):
    x = make_inputs(b=3, d=16, n=8, L=40, dtype=torch.float32, initial_state=initial_state, seed=1)
    y, last, grads = run(selective_scan, x, chunk=7)
    y_ref, last_ref, grads_ref = run(selective_scan_ref, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last, last_ref, rtol=1e-4, atol=1e-5)
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=1e-4, atol=1e-4, msg=f"gradient of {k}")


def test_optional_terms_absent():
    x = make_inputs(initial_state=False)
    kw = dict(delta_softplus=False, return_last_state=False)
    args = (x["u"], x["delta"].abs(), x["A"], x["B"], x["C"])
    torch.testing.assert_close(selective_scan(*args, chunk=5, **kw), selective_scan_ref(*args, **kw))


def test_gradcheck_tiny():
    x = make_inputs(b=1, d=2, n=2, L=5)
    names = list(x)

    def f(*tensors):
        kw = dict(zip(names, tensors))
        y, last = selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                                 delta_bias=kw["delta_bias"], initial_state=kw["initial_state"],
                                 return_last_state=True, chunk=2)
        return y, last

    assert torch.autograd.gradcheck(f, tuple(x.values()), eps=1e-6, atol=1e-7)


def test_saves_no_full_size_state():
    b, d, n, L = 2, 8, 4, 256
    x = make_inputs(b=b, d=d, n=n, L=L, dtype=torch.float32)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(selective_scan, x, chunk=16)
    # Inputs are (B, D, L); a per-token state history would be (B, L, D, N).
    assert max(sizes) <= b * d * L < b * L * d * n


def test_low_precision_inputs():
    x = make_inputs(b=2, d=4, n=3, L=9, dtype=torch.float32, initial_state=False)
    with torch.no_grad():
        y, last = selective_scan(*(x[k].bfloat16() for k in ("u", "delta", "A", "B", "C", "D", "z")), return_last_state=True)
        y_ref = selective_scan_ref(*(x[k] for k in ("u", "delta", "A", "B", "C", "D", "z")))
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref, rtol=0.05, atol=0.05)


def test_default_chunk_bounds():
    assert default_chunk(4, 512, 16) == 32
    assert default_chunk(1, 1, 1) == 256
    assert default_chunk(64, 8192, 16) == 4
