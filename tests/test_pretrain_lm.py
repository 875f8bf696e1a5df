"""`prosg pretrain --sweep conf/sweep/pretrain_lm.yaml`, shortened (2 steps, tiny sizes): every LM is published
with its provenance, loads with from_pretrained and `prosg generate` prints text from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prosg.backbones import from_pretrained
from prosg.cli import main as prosg_main
from prosg.data.corpus import corpus_info
from prosg.data.store import sha256_file as sha256

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "conf/sweep/pretrain_lm.yaml"
TINY = ["--set", "model.backbone.init_args.d_model=16", "--set", "model.backbone.init_args.n_layer=1",
        "--set", "data.init_args.batch_size=4", "--set", "data.init_args.val_size=2", "--set", "data.init_args.test_size=2"]


@pytest.mark.slow  # three runs, each a fresh Python importing torch + Lightning: ~30-60 s on 2 shared cores
def test_shortened_pretrain_lm_publishes_loadable_backbones_that_generate(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # as from a clone: the provenance names the clone's files relative to it (shippable)
    out, runs = tmp_path / "lm", tmp_path / "runs"
    assert prosg_main(["pretrain", "--sweep", str(SWEEP), "--out", str(out), "--runs-dir", str(runs), "--steps", "2",
                       *TINY]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gpt-s0", "mamba-s0", "rwkv7-s0"]
    corpus = corpus_info()
    for family in ("mamba", "rwkv7", "gpt"):
        d = out / f"{family}-s0"
        prov = json.loads((d / "provenance.json").read_text())
        assert prov["made_by"].startswith("prosg pretrain --sweep") and "--steps 2" in prov["made_by"]
        assert prov["seed"] == 0 and prov["global_step"] == 2 and prov["params"] > 0
        assert prov["sweep"] == "conf/sweep/pretrain_lm.yaml" and not any(str(ROOT) in a for a in prov["args"])
        assert "--config=conf/experiment/plain.yaml" in prov["args"] or "conf/experiment/plain.yaml" in prov["args"]
        assert prov["corpus"] == corpus and prov["corpus"]["splits"]["train"]["sha256"]
        assert [t["name"] for t in prov["data"]["init_args"]["tasks"]] == ["text", "instruction"]
        assert prov["sha256"]["model.safetensors"] == sha256(d / "model.safetensors")
        assert set(prov["versions"]) >= {"prosg", "python", "torch"} and "test/ppl" in prov["test"]
        model = from_pretrained(d)
        assert model.family == family and model.config["d_model"] == 16 and model.vocab_size == 260
        capsys.readouterr()
        assert prosg_main(["generate", "--pretrained", str(d), "--prompt", "The object is", "--max-new-tokens", "12"]) == 0
        printed = capsys.readouterr().out
        assert printed.endswith("\n") and len(printed) > 1
