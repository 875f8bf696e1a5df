"""RWKV-7 (x070): chunked WKV vs the reference loop, model parallel == steps, BlinkDL .pth files."""

import math

import pytest
import torch
import torch.nn.functional as F

from prosg.backbones.checkpoint import load_weights
from prosg.backbones.kernels.wkv7 import fla_kernel, wkv7_chunked, wkv7_fla
from prosg.backbones.kernels.wkv_ref import wkv7_loop
from prosg.backbones.registry import detect_format, from_pretrained
from prosg.backbones.rwkv7 import RWKV7, lora_dim
from prosg.errors import CheckpointError, ConfigError

V, C, N, LAYERS = 37, 32, 8, 3
H = C // N
SIZES = dict(vocab_size=V, d_model=C, n_layer=LAYERS, head_size=N, d_ffn=48,
             d_decay_lora=8, d_aaa_lora=6, d_mv_lora=4, d_gate_lora=10)


def wkv_inputs(B, L, Hh, Nn, dtype=torch.float64, seed=0):
    """r, log_w, k, v, a, b as RWKV-7 produces them (log_w in [-e^-0.5, 0), a = -kk, b = kk * lr) + a state."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    kk = F.normalize(rnd(B, L, Hh, Nn), dim=-1)
    lr = torch.sigmoid(rnd(B, L, Hh, Nn))
    log_w = -math.exp(-0.5) * torch.sigmoid(2 * rnd(B, L, Hh, Nn))
    return [rnd(B, L, Hh, Nn), log_w, 0.5 * rnd(B, L, Hh, Nn), rnd(B, L, Hh, Nn), -kk, kk * lr], rnd(B, Hh, Nn, Nn)


@torch.no_grad()
def randomize(model, seed=0):
    """Non-trivial weights everywhere (BlinkDL's init zeroes the output projections)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if name.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight", "ln_x.weight")):
            p.copy_(1 + 0.1 * noise)
        elif p.dim() == 2 and "emb" not in name:
            p.copy_(noise / math.sqrt(p.shape[1]))
        else:
            p.copy_(0.5 * noise)
    return model


def tiny(**kw):
    return randomize(RWKV7(**{**SIZES, **kw})).eval()


# -- the WKV kernel ------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [1, 7, 16, 37])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_loop(L, with_state):
    x, s0 = wkv_inputs(2, L, 3, 5)
    s0 = s0 if with_state else None
    y, s = wkv7_chunked(*x, s0, chunk_size=8)
    y_ref, s_ref = wkv7_loop(*x, s0)
    torch.testing.assert_close(y, y_ref, atol=1e-11, rtol=1e-9)
    torch.testing.assert_close(s, s_ref, atol=1e-11, rtol=1e-9)


def test_chunked_gradients_match_loop():
    x, s0 = wkv_inputs(2, 21, 2, 4, seed=1)
    gy, gs = torch.randn(2, 21, 2, 4, dtype=torch.float64), torch.randn(2, 2, 4, 4, dtype=torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (*x, s0)]
        y, s = fn(*leaves)
        return torch.autograd.grad((y * gy).sum() + (s * gs).sum(), leaves)

    chunked = grads(lambda *t: wkv7_chunked(*t, chunk_size=8))
    for name, g, g_ref in zip("r log_w k v a b state".split(), chunked, grads(wkv7_loop)):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-8, msg=lambda m: f"d/d{name}: {m}")


def test_chunked_gradcheck():
    x, s0 = wkv_inputs(1, 5, 1, 3, seed=2)
    leaves = [t.requires_grad_() for t in (*x, s0)]
    assert torch.autograd.gradcheck(lambda *t: wkv7_chunked(*t, chunk_size=2), leaves)


