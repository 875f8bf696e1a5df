"""RWKV-4: chunked WKV vs the reference loop, model parallel == steps, HF and BlinkDL checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

from prosg.backbones.kernels.wkv4 import wkv4_chunked
from prosg.backbones.kernels.wkv_ref import wkv4_loop
from prosg.backbones.registry import detect_format, from_pretrained
from prosg.backbones.rwkv4 import RWKV4, blinkdl_to_hf, hf_config
from prosg.errors import CheckpointError, ConfigError

V, C, LAYERS, FFN = 37, 24, 3, 40



@pytest.fixture
def transformers():
    """HF transformers, the reference RWKV-4 (a dev dependency)."""
    return pytest.importorskip("transformers")


def wkv_inputs(B, L, Cc, dtype=torch.float64, seed=0, k_scale=3.0):
    """time_decay, time_first, k, v and a non-empty (aa, bb, pp) state."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    state = (rnd(B, Cc), torch.rand(B, Cc, generator=g, dtype=dtype) + 0.5, rnd(B, Cc))
    return rnd(Cc), rnd(Cc), k_scale * rnd(B, L, Cc), rnd(B, L, Cc), state


@torch.no_grad()
def randomize(model, seed=0):
    """Non-trivial weights everywhere (BlinkDL's v4 init zeroes key, receptance and output)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if "ln" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * noise)
        elif p.dim() == 2 and "emb" not in name:
            p.copy_(noise / math.sqrt(p.shape[1]))
        elif "time_mix" in name:
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype))
        else:
            p.copy_(noise)
    return model


def tiny():
    return randomize(RWKV4(vocab_size=V, d_model=C, n_layer=LAYERS, d_ffn=FFN)).eval()


# -- the WKV kernel ------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [1, 5, 8, 29])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_loop(L, with_state):
    td, tf, k, v, s0 = wkv_inputs(2, L, 6)
    s0 = s0 if with_state else None
    y, s = wkv4_chunked(td, tf, k, v, s0, chunk_size=8)
    y_ref, s_ref = wkv4_loop(td, tf, k, v, s0)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(s, s_ref):  # same representation, not just the same numerator/denominator
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_chunked_gradients_match_loop():
    td, tf, k, v, s0 = wkv_inputs(2, 19, 5, seed=1)
    gy = torch.randn(2, 19, 5, dtype=torch.float64)
    gs = [torch.randn(2, 5, dtype=torch.float64) for _ in range(3)]

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (td, tf, k, v, *s0)]
        y, s = fn(*leaves[:4], tuple(leaves[4:]))
        return torch.autograd.grad((y * gy).sum() + sum((a * b).sum() for a, b in zip(s, gs)), leaves)

    names = "time_decay time_first k v aa bb pp".split()
    for name, g, g_ref in zip(names, grads(lambda *t: wkv4_chunked(*t, chunk_size=4)), grads(wkv4_loop)):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-8, msg=lambda m: f"d/d{name}: {m}")


def test_chunked_gradcheck():
    td, tf, k, v, s0 = wkv_inputs(1, 7, 3, seed=2)
    leaves = [t.requires_grad_() for t in (td, tf, k, v, *s0)]

    def f(td, tf, k, v, aa, bb, pp):
        y, s = wkv4_chunked(td, tf, k, v, (aa, bb, pp), chunk_size=3)
        return (y, *s)

    assert torch.autograd.gradcheck(f, leaves)


def test_chunked_is_stable_for_large_keys_and_decays_in_fp32():
    td, tf, k, v, _ = wkv_inputs(2, 100, 8, seed=3, k_scale=40.0)  # e^k overflows fp32 without the max trick
    td = td + 2.0  # decay rates up to e^4 per token
    y_ref, s_ref = wkv4_loop(td, tf, k, v)
    y, s = wkv4_chunked(*(t.float() for t in (td, tf, k, v)))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s[2].double(), s_ref[2], atol=1e-4, rtol=1e-6)


# -- the model -------------------------------------------------------------------------------------

def hf_model(transformers, rescale_every=0, seed=0):
    cfg = transformers.RwkvConfig(vocab_size=V, hidden_size=C, num_hidden_layers=LAYERS, intermediate_size=FFN,
                                  attention_hidden_size=C, rescale_every=rescale_every, tie_word_embeddings=False)
    hf = transformers.RwkvForCausalLM(cfg)
    randomize(hf, seed)
    return hf


@pytest.mark.parametrize("safe", [True, False])
def test_hf_directory_matches_hf_logits_and_state(tmp_path, safe, transformers):
    hf = hf_model(transformers)
    hf.save_pretrained(tmp_path, safe_serialization=safe)
    assert detect_format(tmp_path).name == "rwkv4-hf"
    model = from_pretrained(tmp_path).eval()
    assert isinstance(model, RWKV4) and model.config["d_ffn"] == FFN
    ids = torch.randint(0, V, (2, 17))
    with torch.no_grad():
        out = hf.eval()(ids, use_cache=True)
        ours = model(ids)
    torch.testing.assert_close(ours.logits, out.logits, atol=1e-4, rtol=1e-4)
    # HF state: [ffn x, att x, numerator, denominator, max], each (B, C, n_layer)
    for i, (att_x, aa, bb, pp, ffn_x) in enumerate(ours.state):
        for a, b in zip((ffn_x, att_x, aa, bb, pp), out.state):
            torch.testing.assert_close(a, b[..., i], atol=1e-4, rtol=1e-4)


def test_hf_rescaled_inference_matches(tmp_path, transformers):
    hf = hf_model(transformers, rescale_every=2, seed=1)
    hf.save_pretrained(tmp_path)  # saved before any eval forward: weights not rescaled
    model = from_pretrained(tmp_path).eval()
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():  # HF halves the stream every 2 layers at inference; exact up to LayerNorm eps
        torch.testing.assert_close(model(ids).logits, hf.eval()(ids).logits, atol=1e-4, rtol=1e-4)


def test_training_step_matches_hf_gradients(transformers):
    model = tiny().train()
    hf = transformers.RwkvForCausalLM(transformers.RwkvConfig(**hf_config(model))).train()
    hf.load_state_dict(blinkdl_to_hf(model.state_dict()), strict=True)
    ids = torch.randint(0, V, (2, 20))
    loss = lambda logits: F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())  # noqa: E731
    loss(model(ids).logits).backward()
    loss(hf(ids, use_cache=False).logits).backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    hf_name = {n: next(iter(blinkdl_to_hf({n: None}))) for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[hf_name[name]], atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def blinkdl_v4_tensors(dtype=torch.float16, seed=0):
    """Random tensors under exactly the keys and shapes of a BlinkDL RWKV-4 .pth."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
              "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
    for i in range(LAYERS):
        b, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        shapes.update({b + n: (C,) for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")})
        shapes.update({a + "time_decay": (C,), a + "time_first": (C,)})
        shapes.update({a + n: (1, 1, C) for n in ("time_mix_k", "time_mix_v", "time_mix_r")})
        shapes.update({a + n + ".weight": (C, C) for n in ("key", "value", "receptance", "output")})
        shapes.update({f + "time_mix_k": (1, 1, C), f + "time_mix_r": (1, 1, C), f + "key.weight": (FFN, C),
                       f + "receptance.weight": (C, C), f + "value.weight": (C, FFN)})
    sd = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if len(shape) == 2 and "emb" not in k:
            t = t / math.sqrt(shape[1])
        elif "time_mix" in k:
            t = torch.rand(shape, generator=g)
        sd[k] = t.to(dtype)
    return sd


def test_v4_pth_loads_and_matches_hf(tmp_path, transformers):
    sd = blinkdl_v4_tensors()
    torch.save(sd, tmp_path / "RWKV-4-tiny.pth")
    for path in (tmp_path / "RWKV-4-tiny.pth", tmp_path):
        assert detect_format(path).name == "rwkv4-pth"
        model = from_pretrained(path).eval()
        assert model.config == dict(vocab_size=V, d_model=C, n_layer=LAYERS, d_ffn=FFN, use_kernels="auto")
        assert model.emb.weight.dtype == torch.float32
    hf = transformers.RwkvForCausalLM(transformers.RwkvConfig(**hf_config(model))).eval()
    hf.load_state_dict(blinkdl_to_hf({k: v.float() for k, v in sd.items()}), strict=True)
    ids = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny()
    model.save_pretrained(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "model.pth").is_file()
    loaded = from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_bad_files_are_explained(tmp_path):
    sd = blinkdl_v4_tensors(dtype=torch.float32)
    sd["blocks.2.ffn.value.weight"] = torch.zeros(C, FFN + 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatch.*blocks\.2\.ffn\.value\.weight"):
        from_pretrained(tmp_path / "bad.pth")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "rwkv", "hidden_size": 8, "num_hidden_layers": 1, '
                                                 '"vocab_size": 5, "attention_hidden_size": 16}')
    with pytest.raises(CheckpointError, match="attention_hidden_size=16 != hidden_size=8"):
        from_pretrained(tmp_path / "hf")


def test_target_linears_and_kernel_option():
    model = tiny()
    assert list(model.target_linears(["att.key"])) == [f"blocks.{i}.att.key" for i in range(LAYERS)]
    assert len(model.target_linears(["ffn.receptance"])) == LAYERS
    with pytest.raises(ConfigError, match="no optional GPU kernel for RWKV-4"):
        RWKV4(vocab_size=V, d_model=C, n_layer=1, use_kernels=True)
