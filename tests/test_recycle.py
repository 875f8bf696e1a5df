"""``prosg recycle``: recyclers of soft prompts and SG heads, their shapes and identities, and the command end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from prosg.backbones import build
from prosg.cli import main as prosg_main
from prosg.errors import ConfigError
from prosg.generate import generate
from prosg.methods import GlobalPromptCell, Method, Oracle, ProSG, SoftPrompt
from prosg.recycle import (
    PROMPT_RECYCLERS, RecycledHead, embedding_table, fit_head_maps, fit_linear, recycle, recycle_prefix, task_free_ids,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
V = 24


def tiny(family: str = "gpt", d_model: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    kw = {"head_size": 8} if family == "rwkv7" else {}
    return build(family, vocab_size=V, d_model=d_model, n_layer=2, **kw).eval()


def trained(method: Method, backbone) -> Method:
    """``method`` on ``backbone`` with parameters moved away from their (exactly neutral) initialisation."""
    method.attach(backbone)
    with torch.no_grad():
        if isinstance(method, ProSG):
            for p in method.head.grad_out.parameters():
                p.normal_(0, 0.2)
            method.head.eta.fill_(3.0)
        else:
            method.prefix.add_(torch.randn_like(method.prefix))
    return method.eval()


def logits(method: Method, ids: torch.Tensor, plen: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return method({"input_ids": ids, "prompt_len": torch.tensor(plen)}).logits


# -- least squares and the prompt recyclers ---------------------------------------------------------
def test_linear_recycler_recovers_a_known_map():
    e_src = torch.randn(40, 16, dtype=torch.float64)
    known = torch.randn(16, 24, dtype=torch.float64)
    prefix = torch.randn(5, 16, dtype=torch.float64)
    out = recycle_prefix(prefix, e_src, e_src @ known, "linear")
    torch.testing.assert_close(out, prefix @ known)
    # every source token in the combination: the same least-squares map
    torch.testing.assert_close(recycle_prefix(prefix, e_src, e_src @ known, "combination", top_k=40), prefix @ known)
    assert recycle_prefix(prefix.float(), e_src.float(), (e_src @ known).float(), "combination", top_k=4).shape == (5, 24)


def test_fit_linear_priors_on_directions_the_data_does_not_determine():
    x = torch.randn(50, 6, dtype=torch.float64)
    x[:, -1] = 0  # one direction never seen
    y = x @ torch.randn(6, 6, dtype=torch.float64)
    zero, ident = fit_linear(x, y), fit_linear(x, y, identity_prior=True)
    torch.testing.assert_close(x @ zero, y)
    torch.testing.assert_close(x @ ident, y)
    assert zero[-1].abs().max() == 0 and ident[-1, -1] == 1 and ident[-1, :-1].abs().max() < 1e-12
    torch.testing.assert_close(fit_linear(x, x, identity_prior=True), torch.eye(6, dtype=torch.float64))
    shrunk = fit_linear(x, y, ridge=10.0, identity_prior=True)
    assert (x @ shrunk - y).norm() > 1e-3  # ridge: pulled towards the identity


@pytest.mark.parametrize("recycler", PROMPT_RECYCLERS)
def test_recycled_prompt_on_an_identical_backbone(recycler):
    # an untrained prefix is made of real token embeddings: every recycler rebuilds it exactly
    fresh = SoftPrompt(4)
    fresh.attach(tiny("gpt"))
    target = copy.deepcopy(fresh.backbone)
    rec = recycle(fresh, target, recycler)
    rec.attach(target)
    ids = torch.randint(1, V, (2, 9))
    torch.testing.assert_close(rec.prefix, fresh.prefix, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits(rec, ids, [3, 5]), logits(fresh, ids, [3, 5]), atol=1e-5, rtol=1e-5)
    # a trained prefix: identity copies it, linear keeps its part inside the span of the embeddings
    src = trained(SoftPrompt(4), fresh.backbone)
    rec = recycle(src, target, recycler)
    rec.attach(target)
    if recycler == "identity":
        assert torch.equal(logits(rec, ids, [3, 5]), logits(src, ids, [3, 5]))
    elif recycler == "linear":
        e = embedding_table(src.backbone, V)
        torch.testing.assert_close(rec.prefix, src.prefix @ torch.linalg.pinv(e) @ e, atol=1e-5, rtol=1e-4)


def test_recycled_prompt_has_the_targets_shape():
    src = trained(SoftPrompt(4), tiny("gpt", 32))
    target = tiny("gpt", 48, seed=1)
    for name in ("linear", "combination"):
        rec = recycle(src, target, name)
        rec.attach(target)
        assert rec.prefix.shape == (4, 48)
        assert logits(rec, torch.randint(1, V, (2, 7)), [3, 3]).shape == (2, 7, V)
    with pytest.raises(ConfigError, match="identity recycler needs equal widths"):
        recycle(src, target, "identity")


# -- SG heads -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt", "rwkv7", "mamba"])
@pytest.mark.parametrize("recycler", ["identity", "linear"])
@pytest.mark.parametrize("plen", [[4, 6], [5, 5]], ids=["one-pass", "deferred"])  # equal prompts: every delta at once
def test_recycled_head_on_an_identical_backbone_gives_the_same_numbers(family, recycler, plen):
    src = trained(ProSG(rank=4), tiny(family))
    target = copy.deepcopy(src.backbone)
    rec = recycle(src, target, recycler)
    rec.attach(target)
    ids = torch.randint(1, V, (2, 10))
    a, b = logits(rec, ids, plen), logits(src, ids, plen)
    if recycler == "identity":
        assert torch.equal(a, b)
    else:  # fitted maps of identical hidden states are the identity (to float precision)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert isinstance(rec.head, RecycledHead) and not any(p is q for p in rec.parameters() for q in src.parameters())


def test_head_maps_of_identical_backbones_are_the_identity():
    src = trained(ProSG(rank=4), tiny("rwkv7"))
    maps = fit_head_maps(src.head, src.backbone, copy.deepcopy(src.backbone), task_free_ids(V, 8, 32))
    for m in [*maps.context.values(), *maps.inputs.values(), *maps.outputs.values()]:
        torch.testing.assert_close(m, torch.eye(m.shape[0]), atol=1e-5, rtol=0)


def test_recycled_head_has_the_targets_shapes_and_generates_like_it_trains():
    src = trained(ProSG(rank=4), tiny("gpt", 32))
    target = tiny("gpt", 48, seed=1)
    rec = recycle(src, target, "linear", task_free_ids(V, 16, 32))
    rec.attach(target)
    rec.eval()
    modules = dict(target.named_modules())
    ids = torch.randint(1, V, (2, 9))
    with torch.no_grad(), rec.head.session(torch.tensor([4, 4])) as s:
        target(ids)
        for t in rec.head.targets:
            u, v = s.factors[t.name]
            assert u.shape == (2, modules[t.name].out_features, 4) and v.shape == (2, modules[t.name].in_features, 4)
    teacher = logits(rec, ids, [4, 4])[:, 3:-1]
    steps = []
    with torch.no_grad(), rec.prefill(ids[:, :4]) as out:
        steps.append(out.logits)
        state = out.state
        for t in range(4, 8):
            o = target.step(ids[:, t], state)
            steps.append(o.logits)
            state = o.state
    torch.testing.assert_close(torch.stack(steps, 1), teacher, atol=3e-4, rtol=1e-3)
    assert generate(rec, ids[:1, :4], 3).shape == (1, 3)  # one sample: the delta folded into the weights
    with pytest.raises(ConfigError, match="identity recycler needs equal"):
        bad = recycle(src, target, "identity")
        bad.attach(target)


def test_only_prompts_and_heads_are_recycled():
    bb = tiny()
    with pytest.raises(ConfigError, match="GPC is neither"):
        recycle(trained(GlobalPromptCell(2), bb), bb, "linear")
    with pytest.raises(ConfigError, match="oracle"):
        oracle = Oracle(rank=4)
        oracle.attach(tiny())
        recycle(oracle, bb, "identity")
    with pytest.raises(ConfigError, match="does not apply"):
        recycle(trained(ProSG(rank=4), tiny()), bb, "combination")


@pytest.mark.parametrize("method", ["soft_prompt", "sg"])
def test_backbones_of_another_family_or_vocabulary_are_refused(method):
    src = trained(SoftPrompt(2) if method == "soft_prompt" else ProSG(rank=4), tiny("gpt"))
    with pytest.raises(ConfigError, match="source backbone is gpt and the target mamba; recycle between backbones of the same family"):
        recycle(src, tiny("mamba"), "linear")
    torch.manual_seed(0)
    bigger = build("gpt", vocab_size=V + 8, d_model=32, n_layer=2)
    with pytest.raises(ConfigError, match=f"vocabulary has {V} ids and the target's {V + 8}; recycling needs the same tokenizer"):
        recycle(src, bigger, "linear")


# -- the command -------------------------------------------------------------------------------------
SWEEP = """
name: tiny_recycle
experiment: {conf}/experiment/plain.yaml
out_dir: {out}
seeds: [0]
overrides:
  trainer.max_steps: 3
  trainer.val_check_interval: 3
  trainer.enable_progress_bar: false
  trainer.enable_model_summary: false
  data.init_args.tasks: [{{name: recall, n_facts: 2, n_keys: 8, n_values: 4, response_len: 12}}]
  data.init_args.train_size: 16
  data.init_args.batch_size: 4
  data.init_args.val_size: 4
  data.init_args.test_size: 8
  model.backbone: null
  model.freeze_backbone: true