def test_chunked_fp32_close_to_fp64_on_long_sequences():
    x, s0 = wkv_inputs(1, 300, 2, 16, seed=3)
    y_ref, s_ref = wkv7_loop(*x, s0)
    y, s = wkv7_chunked(*(t.float() for t in x), s0.float())
    scale = y_ref.abs().max()
    assert (y.double() - y_ref).abs().max() < 1e-5 * scale
    assert (s.double() - s_ref).abs().max() < 1e-5 * s_ref.abs().max()


# -- the model -------------------------------------------------------------------------------------

def test_config_defaults_follow_blinkdl():
    m = RWKV7(vocab_size=10, d_model=256, n_layer=1)
    assert (m.config["d_ffn"], m.config["head_size"]) == (1024, 64)
    assert [m.config[k] for k in ("d_decay_lora", "d_aaa_lora", "d_mv_lora", "d_gate_lora")] == [32, 32, 32, 64]
    # the 0.1B World/Pile size (d_model 768): BlinkDL's released checkpoints use 64, 64, 32, 128
    assert [lora_dim(768, f) for f in (2.5, 2.5, 1.7, 5.0)] == [64, 64, 32, 128]


def test_model_gradients_match_per_token_loop():
    model = tiny().double()
    ref = tiny().double()
    for block in ref.blocks:
        block.att.wkv_fn = wkv7_loop
    ids = torch.randint(0, V, (2, 23))
    for m in (model, ref):
        F.cross_entropy(m(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-9, rtol=1e-7, msg=lambda m: f"{name}: {m}")


def blinkdl_rnn_logits(z, ids, n_layer):
    """Transcription of BlinkDL's rwkv_v7_demo_rnn.py (one sequence, fp64): an independent reference."""
    z = {k: v.double().squeeze() for k, v in z.items()}
    n_head, head_size = z["blocks.0.att.r_k"].shape
    C = n_head * head_size
    ln = lambda x, p: F.layer_norm(x, (C,), z[p + ".weight"], z[p + ".bias"])  # noqa: E731
    state = [[torch.zeros(C), torch.zeros(n_head, head_size, head_size), torch.zeros(C)] for _ in range(n_layer)]
    state = [[t.double() for t in s] for s in state]
    out = []
    for token in ids:
        x = ln(z["emb.weight"][token], "blocks.0.ln0")
        v_first = None
        for i in range(n_layer):
            p = f"blocks.{i}.att."
            xa_ = ln(x, f"blocks.{i}.ln1")
            xx = state[i][0] - xa_
            xr, xw, xk, xv, xa, xg = (xa_ + xx * z[p + n] for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
            r, k, v = z[p + "receptance.weight"] @ xr, z[p + "key.weight"] @ xk, z[p + "value.weight"] @ xv
            w = torch.tanh(xw @ z[p + "w1"]) @ z[p + "w2"]
            if i == 0:
                v_first = v
            else:
                v = v + (v_first - v) * torch.sigmoid(z[p + "v0"] + (xv @ z[p + "v1"]) @ z[p + "v2"])
            a = torch.sigmoid(z[p + "a0"] + (xa @ z[p + "a1"]) @ z[p + "a2"])
            g = torch.sigmoid(xg @ z[p + "g1"]) @ z[p + "g2"]
            kk = F.normalize((k * z[p + "k_k"]).view(n_head, head_size), dim=-1, p=2.0).view(-1)
            k = k * (1 + (a - 1) * z[p + "k_a"])
            # BlinkDL writes 0.606531 for e^{-1/2} (= its GPT mode's exp(-exp(-softplus(-w) - 0.5)))
            w = torch.exp(-math.exp(-0.5) * torch.sigmoid(z[p + "w0"] + w))
            vk = v.view(n_head, head_size, 1) @ k.view(n_head, 1, head_size)
            ab = (-kk).view(n_head, head_size, 1) @ (kk * a).view(n_head, 1, head_size)
            s = state[i][1]
            s = s * w.view(n_head, 1, head_size) + s @ ab + vk
            o = (s @ r.view(n_head, head_size, 1)).view(-1)
            o = F.group_norm(o.view(1, C), n_head, z[p + "ln_x.weight"], z[p + "ln_x.bias"], eps=64e-5).view(-1)
            rk = (r * k * z[p + "r_k"].flatten()).view(n_head, head_size).sum(-1, keepdim=True)
            o = o + (rk * v.view(n_head, head_size)).view(-1)
            state[i][0], state[i][1] = xa_, s
            x = x + z[p + "output.weight"] @ (o * g)
            f = f"blocks.{i}.ffn."
            xf = ln(x, f"blocks.{i}.ln2")
            kf = xf + (state[i][2] - xf) * z[f + "x_k"]
            state[i][2] = xf
            x = x + z[f + "value.weight"] @ torch.relu(z[f + "key.weight"] @ kf) ** 2
        out.append(z["head.weight"] @ ln(x, "ln_out"))
    return torch.stack(out)


def blinkdl_x070_tensors(n_layer=LAYERS, dtype=torch.bfloat16, seed=0):
    """Random tensors under exactly the keys and shapes of a BlinkDL x070 .pth (trainer layout)."""
    g = torch.Generator().manual_seed(seed)
    F_, dw, da, dv, dg = 48, 8, 6, 4, 10
    shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
              "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
    for i in range(n_layer):
        b, a = f"blocks.{i}.", f"blocks.{i}.att."
        shapes.update({b + "ln1.weight": (C,), b + "ln1.bias": (C,), b + "ln2.weight": (C,), b + "ln2.bias": (C,)})
        vectors = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")
        shapes.update({a + n: (1, 1, C) for n in vectors})
        shapes.update({a + "w1": (C, dw), a + "w2": (dw, C), a + "a1": (C, da), a + "a2": (da, C), a + "v1": (C, dv),
                       a + "v2": (dv, C), a + "g1": (C, dg), a + "g2": (dg, C), a + "r_k": (H, N)})
        shapes.update({a + n + ".weight": (C, C) for n in ("receptance", "key", "value", "output")})
        shapes.update({a + "ln_x.weight": (C,), a + "ln_x.bias": (C,), b + "ffn.x_k": (1, 1, C),
                       b + "ffn.key.weight": (F_, C), b + "ffn.value.weight": (C, F_)})
    sd = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) == 2 and "r_k" not in k and "emb" not in k:
            t = t / math.sqrt(shape[1])
        elif k.endswith("ln_x.weight") or k.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight")):
            t = 1 + 0.1 * t
        else:
            t = 0.5 * t
        sd[k] = t.to(dtype)
    return sd


def test_x070_pth_loads_and_matches_blinkdl_reference(tmp_path):
    sd = blinkdl_x070_tensors()
    torch.save(sd, tmp_path / "rwkv-x070-tiny.pth")
    for path in (tmp_path / "rwkv-x070-tiny.pth", tmp_path):  # the file, or a directory holding one
        assert detect_format(path).name == "rwkv7-pth"
        model = from_pretrained(path)
        assert isinstance(model, RWKV7) and model.emb.weight.dtype == torch.float32
        assert {k: model.config[k] for k in SIZES} == SIZES
    ids = torch.randint(0, V, (1, 12))
    ref = blinkdl_rnn_logits(sd, ids[0], LAYERS)
    with torch.no_grad():
        ours = model.double()(ids).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=1e-9)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny()
    model.save_pretrained(str(tmp_path / "ckpt"))
    model.save_pretrained(str(tmp_path / "single.pth"))
    sd = load_weights(tmp_path / "ckpt" / "model.pth")
    assert sd["blocks.0.att.r_k"].shape == (H, N) and sd["blocks.0.att.x_r"].shape == (1, 1, C)
    assert "blocks.0.att.v0" in sd  # BlinkDL's trainer layout (unused in layer 0)
    ids = torch.randint(0, V, (2, 9))
    for path in (tmp_path / "ckpt", tmp_path / "single.pth"):
        loaded = from_pretrained(path).eval()
        assert loaded.config == model.config
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_v6_pth_is_refused(tmp_path):
    sd = {"emb.weight": torch.zeros(V, C), "blocks.0.att.time_maa_x": torch.zeros(1, 1, C),
          "blocks.0.att.time_faaaa": torch.zeros(H, N), "blocks.0.att.ln_x.weight": torch.zeros(C)}
    torch.save(sd, tmp_path / "rwkv6.pth")
    with pytest.raises(CheckpointError, match=r"RWKV v5/v6 \.pth is not supported; supported: x070, v4"):
        from_pretrained(tmp_path / "rwkv6.pth")


