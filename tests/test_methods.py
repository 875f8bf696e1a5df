"""The Method seam, generically: every method on every backbone gives the same numbers teacher-forced
(parallel) and in generation (prefill + one step per token), owns its parameters, counts its memory."""

import pytest
import torch

from prosg.backbones import BACKBONES, build
from prosg.errors import ConfigError
from prosg.generate import generate
from prosg.methods import JRT, GlobalPromptCell, Method, Oracle, Plain, ProSG, SoftPrompt
from prosg.module import ProSGModule

FAMILIES = sorted(BACKBONES)
V = 24
METHODS = {
    "plain": Plain,
    "jrt": JRT,
    "soft_prompt": lambda: SoftPrompt(n_tokens=3),
    "gpc": lambda: GlobalPromptCell(n_tokens=3, d_cell=8),
    "sg": lambda: ProSG(rank=4),
    "sg_svd": lambda: ProSG(rank=4, compression="svd"),
    "oracle": lambda: Oracle(rank=4, compression="full"),
    "oracle_answers": lambda: Oracle(rank=4, compression="full", loss="answers"),
}


def tiny(name):
    return build(name, vocab_size=V, d_model=64, n_layer=2).eval()


def attached(family: str, method: str) -> Method:
    m = METHODS[method]()
    m.attach(tiny(family))
    m.eval()
    if isinstance(m, ProSG):  # fresh heads are exactly zero by design; give them something to carry
        with torch.no_grad():
            for p in m.head.grad_out.parameters():
                p.normal_(0, 0.2)
            m.head.eta.fill_(3.0)
    if isinstance(m, GlobalPromptCell):  # a fresh cell writes exactly zero; give it something to write
        randomise_cell(m)
    return m


def randomise_cell(m: GlobalPromptCell) -> None:
    with torch.no_grad():
        m.write.normal_(0, 0.5)
        m.query.normal_(0, 1.0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_forced_equals_generation(family, method):
    m = attached(family, method)
    ids = torch.randint(1, V, (2, 11))
    P = 4
    answers = ids[:, 1:P:2]  # every other prompt token is an "answer" (recall's values)
    batch = m.prepare({"input_ids": ids, "prompt_len": torch.tensor([P, P]), "candidates": answers}, pad_id=0)
    Pm = int(batch["prompt_len"][0])  # the prompt as the method reads it (JRT: twice)
    with torch.no_grad():
        teacher = m(batch).logits[:, Pm - 1 : -1]  # predictions of tokens P..10
        steps = []
        with m.prefill(ids[:, :P], answers) as out:
            steps.append(out.logits)
            state = out.state
            for t in range(P, 10):
                o = m.backbone.step(ids[:, t], state)
                steps.append(o.logits)
                state = o.state
    torch.testing.assert_close(torch.stack(steps, 1), teacher, atol=3e-4, rtol=1e-3)


@pytest.mark.parametrize("method", ["sg", "oracle", "soft_prompt", "gpc"])
def test_method_changes_the_response_but_not_the_plain_prompt_logits(method):
    m = attached("gpt", method)
    plain = Plain()
    plain.attach(m.backbone)
    ids = torch.randint(1, V, (2, 9))
    batch = {"input_ids": ids, "prompt_len": torch.tensor([4, 4])}
    with torch.no_grad():
        a, b = m(batch).logits, plain(batch).logits
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-4)
    if method not in ("soft_prompt", "gpc"):  # a prefix changes every position; a delta only those after the prompt
        torch.testing.assert_close(a[:, :4], b[:, :4])


def test_answers_oracle_takes_the_gradient_of_the_answer_tokens_only():
    m = attached("gpt", "oracle")
    ids = torch.randint(1, V, (1, 7))
    plen = torch.tensor([7])
    full = m.head.prompt_gradients(ids, plen)
    only = m.head.prompt_gradients(ids, plen, answers=ids[:, [2, 4]])
    none = m.head.prompt_gradients(ids, plen, answers=torch.full((1, 2), -1))
    name = m.head.targets[0].name
    assert not torch.allclose(full[name], only[name]) and only[name].abs().sum() > 0
    assert none[name].abs().sum() == 0  # no answer token in the prompt: no gradient
    with pytest.raises(ConfigError, match="loss="):
        Oracle(loss="response")


def test_generate_takes_a_backbone_or_a_method():
    m = attached("mamba", "sg")
    prompt = torch.randint(1, V, (2, 5))
    with_delta = generate(m, prompt, 6)
    bare = generate(m.backbone, prompt, 6)
    assert with_delta.shape == bare.shape == (2, 6)
    with pytest.raises(ConfigError, match="takes a Backbone or a Method"):
        generate("mamba", prompt, 3)


def test_memory_size_counts_what_generation_holds():
    bb = tiny("mamba")
    m = ProSG(rank=4)
    m.attach(bb)
    assert m.memory_size() == sum(4 * (t.d_in + t.d_out) for t in m.head.targets) > 0
    for name in ("plain", "jrt", "soft_prompt"):  # nothing per sample beyond the backbone's state
        assert attached("mamba", name).memory_size() == 0
    gpc = attached("mamba", "gpc")  # one D-vector per block, added to every generated token
    assert gpc.memory_size() == len(gpc.backbone.blocks) * gpc.backbone.d_model
    full = Oracle(rank=4, compression="full")
    full.attach(tiny("gpt"))
    full.prefill(torch.randint(1, V, (1, 7))).__enter__()
    assert full.memory_size() == sum(7 * (t.d_in + t.d_out) for t in full.head.targets)


