"""DataModules and collation: the batch contract, worker / DDP independence, JSONL validation, every conf/data YAML."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from prosg.data import ConstructedDataModule, JSONLDataModule
from prosg.data.collate import Collator, collate
from prosg.data.tasks import RecallTask, generate_example
from prosg.errors import ConfigError, DataError
from prosg.train import DATA_LINKS

ROOT = Path(__file__).resolve().parents[1]


def small_dm(**kw):
    args = dict(tasks={"name": "recall", "response_len": 48}, train_size=40, val_size=24, test_size=24, batch_size=8)
    args.update(kw)
    return ConstructedDataModule(**args)


# ---------------------------------------------------------------- collation


def test_collate_follows_the_batch_contract():
    task = RecallTask(response_len=40)
    exs = [generate_example([task], [1.0], 0, "train", i) for i in range(3)]
    exs[1] = dict(exs[1], response_ids=exs[1]["response_ids"][:30], answer_kind=exs[1]["answer_kind"][:30],
                  distance=exs[1]["distance"][:30], loss_weight=exs[1]["loss_weight"][:30])
    b = collate(exs, pad_id=0)
    p = len(exs[0]["prompt_ids"])
    assert b["input_ids"].shape == (3, p + 40) and b["input_ids"].dtype == torch.long
    assert b["prompt_len"].tolist() == [p, p, p]
    assert b["attention_mask"].dtype == torch.bool and b["attention_mask"].sum(1).tolist() == [p + 40, p + 30, p + 40]
    assert b["loss_weight"].dtype == torch.float32
    for i, ex in enumerate(exs):
        n = p + len(ex["response_ids"])
        assert b["input_ids"][i, :n].tolist() == ex["prompt_ids"] + ex["response_ids"]
        assert b["answer_kind"][i, p:n].tolist() == ex["answer_kind"]
        assert b["distance"][i, p:n].tolist() == ex["distance"]
        assert b["loss_weight"][i, p:n].tolist() == ex["loss_weight"]
        # prompt and padding positions: kind 0, distance -1, weight 0, pad id
        for field, fill in (("answer_kind", 0), ("distance", -1), ("loss_weight", 0)):
            assert (b[field][i, :p] == fill).all() and (b[field][i, n:] == fill).all()
        assert (b["input_ids"][i, n:] == 0).all()
    assert b["task"] == ["recall"] * 3 and b["n_facts"].tolist() == [4, 4, 4] and b["index"].tolist() == [0, 1, 2]
    assert Collator(0, pad_to_multiple_of=16)(exs)["input_ids"].shape[1] % 16 == 0
    with pytest.raises(DataError):
        collate([], 0)


# ---------------------------------------------------------------- the prosg.data exports


def test_datamodules_are_exported_from_prosg_data_and_tasks_stay_light():
    from jsonargparse._util import get_import_path

    import prosg.data

    for name in prosg.data.__all__:  # the class_path a saved config gets is an exported one (prosg.X: the Python API)
        assert get_import_path(getattr(prosg.data, name)) in (f"prosg.data.{name}", f"prosg.{name}")
    code = "import sys, prosg.data.tasks, prosg.data.store, prosg.data.cli; print('lightning' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(prosg.data.__file__).parents[2])}  # this prosg, not another install
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"  # only the DataModules pull in Lightning


# ---------------------------------------------------------------- ConstructedDataModule


def test_datamodule_exposes_linkable_facts_and_longer_eval_distances():
    dm = ConstructedDataModule(
        tasks=[{"name": "recall", "response_len": 96, "query_distances": [0, 32]}],
        eval_distance_scale=4.0, val_overrides={"n_values": 20}, train_size=8, val_size=8, test_size=8,
    )
    assert dm.vocab_size == 5 + 16 + 20  # the widest split decides
    assert dm.pad_id == 0 and dm.tasks == ["recall"]
    assert dm.max_len == 10 + 384
    # doubling up to the longest distance generated (128); the training maximum + 1 (33) replaces 32
    assert dm.bucket_edges == [0, 16, 33, 64, 129]
    train_d = [d for i in range(8) for d in dm.dataset("train")[i]["distance"] if d >= 0]
    val_d = [d for i in range(8) for d in dm.dataset("val")[i]["distance"] if d >= 0]
    assert max(train_d) <= 32 and max(val_d) > 64 and max(val_d) <= 128
    assert max(t for i in range(8) for t in dm.dataset("val")[i]["response_ids"]) > 5 + 16 + 16 - 1  # values only the wider split has
    assert dm.split_tasks["test"] == dm.split_tasks["val"]  # test_overrides defaults to val_overrides


def linked_facts(dm):
    """The facts ``prosg.train`` links from the DataModule into the model, as they are now."""
    return {fact: getattr(dm, fact) for fact in DATA_LINKS}


def test_constructed_facts_are_final_right_after_construction():
    dm = ConstructedDataModule(
        tasks=[{"name": "recall", "n_facts": 3, "response_len": 40}, {"name": "copy", "seq_len": 6, "gap_range": [0, 20]},
               {"name": "instruction", "n_facts": 1, "response_len": 120}],
        train_size=60, val_size=30, test_size=0,
    )
    assert linked_facts(dm) == {
        "vocab_size": 260, "pad_id": 0, "bucket_edges": [0, 16, 24, 39, 59],  # each task's longest distance + 1
        "tasks": ["recall", "copy", "instruction"], "n_facts_values": [1, 3, 6],
    }
    exs = [ex for s in ("train", "val") for ex in dm.examples(s)]  # what the data then holds agrees
    assert {ex["task"] for ex in exs} == set(dm.tasks) and {ex["n_facts"] for ex in exs} == set(dm.n_facts_values)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"val_overrides": {"gap_range": [0, 2]}}, "no task has"),
        ({"tasks": []}, "tasks is empty"),
        ({"tasks": [{"name": "recall", "weight": 0}]}, "weight"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_size": -1}, "val_size"),
        ({"eval_distance_scale": 0}, "eval_distance_scale"),
        ({"tasks": {"name": "recall", "n_facts": 99}}, "n_keys"),
        ({"bucket_edges": [0, 0, 5]}, "bucket_edges"),
        ({"val_overrides": {"query_distances": [0, 500]}}, "beyond the response"),
    ],
)
def test_bad_datamodule_config_fails_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        small_dm(**kwargs)


def test_mixture_follows_weights_and_keeps_task_slices():
    dm = ConstructedDataModule(
        tasks=[{"name": "recall", "weight": 3.0}, {"name": "copy", "weight": 1.0, "seq_len": 4}],
        train_size=400, val_size=4, test_size=4,
    )
    names = [dm.dataset("train")[i]["task"] for i in range(400)]
    assert 0.65 < names.count("recall") / 400 < 0.85
    assert dm.tasks == ["recall", "copy"] and dm.vocab_size == 5 + 16 + 16
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["task"]) <= {"recall", "copy"}


def _batches(loader):
    return [{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in b.items()} for b in loader]


def test_batches_do_not_depend_on_worker_count():
    dm = small_dm()
    ds = dm.dataset("train")
    serial = _batches(DataLoader(ds, batch_size=8, collate_fn=Collator(dm.pad_id), num_workers=0))
    parallel = _batches(DataLoader(ds, batch_size=8, collate_fn=Collator(dm.pad_id), num_workers=2))
    assert serial == parallel and len(serial) == 5
    # the DataModule's own loaders agree too (val: unshuffled)
    dm2 = small_dm(num_workers=2)
    assert _batches(dm2.val_dataloader()) == _batches(small_dm().val_dataloader())


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_simulated_ddp_ranks_cover_every_example(world):
    dm = small_dm(train_size=24)  # divisible by 1, 2, 3, 4
    ds = dm.dataset("train")
    seen = []
    for rank in range(world):
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=5, drop_last=False)
        ids = [i for b in DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=Collator(0)) for i in b["index"].tolist()]
        for i in ids:  # an example is the same whichever rank generates it
            assert ds[i] == generate_example(dm.split_tasks["train"], dm.weights, 0, "train", i)
        seen += ids
    assert sorted(seen) == list(range(24))  # exactly once


def test_simulated_ddp_pads_by_repeating_when_not_divisible():
    dm = small_dm(train_size=10)
    ds = dm.dataset("train")
    seen = []
    for rank in range(4):
        sampler = DistributedSampler(ds, num_replicas=4, rank=rank, shuffle=False, drop_last=False)
        seen += list(sampler)
    assert len(seen) == 12 and set(seen) == set(range(10))  # 2 examples repeated: documented in the module


def test_lightning_trainer_runs_the_datamodule():
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self, vocab):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, 8)
            self.out = torch.nn.Linear(8, vocab)

        def training_step(self, batch, _):
            logits = self.out(self.emb(batch["input_ids"]))
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
            w = batch["loss_weight"][:, 1:]
            return (ce * w).sum() / w.sum().clamp_min(1)

        def validation_step(self, batch, _):
            self.log("n", float(batch["answer_kind"].eq(2).sum()), batch_size=len(batch["task"]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = small_dm()
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(dm.vocab_size), datamodule=dm)
    assert trainer.state.finished


# ---------------------------------------------------------------- JSONL


def write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_reads_tokenizes_and_scores(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Say hi.", "response": "hi"},
        "",
        {"prompt": "Use 'x'.", "response": "x é", "answer_kind": 2, "loss_weight": 0.5, "task": "rules"},
    ])
    dm = JSONLDataModule(train_path=path, val_path=path, batch_size=2)
    dm.setup("fit")
    assert dm.tasks == ["jsonl", "rules"] and dm.vocab_size == 260 and dm.pad_id == 256
    a, b = dm.dataset("train")[0], dm.dataset("train")[1]
    assert a["prompt_ids"] == [257] + list(b"Say hi.") + [259]
    assert a["response_ids"] == list(b"hi") and a["answer_kind"] == [1, 1] and a["distance"] == [-1, -1]
    assert b["answer_kind"] == [2] * 4 and b["distance"] == [0, 1, 2, 3] and b["loss_weight"] == [0.5] * 4
    assert b["meta"]["line"] == 3 and b["meta"]["index"] == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2
    strs, joiner = dm.decode_tokens(b, b["response_ids"])
    assert joiner.join(strs) == "x é"


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"prompt": "a", "response": ', "bad JSON"),
        ('["prompt", "response"]', "expected a JSON object"),
        ('{"prompt": "a"}', "missing key 'response'"),
        ('{"response": "a"}', "missing key 'prompt'"),
        ('{"prompt": 3, "response": "a"}', "'prompt' must be a string, got int"),
        ('{"prompt": "a", "response": ["b"]}', "'response' must be a string, got list"),
        ('{"prompt": "a", "response": "b", "answer_kind": 5}', "answer_kind"),
        ('{"prompt": "a", "response": "b", "loss_weight": -1}', "loss_weight"),
        ('{"prompt": "a", "response": ""}', "empty response"),
    ],
)
def test_jsonl_bad_lines_name_file_and_line(tmp_path, line, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "fine"}, line])
    with pytest.raises(DataError, match=match) as err:
        JSONLDataModule(train_path=path)  # validated eagerly, at construction
    assert f"{path}:2:" in str(err.value)


def test_jsonl_facts_are_final_right_after_construction(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl",
                        [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d", "task": "rules"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "a", "response": "b", "task": "rules"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "a", "response": "b", "task": "held_out"}])
    dm = JSONLDataModule(train_path=train, val_path=val, test_path=test, max_response_len=100)
    assert linked_facts(dm) == {
        "vocab_size": 260, "pad_id": 256, "bucket_edges": [0, 16, 32, 64, 100],
        "tasks": ["jsonl", "rules", "held_out"], "n_facts_values": [0],  # every split's task names, in file order
    }
    dm.setup("fit")
    assert dm.tasks == ["jsonl", "rules", "held_out"]  # setup does not change them
    # a file that is not there is reported at construction too, naming its knob
    with pytest.raises(DataError, match="test_path .*nope.jsonl.* does not exist"):
        JSONLDataModule(train_path=train, test_path=str(tmp_path / "nope.jsonl"))


def test_jsonl_overlong_policy(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p" * 20, "response": "r" * 30}])
    with pytest.raises(DataError, match=r"long.jsonl:1: prompt is 22 tokens, over max_prompt_len=10.*overlong: truncate"):
        JSONLDataModule(train_path=path, max_prompt_len=10).setup("fit")
    with pytest.raises(DataError, match="response is 30 tokens, over max_response_len=8"):
        JSONLDataModule(train_path=path, max_response_len=8).setup("fit")
    dm = JSONLDataModule(train_path=path, max_prompt_len=10, max_response_len=8, overlong="truncate")
    dm.setup("fit")
    ex = dm.dataset("train")[0]
    assert ex["prompt_ids"] == [257] + [ord("p")] * 8 + [259]  # head kept, <sep> still closes the prompt
    assert ex["response_ids"] == [ord("r")] * 8
    with pytest.raises(ConfigError, match="overlong"):
        JSONLDataModule(train_path=path, overlong="clip")


def test_jsonl_empty_prompt_policy(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "  ", "response": "c"}])
    with pytest.raises(DataError, match=r"e.jsonl:2: empty prompt.*empty_prompt: skip"):
        JSONLDataModule(train_path=path).setup("fit")
    dm = JSONLDataModule(train_path=path, empty_prompt="skip")
    dm.setup("fit")
    assert len(dm.dataset("train")) == 1 and dm.skipped["train"] == 1
    only_empty = write_jsonl(tmp_path / "only.jsonl", [{"prompt": "", "response": "c"}])
    with pytest.raises(DataError, match="no usable examples"):
        JSONLDataModule(train_path=only_empty, empty_prompt="skip").setup("fit")


def test_unconfigured_eval_splits_give_no_batches(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": "b"}])
    dm = JSONLDataModule(train_path=path)
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []
    with pytest.raises(ConfigError, match="set val_path"):
        dm.dataset("val")
    assert small_dm(val_size=0).val_dataloader() == []


def test_jsonl_missing_file_names_the_knob(tmp_path):
    with pytest.raises(DataError, match="val_path .*nope.jsonl.* does not exist"):
        JSONLDataModule(train_path=write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": "b"}]),
                        val_path=str(tmp_path / "nope.jsonl")).setup("fit")


# ---------------------------------------------------------------- every YAML under conf/data


CONF = sorted((ROOT / "conf" / "data").glob("*.yaml"))


def test_conf_data_has_the_expected_configs():
    assert {p.stem for p in CONF} >= {"recall", "recall_hard", "copy", "instruction", "mixture", "jsonl"}


@pytest.mark.parametrize("path", CONF, ids=lambda p: p.stem)
def test_every_conf_data_yaml_instantiates_and_yields_a_batch(path, monkeypatch):
    from prosg.data.cli import load_datamodule

    monkeypatch.chdir(ROOT)  # relative data paths in the YAML are relative to the repo root
    dm = load_datamodule(path)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        assert batch["input_ids"].max() < dm.vocab_size
        assert batch["input_ids"].shape[1] <= dm.max_len
        assert (batch["answer_kind"] > 0).any()
        scored = batch["distance"][batch["distance"] >= 0]
        assert scored.numel() == 0 or scored.max() < dm.bucket_edges[-1]


def test_full_lightning_config_with_data_key(tmp_path):
    from prosg.data.cli import load_datamodule

    cfg = tmp_path / "fit.yaml"
    cfg.write_text(
        "seed_everything: 3\nmodel: {class_path: x.Y}\n"
        "data:\n  class_path: prosg.data.ConstructedDataModule\n"
        "  init_args:\n    tasks: {name: copy, seq_len: 4}\n    batch_size: 2\n    seed: ${seed_everything}\n"
    )
    dm = load_datamodule(cfg)
    assert isinstance(dm, ConstructedDataModule) and dm.seed == 3 and dm.tasks == ["copy"]