def test_mis_shaped_pth_names_the_key(tmp_path):
    sd = blinkdl_x070_tensors(dtype=torch.float32)
    sd["blocks.1.att.key.weight"] = torch.zeros(C, C + 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatch.*blocks\.1\.att\.key\.weight"):
        from_pretrained(tmp_path / "bad.pth")
    del sd["blocks.1.att.key.weight"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.att\.key\.weight"):
        from_pretrained(tmp_path / "bad.pth")


def test_directory_with_two_pth_files_is_ambiguous(tmp_path):
    for name in ("a.pth", "b.pth"):
        torch.save(blinkdl_x070_tensors(dtype=torch.float32), tmp_path / name)
    with pytest.raises(CheckpointError, match="holds 2 .pth files.*pass the path"):
        from_pretrained(tmp_path)


def test_target_linears_and_block_inputs():
    model = tiny()
    hits = model.target_linears(["att.key"])
    assert list(hits) == [f"blocks.{i}.att.key" for i in range(LAYERS)]
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape))) for b in model.blocks]
    with torch.no_grad():
        out = model(torch.randint(0, V, (2, 5)))
        model.step(torch.randint(0, V, (2,)), out.state)
    for h in handles:
        h.remove()
    assert seen == [(2, 5, C)] * LAYERS + [(2, 1, C)] * LAYERS


