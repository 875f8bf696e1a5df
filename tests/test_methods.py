"""The Method seam, generically: every method on every backbone gives the same numbers teacher-forced
(parallel) and in generation (prefill + one step per token), owns its parameters, counts its memory."""

import pytest
import torch

from prosg.backbones import BACKBONES, build
from prosg.errors import ConfigError
from prosg.generate import generate
from prosg.methods import JRT, Method, Oracle, Plain, ProSG, SoftPrompt
from prosg.module import ProSGModule

FAMILIES = sorted(BACKBONES)
V = 24
METHODS = {
    "plain": Plain,
    "jrt": JRT,
    "soft_prompt": lambda: SoftPrompt(n_tokens=3),
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
    return m


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


@pytest.mark.parametrize("method", ["sg", "oracle", "soft_prompt"])
def test_method_changes_the_response_but_not_the_plain_prompt_logits(method):
    m = attached("gpt", method)
    plain = Plain()
    plain.attach(m.backbone)
    ids = torch.randint(1, V, (2, 9))
    batch = {"input_ids": ids, "prompt_len": torch.tensor([4, 4])}
    with torch.no_grad():
        a, b = m(batch).logits, plain(batch).logits
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-4)
    if method != "soft_prompt":  # a prefix changes every position; a delta only those after the prompt
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


@pytest.mark.parametrize("method", ["plain", "jrt", "soft_prompt", "sg"])
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
