"""The SG head on every backbone: exactness at zero delta, parallel == step, per-sample deltas."""

import pytest
import torch
import torch.nn.functional as F

from prosg.backbones import BACKBONES, build
from prosg.errors import ConfigError
from prosg.methods import ProSG
from prosg.module import ProSGModule
from prosg.sg import SGHead, compress
from prosg.sg.compress import svd_factors

FAMILIES = sorted(BACKBONES)
V = 24


def tiny(name):
    return build(name, vocab_size=V, d_model=64, n_layer=2).eval()


def randomize(head: SGHead, std: float = 0.2) -> None:
    """Give a fresh head non-zero output layers (they start at zero by design)."""
    with torch.no_grad():
        for p in head.grad_out.parameters():
            p.normal_(0, std)
        if head.transform_inputs:
            for p in head.in_write.parameters():
                p.normal_(0, std)


def attached(name, compression="slots", rank=4, **kw):
    bb = tiny(name)
    head = SGHead(rank=rank, compression=compression, **kw)
    head.attach(bb)
    return bb, head


@pytest.mark.parametrize("name", FAMILIES)
def test_fresh_head_changes_nothing(name):
    bb, head = attached(name)
    ids = torch.randint(0, V, (3, 10))
    with torch.no_grad():
        bare = bb(ids).logits
        with head.session(torch.tensor([4, 6, 10])):
            hooked = bb(ids).logits
    assert torch.equal(bare, hooked)


