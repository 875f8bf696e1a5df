"""The contract every backbone family honours, checked generically over the registry."""

from pathlib import Path

import pytest
import torch
import yaml

import prosg.backbones
from prosg.backbones import BACKBONES, Backbone, build, detect_format, from_pretrained
from prosg.errors import CheckpointError, ConfigError

FAMILIES = sorted(BACKBONES)
V = 40
CONF = Path(__file__).resolve().parents[1] / "conf"


def tiny(name: str):
    return build(name, vocab_size=V, d_model=64, n_layer=2).eval()


def test_every_family_is_registered_with_a_model_yaml():
    """Each Backbone class the package exports is in the registry and has conf/model/<family>.yaml."""
    exported = [getattr(prosg.backbones, n) for n in prosg.backbones.__all__]
    classes = {c for c in exported if isinstance(c, type) and issubclass(c, Backbone) and c is not Backbone}
    assert classes == set(BACKBONES.values())
    for name, cls in BACKBONES.items():
        assert cls.family == name
        cfg = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())
        assert cfg["class_path"] == f"prosg.backbones.{cls.__name__}"


@pytest.mark.parametrize("name", FAMILIES)
def test_parallel_equals_steps(name):
    model = tiny(name)
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        full = model(ids)
        assert full.logits.shape == (2, 11, V)
        head = model(ids[:, :4])
        state, outs = head.state, [head.logits]
        for t in range(4, 11):
            o = model.step(ids[:, t], state)
            assert o.logits.shape == (2, V)
            outs.append(o.logits[:, None])
            state = o.state
        torch.testing.assert_close(torch.cat(outs, 1), full.logits, atol=2e-5, rtol=1e-4)
        # steps from the very start
        state, outs = model.init_state(2), []
        for t in range(11):
            o = model.step(ids[:, t], state)
            outs.append(o.logits)
            state = o.state
        torch.testing.assert_close(torch.stack(outs, 1), full.logits, atol=2e-5, rtol=1e-4)
        for a, b in zip(torch.utils._pytree.tree_leaves(state), torch.utils._pytree.tree_leaves(full.state)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_continues_from_state(name):
    model = tiny(name)
    ids = torch.randint(0, V, (3, 9))
    with torch.no_grad():
        full = model(ids).logits
        a = model(ids[:, :5])
        b = model(ids[:, 5:], a.state)
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_is_batch_first_pytree(name):
    model = tiny(name)
    state = model(torch.randint(0, V, (3, 4))).state
    leaves = torch.utils._pytree.tree_leaves(state)
    assert leaves and all(isinstance(t, torch.Tensor) and t.shape[0] == 3 for t in leaves)


@pytest.mark.parametrize("name", FAMILIES)
def test_native_round_trip(name, tmp_path):
    model = tiny(name)
    model.save_pretrained(str(tmp_path / name))
    ids = torch.randint(0, V, (2, 7))
    loaded = from_pretrained(tmp_path / name).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name", FAMILIES)
def test_ids_out_of_vocab_rejected(name):
    model = tiny(name)
    with pytest.raises(ConfigError, match=r"outside the vocabulary \[0, 40\)"):
        model(torch.tensor([[1, 2, V]]))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        model.step(torch.tensor([V + 3]), model.init_state(1))


@pytest.mark.parametrize("name", FAMILIES)
def test_target_linears_by_pattern(name):
    model = tiny(name)
    names = model.linear_names()
    generic = sorted({".".join("*" if p.isdigit() else p for p in n.split(".")) for n in names if any(p.isdigit() for p in n.split("."))})
    first = generic[0]
    hits = model.target_linears([first])
    assert len(hits) == 2 and all(isinstance(m, torch.nn.Linear) for m in hits.values())
    assert [model.block_index(n) for n in hits] == [0, 1]
    with pytest.raises(ConfigError, match="(?s)matches no linear layer.*Available"):
        model.target_linears(["no_such_layer"])


@pytest.mark.parametrize("name", FAMILIES)
def test_hooks_see_every_token(name):
    """Blocks get the residual stream first; in-block linears run as modules on all tokens at once, then per step."""
    model = tiny(name)
    ids = torch.randint(0, V, (2, 6))
    seen: dict[str, list[tuple[int, ...]]] = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(f"block{i}", []).append(tuple(a[0].shape)))
             for i, b in enumerate(model.blocks)]
    names = [n for n in model.linear_names() if any(p.isdigit() for p in n.split("."))]
    # a linear's input, as (tokens, features): step may pass (B, i) or a length-1 (B, 1, i)
    hooks += [lin.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append((a[0].shape[:-1].numel(), a[0].shape[-1])))
              for n, lin in model.target_linears(names).items()]
    with torch.no_grad():
        state = model(ids).state
        parallel, seen = seen, {}
        model.step(ids[:, 0], state)
    for h in hooks:
        h.remove()
    assert [parallel[f"block{i}"] for i in range(len(model.blocks))] == [[(2, 6, model.d_model)]] * len(model.blocks)
    lin = model.target_linears(names)
    assert {n: parallel.get(n) for n in names} == {n: [(2 * 6, lin[n].in_features)] for n in names}
    assert {n: seen.get(n) for n in names} == {n: [(2, lin[n].in_features)] for n in names}


def test_unknown_backbone_name():
    with pytest.raises(ConfigError, match="unknown backbone 'mamba3'; choose one of: .*mamba"):
        build("mamba3", vocab_size=10)


def test_unrecognised_checkpoint_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="(?s)no recognisable checkpoint.*notes.txt"):
        detect_format(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(tmp_path / "missing")


def test_native_checkpoint_shape_mismatch(tmp_path):
    model = build("gpt", vocab_size=V, d_model=32, n_layer=2, n_head=4)
    model.save_pretrained(str(tmp_path))
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_ffn"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatch.*mlp.fc.weight"):
        from_pretrained(tmp_path)


def test_corrupt_weight_file(tmp_path):
    build("gpt", vocab_size=V, d_model=32, n_layer=1, n_head=4).save_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="(?s)could not read weights.*corrupt"):
        from_pretrained(tmp_path)


def test_native_saves_safetensors_and_still_reads_bin(tmp_path):
    model = build("gpt", vocab_size=V, d_model=32, n_layer=1, n_head=4).eval()
    model.save_pretrained(str(tmp_path / "new"))
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["config.json", "model.safetensors"]
    # the layout earlier ProSG versions wrote: config.json + a torch.save'd pytorch_model.bin
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, old / "pytorch_model.bin")
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        for d in ("new", "old"):
            torch.testing.assert_close(from_pretrained(tmp_path / d).eval()(ids).logits, model(ids).logits)


def test_invalid_config_json_is_reported_as_such(tmp_path):
    build("gpt", vocab_size=V, d_model=32, n_layer=1, n_head=4).save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text('{"prosg_family": "gpt",\n')
    with pytest.raises(CheckpointError, match=r"config.json' is not valid JSON \(.* at line 2, column 1\)") as e:
        from_pretrained(tmp_path)
    assert "no recognisable checkpoint" not in str(e.value) and "\n" not in str(e.value)