def test_module_trains_only_what_the_method_owns():
    module = ProSGModule(backbone=tiny("gpt"), method=ProSG(rank=4))  # ProSG freezes by default
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert [g["name"] for g in groups] == ["head"]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in module.method.parameters())
    with pytest.raises(ConfigError, match="trains only its own parameters"):
        ProSGModule(backbone=tiny("gpt"), method=SoftPrompt(2), freeze_backbone=False)
    with pytest.raises(ConfigError, match="nothing to train"):
        ProSGModule(backbone=tiny("gpt"), freeze_backbone=True).configure_optimizers()


def test_a_method_attaches_once():
    m = ProSG(rank=2)
    m.attach(tiny("gpt"))
    with pytest.raises(RuntimeError, match="already attached"):
        m.attach(tiny("gpt"))


@pytest.mark.parametrize("method", ["plain", "jrt", "soft_prompt", "sg", "gpc"])
@pytest.mark.parametrize("family", ["mamba", "rwkv7", "gpt"])
def test_forced_text_after_the_prompt_reaches_the_model_like_generated_tokens(family, method):
    m = attached(family, method)
    ids = torch.randint(1, V, (2, 9))
    P, F = 3, 4
    batch = m.prepare({"input_ids": ids, "prompt_len": torch.tensor([P, P])}, pad_id=0)
    shift = int(batch["prompt_len"][0]) - P  # JRT reads the prompt twice
    with torch.no_grad():
        teacher = m(batch).logits[:, shift + P + F - 1]  # prediction of token P + F
        # generate continues greedily from the teacher-forced text: its first token is the teacher's argmax
        new = generate(m, ids[:, :P], 1, forced=ids[:, P : P + F])
    assert torch.equal(new[:, 0], teacher.argmax(-1))


