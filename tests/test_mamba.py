"""Mamba-1 backbone: recurrence equivalences, init, gradients, checkpoints, kernels dispatch, errors."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prosg.backbones.checkpoint import load_weights
from prosg.backbones.kernels import mamba_cuda
from prosg.backbones.kernels.scan_ref import selective_scan_bld_ref
from prosg.backbones.mamba import Mamba
from prosg.backbones.mamba_formats import _detect_hf_mamba, _detect_mamba_ssm
from prosg.backbones.registry import detect_format, from_pretrained
from prosg.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
V = 50


def tiny(**kw) -> Mamba:
    cfg = dict(vocab_size=V, d_model=32, n_layer=2, d_state=8)
    cfg.update(kw)
    return Mamba(**cfg).eval()


def assert_states_close(a, b, **tol):
    for (ca, sa), (cb, sb) in zip(a, b, strict=True):
        torch.testing.assert_close(ca, cb, **tol)
        torch.testing.assert_close(sa, sb, **tol)


# ---- recurrence ---------------------------------------------------------------------------
def test_forward_then_steps_equals_forward_equals_steps_from_start():
    model = tiny()
    ids = torch.randint(0, V, (3, 12))
    with torch.no_grad():
        full = model(ids)
        head = model(ids[:, :5])
        state, outs = head.state, [head.logits]
        for t in range(5, 12):
            o = model.step(ids[:, t], state)
            outs.append(o.logits[:, None])
            state = o.state
        torch.testing.assert_close(torch.cat(outs, 1), full.logits, atol=1e-5, rtol=1e-5)
        assert_states_close(state, full.state, atol=1e-5, rtol=1e-5)
        state, outs = model.init_state(3), []
        for t in range(12):
            o = model.step(ids[:, t], state)
            outs.append(o.logits)
            state = o.state
        torch.testing.assert_close(torch.stack(outs, 1), full.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("split", [1, 3, 7])  # shorter and longer than d_conv
def test_forward_continues_from_state(split):
    model = tiny()
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        full = model(ids)
        a = model(ids[:, :split])
        b = model(ids[:, split:], a.state)
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), full.logits, atol=1e-5, rtol=1e-5)
    assert_states_close(b.state, full.state, atol=1e-5, rtol=1e-5)


def test_state_layout_matches_mamba_ssm_cache():
    model = tiny(d_conv=3)
    state = model(torch.randint(0, V, (2, 5))).state
    assert len(state) == 2
    conv, ssm = state[0]
    assert conv.shape == (2, 64, 3) and ssm.shape == (2, 64, 8)
    # conv_state holds the last d_conv conv inputs (the x half of in_proj), as mamba_ssm's cache does
    ids = torch.randint(0, V, (2, 5))
    x = model.backbone.layers[0].norm(model.embed(ids))
    xs = model.backbone.layers[0].mixer.in_proj(x)[..., :64]
    torch.testing.assert_close(model(ids).state[0][0], xs[:, -3:].transpose(1, 2))


def test_gradients_match_reference_loop():
    model = tiny(n_layer=2).double().train()
    ref = copy.deepcopy(model)
    for block in ref.blocks:
        block.mixer.scan_fn = selective_scan_bld_ref
    ids = torch.randint(0, V, (2, 9))
    init = tuple((c.normal_(), s.normal_()) for c, s in model.init_state(2))

    def loss_and_grads(m):
        out = m(ids, init)
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + sum(s.pow(2).mean() for _, s in out.state)
        return loss, torch.autograd.grad(loss, list(m.parameters()))

    loss, grads = loss_and_grads(model)
    loss_ref, grads_ref = loss_and_grads(ref)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    for (name, _), g, gr in zip(model.named_parameters(), grads, grads_ref, strict=True):
        torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-10, msg=name)


def test_hooks_on_linears_see_parallel_and_step_calls():
    model = tiny()
    seen = []
    for name, lin in model.target_linears(["mixer.in_proj", "mixer.out_proj"]).items():
        lin.register_forward_hook(lambda m, i, o, name=name: seen.append((name, tuple(i[0].shape))))
    with torch.no_grad():
        out = model(torch.randint(0, V, (2, 6)))
        model.step(torch.randint(0, V, (2,)), out.state)
    assert seen[:2] == [("backbone.layers.0.mixer.in_proj", (2, 6, 32)), ("backbone.layers.0.mixer.out_proj", (2, 6, 64))]
    assert ("backbone.layers.1.mixer.out_proj", (2, 64)) in seen[4:]


def test_blocks_take_residual_stream_first():
    model = tiny()
    x = torch.randn(2, 4, 32)
    block = model.blocks[0]
    y, state = block(x)
    out, _ = block.mixer(block.norm(x))
    torch.testing.assert_close(y, x + out)
    y1, _ = block.step(x[:, 0], block.mixer.init_state(2))
    torch.testing.assert_close(y1, y[:, 0], atol=1e-6, rtol=1e-5)


def test_return_state_false_gives_same_logits():
    model = tiny()
    ids = torch.randint(0, V, (2, 7))
    out = model(ids, return_state=False)
    assert out.state is None
    torch.testing.assert_close(out.logits, model(ids).logits)


# ---- structure and init -----------------------------------------------------------------
def test_module_tree_matches_mamba_ssm_names():
    model = Mamba(vocab_size=V, d_model=16, n_layer=1, d_state=4)
    expected = ["backbone.embedding.weight"] + [
        f"backbone.layers.0.{k}" for k in (
            "norm.weight", "mixer.A_log", "mixer.D", "mixer.in_proj.weight", "mixer.conv1d.weight",
            "mixer.conv1d.bias", "mixer.x_proj.weight", "mixer.dt_proj.weight", "mixer.dt_proj.bias",
            "mixer.out_proj.weight")
    ] + ["backbone.norm_f.weight", "lm_head.weight"]
    assert sorted(model.state_dict()) == sorted(expected)
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert model.blocks is model.backbone.layers
    assert model.config["use_kernels"] == "auto" and model.config["d_state"] == 4


def test_vocab_padding_and_logit_slicing():
    model = tiny()
    assert model.backbone.embedding.weight.shape == (56, 32)
    assert model(torch.randint(0, V, (1, 3))).logits.shape == (1, 3, V)
    assert tiny(pad_vocab_size_multiple=1).backbone.embedding.num_embeddings == V


def test_init_follows_mamba_ssm():
    model = Mamba(vocab_size=V, d_model=64, n_layer=4, d_state=16, dt_min=0.002, dt_max=0.05)
    mixer = model.blocks[0].mixer
    assert mixer.d_inner == 128 and mixer.dt_rank == 4
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1, 17.0)).repeat(128, 1))
    torch.testing.assert_close(mixer.D, torch.ones(128))
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 0.002 * 0.999 and dt.max() <= 0.05 * 1.001
    with_bias = Mamba(vocab_size=V, d_model=64, n_layer=1, bias=True).blocks[0].mixer
    assert not with_bias.in_proj.bias.any() and not with_bias.out_proj.bias.any() and with_bias.dt_proj.bias.all()
    # out_proj: kaiming-uniform bound 1/sqrt(fan_in), divided by sqrt(n_layer)
    bound = 1 / math.sqrt(128) / math.sqrt(4)
    w = mixer.out_proj.weight.abs().max()
    assert 0.9 * bound < w <= bound
    assert abs(model.backbone.embedding.weight.std().item() - 0.02) < 0.004


# ---- errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(dt_rank=0), "dt_rank"), (dict(dt_rank="big"), "dt_rank"), (dict(d_state=0), "d_state"),
    (dict(expand=-1), "expand"), (dict(d_conv=1.5), "d_conv"), (dict(dt_min=0.5, dt_max=0.1), "dt_min"),
    (dict(use_kernels="yes"), "use_kernels"), (dict(vocab_size=0), "vocab_size"), (dict(dt_max="0.1"), "dt_max"),
])
def test_invalid_config(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kw)


@pytest.mark.skipif(mamba_cuda.load_kernels() is not None, reason="kernels are installed here")
def test_use_kernels_true_without_kernels_names_the_install():
    with pytest.raises(ConfigError, match=r"conda env create -f environment\.yml.*pip install --no-build-isolation -e \.\[cuda\]"):
        tiny(use_kernels=True)


def test_token_ids_checked():
    model = tiny()
    with pytest.raises(ConfigError, match=r"outside the vocabulary \[0, 50\)"):
        model(torch.tensor([[1, V]]))  # V < padded 56: a real row exists, still rejected
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        model.step(torch.tensor([-1]), model.init_state(1))


def test_wrong_state_rejected():
    model = tiny()
    ids = torch.randint(0, V, (2, 3))
    with pytest.raises(ConfigError, match="init_state"):
        model(ids, model.init_state(3))
    with pytest.raises(ConfigError, match="pairs"):
        model.step(ids[:, 0], model.init_state(2)[:1])


# ---- checkpoints --------------------------------------------------------------------------
def test_mamba_ssm_round_trip(tmp_path):
    model = tiny(norm_epsilon=1e-6, dt_rank=3)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["ssm_cfg"]["d_state"] == 8 and cfg["vocab_size"] == V and cfg["pad_vocab_size_multiple"] == 8
    sd = load_weights(tmp_path / "pytorch_model.bin")
    assert sd["backbone.embedding.weight"].shape == (56, 32) and "lm_head.weight" in sd
    assert detect_format(tmp_path).name == "mamba_ssm"
    loaded = from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_mamba_ssm_file_written_by_hand_with_padded_vocab(tmp_path):
    model = tiny()
    cfg = {"d_model": 32, "n_layer": 2, "vocab_size": V, "ssm_cfg": {"d_state": 8, "layer": "Mamba1", "dt_init": "random"},
           "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
           "tie_embeddings": True, "d_intermediate": 0, "attn_layer_idx": [], "attn_cfg": {}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = from_pretrained(tmp_path).eval()
    assert loaded.backbone.embedding.weight.shape == (56, 32)
    ids = torch.randint(0, V, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_shape_mismatch_names_the_key(tmp_path):
    tiny().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_model"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatch.*backbone\.embedding\.weight"):
        from_pretrained(tmp_path)


def test_untied_head_that_differs_is_an_error(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    sd = load_weights(tmp_path / "pytorch_model.bin")
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="tie_embeddings"):
        from_pretrained(tmp_path)


def test_unsupported_mamba_ssm_variants(tmp_path):
    tiny().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, ssm_cfg={"layer": "Mamba2"})))
    with pytest.raises(CheckpointError, match="Mamba2"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, ssm_cfg={"d_state": 8, "headdim": 64})))
    with pytest.raises(CheckpointError, match="headdim"):
        from_pretrained(tmp_path)


def test_empty_and_config_only_directories(tmp_path):
    with pytest.raises(CheckpointError, match="no recognisable checkpoint"):
        from_pretrained(tmp_path)
    tiny().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no weight file"):
        from_pretrained(tmp_path)


def test_detection_leaves_other_layouts_alone(tmp_path):
    for i, cfg in enumerate([
        {"model_type": "rwkv", "hidden_size": 32, "num_hidden_layers": 2},
        {"prosg_family": "gpt", "d_model": 32, "n_layer": 2, "ssm_cfg": {}},
        {"d_model": 32, "n_layer": 2, "vocab_size": 10},
    ]):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        assert not _detect_mamba_ssm(d) and not _detect_hf_mamba(d)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert not _detect_mamba_ssm(tmp_path / "bad")


def hf_layout(model: Mamba, directory: Path, fmt: str) -> None:
    """Write ``model`` the way transformers stores MambaForCausalLM (tied head dropped)."""
    directory.mkdir(parents=True, exist_ok=True)
    c = model.config
    cfg = {"model_type": "mamba", "vocab_size": model.backbone.embedding.num_embeddings, "hidden_size": c["d_model"],
           "state_size": c["d_state"], "num_hidden_layers": c["n_layer"], "conv_kernel": c["d_conv"], "expand": 2,
           "intermediate_size": 2 * c["d_model"], "time_step_rank": "auto", "use_bias": False,
           "use_conv_bias": True, "layer_norm_epsilon": 1e-5, "residual_in_fp32": True, "tie_word_embeddings": True}
    (directory / "config.json").write_text(json.dumps(cfg))
    sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v.clone() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(directory / "model.safetensors"))
    else:
        torch.save(sd, directory / "pytorch_model.bin")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_layout_without_lm_head(tmp_path, fmt):
    model = tiny(pad_vocab_size_multiple=1)
    hf_layout(model, tmp_path, fmt)
    assert detect_format(tmp_path).name == "hf-mamba"
    loaded = from_pretrained(tmp_path).eval()
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_transformers_mamba_checkpoint_gives_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=2, time_step_rank=3)).eval()
    hf.save_pretrained(str(tmp_path))
    model = from_pretrained(tmp_path).eval()
    assert model.blocks[0].mixer.dt_rank == 3
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits.float(), atol=1e-4, rtol=1e-4)


# ---- CUDA kernels ---------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernels_match_pure_path():
    if mamba_cuda.load_kernels() is None:
        pytest.skip(f"mamba_ssm / causal_conv1d not importable: {mamba_cuda.import_error()}")
    fast = tiny(use_kernels=True).cuda().train()
    pure = copy.deepcopy(fast)
    for block in pure.blocks:
        block.mixer.use_kernels = False
    ids = torch.randint(0, V, (2, 33), device="cuda")

    def grads(m, **kw):
        out = m(ids, **kw)
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten())
        return out, torch.autograd.grad(loss, list(m.parameters()))

    tol = dict(atol=2e-3, rtol=2e-3)
    (o_pure, g_pure), (o_fast, g_fast) = grads(pure), grads(fast)  # selective_scan_fn path (state returned)
    torch.testing.assert_close(o_fast.logits, o_pure.logits, **tol)
    assert_states_close(o_fast.state, o_pure.state, **tol)
    for a, b in zip(g_fast, g_pure):
        torch.testing.assert_close(a, b, **tol)
    o_fused, g_fused = grads(fast, return_state=False)  # fused mamba_inner_fn path
    torch.testing.assert_close(o_fused.logits, o_pure.logits, **tol)
    for a, b in zip(g_fused, g_pure):
        torch.testing.assert_close(a, b, **tol)
    handle = fast.blocks[0].mixer.out_proj.register_forward_hook(lambda m, i, o: o * 2)
    with torch.no_grad():  # a hook must disable the fused path and take effect
        hooked = fast(ids, return_state=False).logits
        pure.blocks[0].mixer.out_proj.register_forward_hook(lambda m, i, o: o * 2)
        torch.testing.assert_close(hooked, pure(ids).logits, **tol)
    handle.remove()
    with torch.no_grad():  # step kernels, and continuing from a state (pure fallback inside)
        s_fast, s_pure = fast(ids[:, :20]).state, pure(ids[:, :20]).state
        for t in range(20, 24):
            a, b = fast.step(ids[:, t], s_fast), pure.step(ids[:, t], s_pure)
            torch.testing.assert_close(a.logits, b.logits, **tol)
            s_fast, s_pure = a.state, b.state
        torch.testing.assert_close(fast(ids[:, 24:], s_fast).logits, pure(ids[:, 24:], s_pure).logits, **tol)


# ---- benchmark smoke ----------------------------------------------------------------------
@pytest.mark.slow
def test_benchmark_quick_prints_json():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "backbones.py"), "--quick", "--models", "mamba"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    kinds = [(r["bench"], r.get("model")) for r in records]
    assert ("train_step", "mamba") in kinds and kinds.count(("generate", "mamba")) == 2
    train = next(r for r in records if r["bench"] == "train_step")
    assert train["s_per_step"] > 0 and train["peak_mem_mb"] > 0 and train["tokens_per_s"] > 0
    assert any(r["bench"] == "ratio" and r["what"] == "mamba_generate_64_vs_16" for r in records)
    assert not [r for r in records if r["bench"] == "error"]