@pytest.mark.parametrize("compression", ["slots", "svd", "full"])
@pytest.mark.parametrize("name", FAMILIES)
def test_parallel_equals_steps_with_delta(name, compression):
    bb, head = attached(name, compression)
    randomize(head)
    ids = torch.randint(0, V, (2, 12))
    P = 5
    plen = torch.tensor([P, P])
    with torch.no_grad():
        bare = bb(ids).logits
        with head.session(plen):
            parallel = bb(ids).logits
        assert torch.equal(parallel[:, :P], bare[:, :P])  # the prompt never sees its own delta
        assert (parallel[:, P:] - bare[:, P:]).abs().max() > 1e-2
        with head.session(plen) as s:
            out = bb(ids[:, :P])
            state = out.state
            s.start_steps()
            steps = []
            for t in range(P, 12):
                o = bb.step(ids[:, t], state)
                steps.append(o.logits)
                state = o.state
    torch.testing.assert_close(torch.stack(steps, 1), parallel[:, P:], atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_sample_gets_its_own_delta(name):
    bb, head = attached(name, "slots")
    randomize(head)
    ids = torch.randint(0, V, (3, 11))
    plen = torch.tensor([5, 5, 5])
    swapped = ids[[1, 0, 2]]
    with torch.no_grad(), head.session(plen):
        a = bb(ids).logits
    with torch.no_grad(), head.session(plen):
        b = bb(swapped).logits
    torch.testing.assert_close(b, a[[1, 0, 2]], atol=1e-5, rtol=1e-5)


def test_ragged_prompts_match_single_samples():
    bb, head = attached("gpt", "slots")
    randomize(head)
    ids = torch.randint(0, V, (2, 12))
    plen = torch.tensor([4, 7])
    with torch.no_grad():
        with head.session(plen):
            both = bb(ids).logits
        for b in range(2):
            with head.session(plen[b : b + 1]):
                one = bb(ids[b : b + 1]).logits
            torch.testing.assert_close(one[0], both[b], atol=1e-5, rtol=1e-5)


def test_compressions_on_random_factors():
    torch.manual_seed(0)
    g, x = torch.randn(2, 6, 9, dtype=torch.double), torch.randn(2, 6, 7, dtype=torch.double)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    G = torch.einsum("bpo,bpi,bp->boi", g, x, mask.double())
    u, v = compress("full", g, x, mask, rank=3)
    torch.testing.assert_close(u @ v.transpose(1, 2), G)  # full == the uncompressed sum
    u, v = compress("svd", g, x, mask, rank=6)  # r >= rank(G) (<= 6 prompt positions): exact
    torch.testing.assert_close(u @ v.transpose(1, 2), G)
    u, v = svd_factors(g, x, mask, rank=2)  # r < rank: the best rank-2 approximation (Eckart-Young)
    U, S, Vh = torch.linalg.svd(G)
    best = U[..., :2] @ torch.diag_embed(S[..., :2]) @ Vh[..., :2, :]
    torch.testing.assert_close(u @ v.transpose(1, 2), best, atol=1e-6, rtol=1e-6)
    alpha = torch.softmax(torch.randn(2, 3, 6, dtype=torch.double), -1)
    u, v = compress("slots", g, x, mask, rank=3, alpha=alpha)
    torch.testing.assert_close(u[:, :, 0], (alpha[:, 0, :, None] * g).sum(1))


def test_oracle_gradient_equals_autograd():
    """With full compression, the oracle's U Vᵀ is exactly ∂L_prompt/∂W for every target."""
    bb, head = attached("gpt", "full", mode="oracle", targets=["attn.qkv", "mlp.fc"])
    ids = torch.randint(0, V, (2, 9))
    plen = torch.tensor([9, 6])
    grads = head.prompt_gradients(ids, plen)
    with torch.no_grad(), head.session(plen, grads) as s:
        bb(ids)
    modules = dict(bb.named_modules())
    for b in range(2):
        p = int(plen[b])
        bb.zero_grad()
        logits = bb(ids[b : b + 1, :p]).logits
        F.cross_entropy(logits[0, :-1], ids[b, 1:p]).backward()
        for t in head.targets:
            u, v = s.factors[t.name]
            torch.testing.assert_close(u[b] @ v[b].T, modules[t.name].weight.grad, atol=1e-5, rtol=1e-4)


def test_aux_loss_zero_when_synthetic_matches_true():
    from prosg.sg.head import relative_error

    bb, head = attached("gpt", "full", targets=["attn.qkv"])
    ids = torch.randint(0, V, (2, 8))
    plen = torch.tensor([5, 5])
    true = head.prompt_gradients(ids, plen)
    with head.session(plen) as s:
        bb(ids)
    assert head.aux_loss(s, true).item() == pytest.approx(1.0)  # Δ̂ = 0 (fresh head): relative error 1
    exact = {k: v[:, :5] for k, v in true.items()}
    assert relative_error([exact], [true], [plen]).item() == pytest.approx(0.0, abs=1e-12)
    half = {k: v / 2 for k, v in exact.items()}
    assert relative_error([half], [true], [plen]).item() == pytest.approx(0.25, rel=1e-5)


@pytest.mark.parametrize("compression", ["slots", "svd"])
def test_aux_loss_trains_the_head_only_and_its_delta_is_the_one_applied(compression):
    """DNI: the regression onto the true gradient trains the synthetic-gradient network, never the jointly
    trained backbone (whose response-loss gradient still flows); the Δ̂ it regresses is the pass's own."""
    torch.manual_seed(0)
    bb = tiny("rwkv7")
    method = ProSG(targets=["att.output"], rank=4, compression=compression, aux_weight=1.0)
    method.attach(bb)
    for p in method.head.grad_out.parameters():
        torch.nn.init.normal_(p, std=0.1)  # a non-zero Δ̂, so both losses reach the head
    batch = {"input_ids": torch.randint(0, V, (3, 10)), "prompt_len": torch.tensor([4, 4, 4])}
    method.train()
    out = method(batch)
    backbone = [p for p in bb.parameters()]
    aux_grads = torch.autograd.grad(out.aux["aux"], backbone + list(method.head.parameters()), allow_unused=True)
    assert all(g is None or not g.any() for g in aux_grads[: len(backbone)])
    assert any(g is not None and g.abs().sum() > 0 for g in aux_grads[len(backbone):])
    resp = torch.autograd.grad(out.logits.square().mean(), backbone, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in resp)
    with method.head.session(batch["prompt_len"], defer=True) as s:  # the pass's Δ̂, as the deferred path makes it
        bb(batch["input_ids"][:, :4])
        s.start_steps()
        recomputed = method.head.synthetic(s)
    for t in method.head.targets:
        torch.testing.assert_close(recomputed[t.name], s.synthetic[t.name])
        assert s.synthetic[t.name] is not recomputed[t.name]  # recomputed: H reaches the backbone here
    for p in bb.parameters():  # frozen: nothing to cut, the pass's own Δ̂ is regressed
        p.requires_grad_(False)
    with method.head.session(batch["prompt_len"], defer=True) as s:
        bb(batch["input_ids"][:, :4])
        s.start_steps()
        assert all(method.head.synthetic(s)[t.name] is s.synthetic[t.name] for t in method.head.targets)


def test_rank_larger_than_layer():
    with pytest.raises(ConfigError, match="rank=65 exceeds what layer"):
        attached("gpt", "slots", rank=65, targets=["attn.proj"])


def test_target_pattern_matching_nothing_lists_names():
    bb = tiny("gpt")
    with pytest.raises(ConfigError, match="(?s)matches no linear.*attn.qkv"):
        SGHead(targets=["in_proj"]).attach(bb)


def test_bad_options():
    with pytest.raises(ConfigError, match="compression"):
        SGHead(compression="pca")
    with pytest.raises(ConfigError, match="mode"):
        SGHead(mode="teacher")


def test_oracle_refuses_inference_mode():
    bb, head = attached("gpt", "full", mode="oracle")
    with torch.inference_mode(), pytest.raises(ConfigError, match="inference_mode: false"):
        head.prompt_gradients(torch.randint(0, V, (1, 5)), torch.tensor([5]))


@pytest.mark.parametrize("name", FAMILIES)
def test_single_sample_generation_merges_and_restores(name):
    """B=1 without autograd folds ΔW into W while stepping: same logits, weights restored after."""
    bb, head = attached(name, "slots")
    randomize(head)
    ids = torch.randint(0, V, (1, 10))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    with torch.no_grad():
        with head.session(torch.tensor([4])):
            parallel = bb(ids).logits
        with head.session(torch.tensor([4])) as s:
            state = bb(ids[:, :4]).state
            s.start_steps()
            assert s.merged and not s.hooks  # weights merged, hooks gone
            steps = []
            for t in range(4, 10):
                o = bb.step(ids[:, t], state)
                steps.append(o.logits)
                state = o.state
    torch.testing.assert_close(torch.stack(steps, 1), parallel[:, 4:], atol=2e-4, rtol=1e-3)
    for k, v in bb.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", ["mamba", "rwkv7"])
def test_prompt_state_dropout_runs_responses_on_the_delta_alone(name):
    bb, method = tiny(name), ProSG(rank=4, prompt_state_dropout=0.999)
    module = ProSGModule(backbone=bb, method=method, freeze_backbone=False).train()
    head = method.head
    randomize(head)
    plen = torch.tensor([3, 5, 4])
    ids = torch.randint(0, V, (3, 12))
    torch.manual_seed(0)
    with torch.no_grad():
        logits = module({"input_ids": ids, "prompt_len": plen}).logits
        with head.session(plen):
            kept = bb(ids).logits
        for b, p in enumerate(plen.tolist()):
            # reference: the generation path — deltas from the prompt, then the response from an empty state
            with head.session(plen[b : b + 1]) as s:
                prompt_logits = bb(ids[b : b + 1, :p]).logits
                s.start_steps()
                resp = bb(ids[b : b + 1, p:]).logits
            torch.testing.assert_close(logits[b, p:], resp[0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(logits[b, :p], prompt_logits[0], atol=2e-5, rtol=1e-4)
            # the state path is really cut: the response logits differ from the full-sequence ones
            assert not torch.allclose(logits[b, p:], kept[b, p:], atol=1e-3)
    module.eval()  # evaluation never drops
    with torch.no_grad(), head.session(plen):
        full = bb(ids).logits
    torch.testing.assert_close(module({"input_ids": ids, "prompt_len": plen}).logits, full)


def double_pass_reference(method: ProSG, ids, plen, drop):
    """Prompt-state dropout as it was first implemented: every sample's prompt + response in one pass, then
    the dropped samples' responses again from an empty state (the generation path), written over theirs."""
    bb, head = method.backbone, method.head
    with head.session(plen) as s:
        logits = bb.forward_embeds(bb.embed(ids)).logits
        if not drop.any():
            return logits
        rows = drop.nonzero().squeeze(1)
        T = ids.shape[1]
        R = int(T - plen[rows].min())
        idx = plen[rows, None] + torch.arange(R)
        valid = idx < T
        resp = torch.where(valid, ids[rows].gather(1, idx.clamp(max=T - 1)), 0)
        s.start_steps()
        s.select(rows)
        resp_logits = bb.forward_embeds(bb.embed(resp)).logits
        out = logits.clone()
        out[rows[:, None].expand_as(idx)[valid], idx[valid]] = resp_logits[valid]
    return out


@pytest.mark.parametrize("prompts", ["equal", "ragged"])
@pytest.mark.parametrize("name", FAMILIES)
def test_dropout_runs_each_response_once_with_the_double_pass_numbers(name, prompts):
    """ProSG.forward (each response once: equal prompts continue from the prompts' state, emptied for the
    dropped samples; ragged ones split kept / dropped samples) gives the double pass's logits, loss and
    gradients for the same dropout mask — and without dropout those of the one-pass session."""
    torch.manual_seed(0)
    method = ProSG(rank=4, prompt_state_dropout=0.5)
    module = ProSGModule(backbone=tiny(name), method=method, freeze_backbone=False).train()
    randomize(method.head, 0.05)
    ids = torch.randint(1, V, (6, 12))
    plen = torch.tensor([4] * 6) if prompts == "equal" else torch.tensor([4, 6, 3, 4, 5, 6])
    weight = torch.rand(6, 12)  # a loss over every position, so every logit's gradient counts
    params = [p for p in module.parameters() if p.requires_grad]

    def loss_and_grads(logits):
        loss = (F.cross_entropy(logits.transpose(1, 2), ids, reduction="none") * weight).sum()
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    for drop in (torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.bool), torch.ones(6, dtype=torch.bool),
                 torch.zeros(6, dtype=torch.bool)):
        method.draw_dropout = lambda n, drop=drop: drop
        new = module({"input_ids": ids, "prompt_len": plen}).logits
        ref = double_pass_reference(method, ids, plen, drop)
        torch.testing.assert_close(new, ref, atol=2e-5, rtol=1e-4)
        (l_new, g_new), (l_ref, g_ref) = loss_and_grads(new), loss_and_grads(
            double_pass_reference(method, ids, plen, drop))
        torch.testing.assert_close(l_new, l_ref, atol=1e-4, rtol=1e-5)
        for a, b in zip(g_new, g_ref):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_dropout_mask_comes_from_the_method_generator_and_resumes():
    """The mask is drawn from the method's own generator (not torch's global stream), which extra_state carries."""
    method = ProSG(rank=4, prompt_state_dropout=0.5)
    ProSGModule(backbone=tiny("mamba"), method=method, freeze_backbone=False).train()
    state = method.extra_state()
    torch.manual_seed(123)
    first = [method.draw_dropout(16) for _ in range(3)]
    torch.manual_seed(456)  # the global stream does not matter
    method.load_extra_state(state)
    assert all(torch.equal(a, method.draw_dropout(16)) for a in first)
    method.eval()
    assert method.draw_dropout(16) is None


def test_low_rank_add_gradients():
    from prosg.sg.inject import LowRankAdd

    torch.manual_seed(0)
    args = [torch.randn(2, 5, 3, dtype=torch.double, requires_grad=True),  # out (B, L, o)
            torch.randn(2, 5, 4, dtype=torch.double, requires_grad=True),  # x (B, L, i)
            torch.randn(2, 2, 4, dtype=torch.double, requires_grad=True),  # Vt (B, r, i)
            torch.randn(2, 2, 3, dtype=torch.double, requires_grad=True)]  # Ut (B, r, o)
    mask = (torch.rand(2, 1, 5) > 0.3).double()
    assert torch.autograd.gradcheck(lambda *a: LowRankAdd.apply(*a, mask), args)
    out, x, vt, ut = args
    torch.testing.assert_close(LowRankAdd.apply(out, x, vt, ut, mask), out + ((x @ vt.mT) * mask.mT) @ ut)
    # inplace (the patched linear's fresh output): the delta goes into that tensor; gradients are unchanged,
    # for a linear's output that is a view of its 2-D result (a bias) and one that is not
    lin = torch.nn.Linear(4, 3, dtype=torch.double)
    for bias in (True, False):
        lin.bias.requires_grad_(bias)
        grads = []
        for inplace in (False, True):
            y_lin = torch.nn.functional.linear(x, lin.weight, lin.bias if bias else None)
            y = LowRankAdd.apply(y_lin, x, vt, ut, mask, inplace)
            assert (y is y_lin) == inplace
            grads.append(torch.autograd.grad((y * y).sum(), [x, vt, ut, lin.weight]))
        for a, b in zip(*grads):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", FAMILIES)
def test_training_step_under_bf16_autocast(name):
    """bf16-mixed (conf/trainer/gpu.yaml): the fused low-rank add gets bf16 outputs and fp32 factors;
    forward and backward must run, and the gradients reach the head."""
    from prosg.methods import ProSG

    torch.manual_seed(0)
    method = ProSG(rank=4, prompt_state_dropout=0.5)
    method.attach(tiny(name))
    method.train()
    with torch.no_grad():
        for p in method.head.parameters():
            p.normal_(0, 0.1)
    ids = torch.randint(0, V, (4, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method({"input_ids": ids, "prompt_len": torch.full((4,), 5)})
    out.logits.float().square().mean().backward()
    grads = [p.grad for p in method.head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_one_session_per_backbone():
    from prosg.backbones.kernels.mamba_cuda import has_hooks

    bb, head = attached("mamba")
    mixer = bb.blocks[0].mixer
    with head.session(torch.tensor([3])):
        assert has_hooks(mixer.in_proj)  # a patched forward keeps Mamba's fused CUDA path (which skips it) off
        with pytest.raises(RuntimeError, match="one SG session per backbone"):
            with head.session(torch.tensor([3])):
                pass
    assert not any("forward" in vars(m) for m in bb.modules())  # every patch removed
    assert not has_hooks(mixer.in_proj)


def test_prompt_state_dropout_range():
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\)"):
        ProSG(rank=2, prompt_state_dropout=1.0)


def test_rank_larger_than_every_layer_is_an_error_not_a_plain_model():
    with pytest.raises(ConfigError, match="(?s)no block linear.*can hold a rank-512 delta.*lower the rank"):
        SGHead(rank=512).attach(tiny("gpt"))
