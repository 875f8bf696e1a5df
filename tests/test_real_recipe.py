"""The real-checkpoint recipes end to end on CPU: small random checkpoints written in the official layouts
(a mamba_ssm directory with its tokenizer.json; a BlinkDL RWKV-7 x070 .pth with a World vocabulary file) are
trained 2 steps with conf/experiment/real_*.yaml (backbone frozen, fp32), then `prosg generate` and
`prosg lm-eval` decode through the checkpoint's own tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prosg.backbones import detect_format
from prosg.backbones.mamba import Mamba
from prosg.backbones.rwkv7 import RWKV7
from prosg.cli import main as prosg_main
from prosg.data.tokenizers import HFTokenizer, WorldTokenizer, load_tokenizer
from prosg.train import lightning_main

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SAMPLE = CONF / "data/examples/instructions.jsonl"
PROMPT = "In your story, the dog is named falcon, the bird is named comet."


def mamba_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A mamba_ssm checkpoint directory with a byte-level BPE tokenizer.json beside the weights (as mamba-130m-hf)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path / "mamba-tiny"
    d.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    tok.train_from_iterator([x["prompt"] + " " + x["response"] for x in lines], trainer)
    tok.save(str(d / "tokenizer.json"))
    vocab = HFTokenizer(d / "tokenizer.json").vocab_size
    Mamba(vocab_size=vocab, d_model=16, n_layer=2, d_state=4).save_pretrained(d)  # padded to a multiple of 8
    assert detect_format(d).name == "mamba_ssm"
    return d, d / "tokenizer.json"


def rwkv7_pth(tmp_path: Path) -> tuple[Path, Path]:
    """A BlinkDL x070 .pth and an rwkv_vocab_v20230424.txt (all 256 bytes + a few words, the real file's syntax)."""
    vocab = tmp_path / "rwkv_vocab_v20230424.txt"
    lines = [f"{b + 1} {repr(chr(b)) if 32 <= b < 127 else repr(bytes([b]))} 1" for b in range(256)]
    words = [" the", " named", " is", "In", " your", " story", "The", " dog", " bird"]
    lines += [f"{300 + i} {w!r} {len(w.encode())}" for i, w in enumerate(words)]
    vocab.write_text("\n".join(lines) + "\n", encoding="utf-8")
    size = WorldTokenizer(vocab).vocab_size
    pth = tmp_path / "RWKV-x070-World-tiny.pth"
    RWKV7(vocab_size=size, d_model=32, n_layer=2, head_size=16).save_pretrained(str(pth))
    assert detect_format(pth).name == "rwkv7-pth"
    return pth, vocab


@pytest.mark.slow  # two 2-step fits, generation and a small lm-eval each: ~30 s on 2 shared cores
@pytest.mark.parametrize("recipe, make", [("real_mamba130m_sg", mamba_dir), ("real_rwkv7_world_sg", rwkv7_pth)],
                         ids=["mamba_ssm+tokenizer.json", "rwkv7-x070+world-vocab"])
def test_recipe_trains_the_head_and_decodes_through_the_checkpoint_tokenizer(recipe, make, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.chdir(ROOT)  # the recipe's sample JSONL path is relative to the repository root, where prosg runs
    ckpt, tok_path = make(tmp_path)
    cli = lightning_main(["fit", "--config", str(CONF / f"experiment/{recipe}.yaml"), "--model.pretrained", str(ckpt),
                          "--data.init_args.tokenizer", str(tok_path), "--trainer", str(CONF / "trainer/debug.yaml"),
                          "--trainer.precision=32-true", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                          f"--trainer.default_root_dir={tmp_path / 'run'}", "--data.init_args.batch_size=2",
                          "--model.method.init_args.d_hidden=16"])
    model = cli.model
    assert cli.trainer.global_step == 2 and type(model.method).__name__ == "ProSG"
    assert not any(p.requires_grad for p in model.backbone.parameters())  # frozen: only the head trained
    saved = sorted((tmp_path / "run").rglob("*.ckpt"))
    assert saved, "the run wrote no checkpoint"
    tok = load_tokenizer(tok_path)

    capsys.readouterr()
    base = ["generate", "--ckpt", str(saved[-1]), "--prompt", PROMPT, "--max-new-tokens", "6"]
    assert prosg_main(base) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert prosg_main([*base, "--ids", "true"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert len(ids) == 6 and tok.decode(ids).startswith(text)  # the checkpoint's tokenizer, not bytes

    out = tmp_path / "eval"
    assert prosg_main(["lm-eval", "--ckpt", str(saved[-1]), "--out", str(out), "--n", "2", "--max-distance", "6",
                       "--modes", "[greedy]"]) == 0
    got = json.loads((out / "results.json").read_text())
    assert got["metrics"]["test/free/greedy/n@0-7"] == 2
    assert "test/all/acc@0-7" not in got["metrics"]  # the teacher-forced proxy is byte-level only
    sample = got["samples"]["greedy"][0]
    assert sample["cue"].endswith("named ") and isinstance(sample["generated"], str)