axes:
  backbone:
    source: {{model.pretrained: {src}}}
    target: {{model.pretrained: {tgt}}}
  method:
    soft_prompt: {{model.method: {conf}/method/soft_prompt.yaml, model.method.init_args.n_tokens: 2}}
    sg: {{model.method: {conf}/method/sg.yaml, model.method.init_args.rank: 2, model.method.init_args.d_hidden: 8}}
launcher: {{name: local, jobs: 2, threads: 1}}
"""


@pytest.mark.slow  # ~1 min on 2 shared cores: 4 tiny training runs (a fresh Python each), then 10 evaluations
def test_recycle_command_end_to_end(tmp_path, capsys):
    from prosg.data import ConstructedDataModule

    vocab = ConstructedDataModule(tasks=[{"name": "recall", "n_facts": 2, "n_keys": 8, "n_values": 4}]).vocab_size
    for name, seed in (("src", 0), ("tgt", 1)):
        torch.manual_seed(seed)
        build("gpt", vocab_size=vocab, d_model=16, n_layer=1, n_head=2).save_pretrained(str(tmp_path / name))
    sweep = tmp_path / "recycle.yaml"
    sweep.write_text(SWEEP.format(conf=CONF, out=tmp_path / "runs", src=tmp_path / "src", tgt=tmp_path / "tgt"))
    assert prosg_main(["recycle", "--sweep", str(sweep), "--fit-seqs", "4", "--fit-len", "16"]) == 0
    table = (tmp_path / "runs/recycle.md").read_text()
    assert table in capsys.readouterr().out
    rows = json.loads((tmp_path / "runs/recycle.json").read_text())
    got = {(r["method"], r["recycler"]) for r in rows["summary"]}
    assert got == {("soft_prompt", r) for r in PROMPT_RECYCLERS} | {("sg", "identity"), ("sg", "linear")}
    for r in rows["summary"]:
        assert r["n"] == 1 and 0 <= r["rate"] <= 1 and f"| {r['method']} | {r['recycler']} | " in table
    source = rows["sources"][0]
    assert {"base", "source", "recycled", "retrained"} <= set(source) and 0 <= source["base"]["acc"] <= 1
    # the same checkpoints without the sweep: --ckpt / --target-backbone / --retrained
    ckpts = sorted((tmp_path / "runs/source-sg-s0").rglob("last.ckpt"))
    assert prosg_main(["recycle", "--ckpt", str(ckpts[0]), "--target-backbone", str(tmp_path / "tgt"),
                       "--recyclers", "linear", "--fit-seqs", "4", "--out", str(tmp_path / "direct")]) == 0
    direct = json.loads((tmp_path / "direct/recycle.json").read_text())
    assert [(r["method"], r["recycler"]) for r in direct["summary"]] == [("sg", "linear")]
    # a target of another family: one line naming the fix, before any evaluation
    build("mamba", vocab_size=vocab, d_model=16, n_layer=1).save_pretrained(str(tmp_path / "mamba"))
    capsys.readouterr()
    assert prosg_main(["recycle", "--ckpt", str(ckpts[0]), "--target-backbone", str(tmp_path / "mamba"),
                       "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "recycle between backbones of the same family" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_recycle_command_names_the_fix(tmp_path, capsys):
    assert prosg_main(["recycle", "--ckpt", "x.ckpt"]) == 1
    assert "needs --target-backbone" in capsys.readouterr().err
    assert prosg_main(["recycle", "--recyclers", "magic", "--ckpt", "x.ckpt", "--target-backbone", "y"]) == 1
    assert "--recyclers ['magic']" in capsys.readouterr().err
    assert prosg_main(["recycle", "--ckpt", "x.ckpt", "--target-backbone", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err
    missing = tmp_path / "s.yaml"
    missing.write_text(SWEEP.format(conf=CONF, out=tmp_path / "runs", src=tmp_path / "no_src", tgt=tmp_path / "no_tgt"))
    assert prosg_main(["recycle", "--sweep", str(missing)]) == 1
    assert "make them first with `prosg pretrain`" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_recycle_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        prosg_main(["recycle", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: prosg recycle") and all(o in out for o in ("--ckpt", "--target-backbone", "--recyclers", "--sweep"))
