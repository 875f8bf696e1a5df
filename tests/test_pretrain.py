"""`prosg pretrain` (conf/sweep/pretrain.yaml: the frozen setting's backbones, shipped in assets/pretrained/), shortened
to 2 steps: both seeds are published with their provenance, load with from_pretrained, and have the shipped
backbones' architecture and vocabulary, so the frozen sweep runs on them as on the shipped ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prosg.backbones import from_pretrained
from prosg.cli import main as prosg_main
from prosg.data.store import sha256_file as sha256

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets/pretrained"


@pytest.mark.slow  # two runs, each a fresh Python importing torch + Lightning: ~30-60 s on 2 shared cores
def test_shortened_pretrain_publishes_the_frozen_settings_backbones(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # as from a clone: the provenance names the clone's files relative to it
    out, runs = tmp_path / "pretrained", tmp_path / "runs"
    assert prosg_main(["pretrain", "--out", str(out), "--runs-dir", str(runs), "--steps", "2",
                       "--set", "data.init_args.val_size=2", "--set", "data.init_args.test_size=2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["rwkv7-s0", "rwkv7-s1"]
    for name, seed in (("rwkv7-s0", 0), ("rwkv7-s1", 1)):
        d = out / name
        prov = json.loads((d / "provenance.json").read_text())
        shipped = json.loads((SHIPPED / name / "provenance.json").read_text())
        assert prov["made_by"].startswith("prosg pretrain") and "--steps 2" in prov["made_by"]
        assert prov["sweep"] == shipped["sweep"] == "conf/sweep/pretrain.yaml" and prov["seed"] == seed
        assert prov["global_step"] == 2 and prov["params"] == shipped["params"]
        assert prov["sha256"]["model.safetensors"] == sha256(d / "model.safetensors")
        assert not any(str(ROOT) in a for a in prov["args"])
        model, ref = from_pretrained(d), from_pretrained(SHIPPED / name)
        assert model.family == ref.family == "rwkv7" and model.config == ref.config and model.vocab_size == ref.vocab_size