# -- the Global Prompt Cell ---------------------------------------------------------------------
def soft_prompt_twin(m: GlobalPromptCell) -> SoftPrompt:
    """Plain prompt tuning with the GPC's prefix, on the same backbone."""
    sp = SoftPrompt(m.n_tokens)
    sp.attach(m.backbone)
    with torch.no_grad():
        sp.prefix.copy_(m.prefix)
    return sp.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_gpc_is_exactly_plain_prompt_tuning(family):
    m = GlobalPromptCell(n_tokens=3)
    m.attach(tiny(family))
    m.eval()
    ids = torch.randint(1, V, (2, 9))
    batch = {"input_ids": ids, "prompt_len": torch.tensor([3, 5])}
    sp = soft_prompt_twin(m)
    assert torch.equal(m.prefix, sp.prefix)  # same initial prefix as SoftPrompt (it is one)
    with torch.no_grad():
        assert torch.equal(m(batch).logits, sp(batch).logits)
        with m.prefill(ids[:, :4]) as a, sp.prefill(ids[:, :4]) as b:
            assert torch.equal(a.logits, b.logits)
            assert torch.equal(m.backbone.step(ids[:, 4], a.state).logits, m.backbone.step(ids[:, 4], b.state).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_gpc_writes_only_after_each_prompt(family):
    """Exact: every prompt position (soft tokens included) is plain prompt tuning's; the positions after differ."""
    m = attached(family, "gpc")
    ids = torch.randint(1, V, (2, 9))
    plen = torch.tensor([3, 5])
    sp = soft_prompt_twin(m)
    with torch.no_grad():
        a, b = m({"input_ids": ids, "prompt_len": plen}).logits, sp({"input_ids": ids, "prompt_len": plen}).logits
    for row, p in enumerate(plen.tolist()):
        assert torch.equal(a[row, :p], b[row, :p])
        assert not torch.allclose(a[row, p:], b[row, p:], atol=1e-4)


@pytest.mark.parametrize("family", ["mamba", "rwkv7", "lstm"])
def test_gpc_with_prompts_of_different_lengths_equals_each_alone(family):
    m = attached(family, "gpc")
    ids = torch.randint(1, V, (2, 10))
    plen = torch.tensor([3, 6])
    with torch.no_grad():
        both = m({"input_ids": ids, "prompt_len": plen}).logits
        for row, p in enumerate(plen.tolist()):
            alone = m({"input_ids": ids[row : row + 1], "prompt_len": plen[row : row + 1]}).logits
            torch.testing.assert_close(both[row : row + 1], alone, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["mamba", "rwkv7", "gpt"])
def test_gpc_memory_carries_the_prompt_without_the_state(family):
    """In generation the prompt also lives outside the recurrent state: from an empty state, two prompts
    still give different next-token logits with GPC, identical ones with plain prompt tuning."""
    m = attached(family, "gpc")
    sp = soft_prompt_twin(m)
    bb = m.backbone
    prompts = torch.randint(1, V, (2, 1, 5))
    token = torch.randint(1, V, (1,))
    with torch.no_grad():
        def after_empty_state(method):
            outs = []
            for p in prompts:
                with method.prefill(p):
                    outs.append(bb.step(token, bb.init_state(1)).logits)
            return outs
        g, s = after_empty_state(m), after_empty_state(sp)
    assert not torch.allclose(g[0], g[1], atol=1e-4)
    assert torch.equal(s[0], s[1])


@pytest.mark.parametrize("family", ["mamba", "rwkv7", "gpt"])  # gpt: a KV cache, emptied by a pass of its own
def test_gpc_prompt_state_dropout_runs_dropped_responses_from_an_empty_state(family):
    """Kept rows: exactly the one-pass forward. Dropped rows: the prompt's logits, then the response from an empty
    state with the writes alone carrying the prompt (as generation after ``prefill`` from an empty state)."""
    m = GlobalPromptCell(n_tokens=3, d_cell=8, prompt_state_dropout=0.5)
    m.attach(tiny(family))
    randomise_cell(m)
    m.train()  # dropout draws only in training; the tiny backbones have no dropout layers of their own
    bb, P = m.backbone, 4
    with torch.no_grad():  # RWKV-7 starts its blocks' output projections at zero: no past would reach a logit
        for w in bb.parameters():
            if w.dim() == 2 and not w.any():
                w.normal_(0, 0.1)
    ids = torch.randint(1, V, (4, 10))
    plen = torch.full((4,), P)
    drop = torch.tensor([True, False, True, False])
    with torch.no_grad():
        m.draw_dropout = lambda n: torch.zeros(n, dtype=torch.bool)
        full = m({"input_ids": ids, "prompt_len": plen}).logits
        m.draw_dropout = lambda n: drop
        split = m({"input_ids": ids, "prompt_len": plen}).logits
        torch.testing.assert_close(m._forward_with_dropout(ids, plen, torch.zeros_like(drop)), full, atol=3e-5, rtol=1e-4)
        for row in range(4):
            torch.testing.assert_close(split[row, :P], full[row, :P], atol=3e-5, rtol=1e-4)
            if not drop[row]:
                torch.testing.assert_close(split[row], full[row], atol=3e-5, rtol=1e-4)
                continue
            with m.prefill(ids[row : row + 1, :P]):
                alone = bb.forward_embeds(bb.embed(ids[row : row + 1, P:])).logits[0]
            torch.testing.assert_close(split[row, P:], alone, atol=3e-5, rtol=1e-4)
            assert (split[row, P:] - full[row, P:]).abs().max() > 1e-6  # the prompt's state did matter (little, untrained)
    # the dropped rows' response loss trains the cell (through the writes) as well as the prefix
    loss = m({"input_ids": ids, "prompt_len": plen}).logits[drop, P:].logsumexp(-1).sum()
    loss.backward()
    assert loss.requires_grad and m.write.grad.abs().sum() > 0 and m.gates.weight.grad.abs().sum() > 0


def test_gpc_prompt_state_dropout_checks_its_input():
    with pytest.raises(ConfigError, match="prompt_state_dropout=1.0 must be in"):
        GlobalPromptCell(2, prompt_state_dropout=1.0)
    m = GlobalPromptCell(2, d_cell=4, prompt_state_dropout=0.5)
    m.attach(tiny("rwkv7"))
    m.train()
    for dropped in (torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)):  # whatever the draw
        m.draw_dropout = lambda n, dropped=dropped: dropped
        with pytest.raises(ConfigError, match="prompts of one length"):
            m({"input_ids": torch.randint(1, V, (2, 8)), "prompt_len": torch.tensor([3, 4])})
    state = m.extra_state()  # the draws resume from a checkpoint, as ProSG's do
    del m.draw_dropout
    first = [m.draw_dropout(16) for _ in range(2)]
    m.load_extra_state(state)
    assert all(torch.equal(a, m.draw_dropout(16)) for a in first)


def test_gpc_hooks_are_removed_after_use():
    m = attached("mamba", "gpc")
    bb = m.backbone
    ids = torch.randint(1, V, (1, 6))
    with torch.no_grad():
        before = bb(ids).logits
        m({"input_ids": ids, "prompt_len": torch.tensor([3])})
        with m.prefill(ids[:, :3]) as out:
            bb.step(ids[:, 3], out.state)
        assert torch.equal(bb(ids).logits, before)
    assert all(not blk._forward_pre_hooks and "step" not in vars(blk) for blk in bb.blocks)


def test_gpc_trains_only_its_own_parameters():
    module = ProSGModule(backbone=tiny("rwkv7"), method=GlobalPromptCell(n_tokens=2, d_cell=4))
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in module.method.parameters())
    assert not any(p.requires_grad for p in module.backbone.parameters())
    with pytest.raises(ConfigError, match="trains only its own parameters"):
        ProSGModule(backbone=tiny("gpt"), method=GlobalPromptCell(2), freeze_backbone=False)
    with pytest.raises(ConfigError, match="d_cell=0"):
        GlobalPromptCell(2, d_cell=0)