def test_bad_configs_are_explained():
    with pytest.raises(ConfigError, match="multiple of head_size"):
        RWKV7(vocab_size=V, d_model=48, n_layer=1, head_size=32)
    with pytest.raises(ConfigError, match="use_kernels must be"):
        RWKV7(vocab_size=V, d_model=32, n_layer=1, head_size=8, use_kernels="fast")
    if fla_kernel() is None:
        with pytest.raises(ConfigError, match="flash-linear-attention"):
            RWKV7(vocab_size=V, d_model=32, n_layer=1, head_size=8, use_kernels=True)
    model = tiny()
    with pytest.raises(ConfigError, match="state must hold 3 layers"):
        model(torch.zeros(1, 2, dtype=torch.long), model.init_state(1)[:2])


def test_bf16_model_keeps_fp32_wkv_state():
    model = tiny().to(torch.bfloat16)
    out = model(torch.randint(0, V, (2, 6)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert out.state[0][1].dtype == torch.float32 and out.state[0][0].dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or fla_kernel() is None,
                    reason="needs CUDA and flash-linear-attention")
def test_fla_kernel_matches_pure_path():
    x, s0 = wkv_inputs(2, 100, 4, 64, dtype=torch.float32, seed=4)
    x, s0 = [t.cuda().requires_grad_() for t in x], s0.cuda().requires_grad_()
    y, s = wkv7_fla(*x, s0)
    y_ref, s_ref = wkv7_chunked(*x, s0)
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(s, s_ref, atol=2e-2, rtol=2e-2)
    g = torch.autograd.grad(y.square().sum() + s.sum(), [*x, s0])
    g_ref = torch.autograd.grad(y_ref.square().sum() + s_ref.sum(), [*x, s0])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    model = tiny(d_model=128, head_size=64).cuda()
    ids = torch.randint(0, V, (2, 64), device="cuda")
    fast = model(ids).logits
    for block in model.blocks:
        block.att.use_kernels = False
    torch.testing.assert_close(fast, model(ids).logits, atol=2e-2, rtol=2e-2)
