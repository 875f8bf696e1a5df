"""On-disk datasets (manifest, checksums, StoredDataModule) and the ``prosg data build/show`` CLI."""

import json
from pathlib import Path

import pytest

from prosg.data.cli import main
from prosg.data import ConstructedDataModule, JSONLDataModule, StoredDataModule
from prosg.data.store import read_dataset, read_manifest, sha256_file, write_dataset
from prosg.data.tasks import GENERATOR_VERSION
from prosg.errors import ConfigError, DataError
from prosg.train import DATA_LINKS

ROOT = Path(__file__).resolve().parents[1]


def dm(**kw):
    args = dict(tasks=[{"name": "recall", "response_len": 60}, {"name": "copy", "seq_len": 5, "gap_range": [0, 10]}],
                train_size=30, val_size=10, test_size=6, batch_size=4, seed=7, eval_distance_scale=2.0)
    args.update(kw)
    return ConstructedDataModule(**args)


def generated(d, split):
    return [d.dataset(split)[i] for i in range(d.sizes[split])]


def test_round_trip_with_manifest(tmp_path):
    d = dm()
    mpath = write_dataset(d, tmp_path / "ds")
    manifest = json.loads(mpath.read_text())
    assert manifest["counts"] == {"train": 30, "val": 10, "test": 6}
    assert manifest["generator_version"] == GENERATOR_VERSION and manifest["seed"] == 7
    assert manifest["info"]["splits"]["val"][0]["response_len"] == 120  # eval knobs recorded per split
    for split, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(tmp_path / "ds" / entry["file"])
    back = read_dataset(tmp_path / "ds")
    for split in ("train", "val", "test"):
        assert back[split] == generated(d, split)


def test_writing_is_deterministic(tmp_path):
    write_dataset(dm(), tmp_path / "a")
    write_dataset(dm(), tmp_path / "b")
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_tampered_missing_and_absent_files_are_detected(tmp_path):
    out = tmp_path / "ds"
    write_dataset(dm(), out)
    lines = (out / "val.jsonl").read_text().splitlines()
    ex = json.loads(lines[3])
    ex["response_ids"][5] += 1
    lines[3] = json.dumps(ex, sort_keys=True, separators=(",", ":"))
    (out / "val.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"checksum mismatch for .*val.jsonl.*prosg data build"):
        read_dataset(out)
    assert read_dataset(out, splits=["train"])["train"]  # the untouched split still reads
    assert len(read_dataset(out, verify=False)["val"]) == 10
    (out / "test.jsonl").unlink()
    with pytest.raises(DataError, match="test.jsonl is listed in manifest.json but missing"):
        read_dataset(out, splits=["test"])
    with pytest.raises(DataError, match="not a stored dataset"):
        read_manifest(tmp_path / "empty")


def test_overwrite_and_split_selection(tmp_path):
    out = tmp_path / "ds"
    write_dataset(dm(), out, splits=["val"])
    assert read_manifest(out)["counts"] == {"val": 10} and not (out / "train.jsonl").exists()
    with pytest.raises(ConfigError, match="already holds a dataset.*--overwrite"):
        write_dataset(dm(), out)
    write_dataset(dm(), out, overwrite=True)
    assert read_manifest(out)["counts"] == {"train": 30, "val": 10, "test": 6}
    with pytest.raises(ConfigError, match="not available"):
        write_dataset(dm(test_size=0), tmp_path / "x", splits=["test"])


def test_stored_datamodule_gives_the_generated_batches(tmp_path):
    d = dm()
    write_dataset(d, tmp_path / "ds")
    s = StoredDataModule(str(tmp_path / "ds"), batch_size=4)
    assert (s.vocab_size, s.pad_id, s.bucket_edges, s.max_len, s.tasks) == (d.vocab_size, d.pad_id, d.bucket_edges, d.max_len, d.tasks)
    s.setup("fit")
    for a, b in zip(s.val_dataloader(), d.val_dataloader()):
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]) if isinstance(a[k], list) else a[k].equal(b[k])
    ex = s.dataset("val")[0]
    assert s.decode_tokens(ex, ex["prompt_ids"]) == d.decode_tokens(ex, ex["prompt_ids"])


def test_stored_facts_are_final_right_after_construction(tmp_path):
    facts = lambda d: {fact: getattr(d, fact) for fact in DATA_LINKS}  # noqa: E731
    d = dm(tasks=[{"name": "recall", "n_facts": 3, "response_len": 60}, {"name": "instruction", "n_facts": 1}])
    write_dataset(d, tmp_path / "c", splits=["val"])
    s = StoredDataModule(str(tmp_path / "c"))
    assert facts(s) == facts(d) and s.n_facts_values == [1, 3]  # as the source declared them
    assert s._data == {}  # ... read off the manifest, not the examples
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "ab", "response": "cd", "task": "mine"}) + "\n")
    j = JSONLDataModule(train_path=str(src))
    write_dataset(j, tmp_path / "j")
    s = StoredDataModule(str(tmp_path / "j"))
    assert facts(s) == facts(j) == {**facts(s), "tasks": ["mine"], "n_facts_values": [0]} and s._data == {}
    exs = [dict(ex, n_facts=2) for ex in generated(d, "val")[:3]]
    write_dataset(exs, tmp_path / "e")
    s = StoredDataModule(str(tmp_path / "e"))
    assert s.tasks == list(dict.fromkeys(ex["task"] for ex in exs))
    assert s.n_facts_values == [2]  # bare examples: only the data knows


def test_examples_and_jsonl_sources(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "ab", "response": "cd"}) + "\n")
    j = JSONLDataModule(train_path=str(src))
    write_dataset(j, tmp_path / "j")
    assert read_dataset(tmp_path / "j")["train"] == [j.dataset("train")[0]]
    assert read_manifest(tmp_path / "j")["info"]["source"] == "jsonl"
    exs = [dm().dataset("train")[i] for i in range(3)]
    write_dataset(exs, tmp_path / "e")
    assert read_dataset(tmp_path / "e") == {"train": exs}


def test_parquet_round_trip_or_clear_error(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install pyarrow"):
            write_dataset(dm(), tmp_path / "p", fmt="parquet")
        return
    d = dm()
    write_dataset(d, tmp_path / "p", fmt="parquet")
    assert read_dataset(tmp_path / "p")["val"] == generated(d, "val")


# ---------------------------------------------------------------- CLI


def test_cli_build_then_show_highlights_answers(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = tmp_path / "recall.yaml"
    cfg.write_text(
        "class_path: prosg.data.ConstructedDataModule\n"
        "init_args:\n  tasks: {name: recall, response_len: 48}\n  train_size: 12\n  val_size: 4\n  test_size: 4\n"
    )
    out = tmp_path / "built"
    assert main(["build", "--config", str(cfg), "--out", str(out), "--splits", "train", "val"]) == 0
    assert "wrote 12 train, 4 val examples" in capsys.readouterr().out
    assert read_manifest(out)["counts"] == {"train": 12, "val": 4}

    assert main(["show", "--config", str(cfg), "--split", "val", "-n", "2", "--color", "never"]) == 0
    text = capsys.readouterr().out
    ex = ConstructedDataModule(tasks={"name": "recall", "response_len": 48}, val_size=4).dataset("val")[0]
    prompt_answers = [(f"v{t - 21}", d) for t, k, d in zip(ex["response_ids"], ex["answer_kind"], ex["distance"]) if k == 2]
    local_answers = [f"v{t - 21}" for t, k in zip(ex["response_ids"], ex["answer_kind"]) if k == 1]
    first = text.split("== val example 1")[0]
    for v, d in prompt_answers:
        assert f"[{v} d={d}]" in first
    for v in local_answers:
        assert f"({v})" in first
    assert "legend:" in text and "== val example 0: task=recall n_facts=4" in text and "\x1b[" not in text

    assert main(["show", "--path", str(out), "--split", "val", "-n", "1", "--color", "always"]) == 0
    coloured = capsys.readouterr().out
    assert "\x1b[1;31m[" in coloured and "StoredDataModule" in coloured


def test_cli_shows_instruction_and_jsonl(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["show", "--config", "conf/data/instruction.yaml", "-n", "1", "--color", "never"]) == 0
    text = capsys.readouterr().out
    assert "is named" in text and " named [" in text  # the scored first letter of the name
    assert main(["show", "--config", "conf/data/jsonl.yaml", "-n", "1", "--split", "train", "--color", "never"]) == 0
    assert "(Le ciel est bleu par une journée claire.)" in capsys.readouterr().out


def test_cli_errors_are_reported_not_raised(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("class_path: prosg.data.ConstructedDataModule\ninit_args:\n  tasks: {name: recall, n_facts: 40}\n")
    assert main(["show", "--config", str(bad)]) == 2
    assert "n_keys > n_facts" in capsys.readouterr().err
    bad.write_text("init_args: {}\n")
    assert main(["build", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "class_path" in capsys.readouterr().err
    bad.write_text("class_path: prosg.data.ConstructedDataModule\ninit_args: {batch_sise: 3}\n")
    assert main(["show", "--config", str(bad)]) == 2
    assert "batch_sise" in capsys.readouterr().err
    assert main(["show", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["show"]) == 2 and "exactly one of --config" in capsys.readouterr().err


# -- bad input: refused before anything is lost, reported in one line naming file and fix ------------------
SMALL_DM = (
    "class_path: prosg.data.ConstructedDataModule\n"
    "init_args:\n  tasks: {name: recall, response_len: 48}\n  train_size: 4\n  val_size: 2\n  test_size: 2\n"
)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_build_never_overwrites_files_it_did_not_write(tmp_path, capsys):
    cfg = tmp_path / "d.yaml"
    cfg.write_text(SMALL_DM)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "train.jsonl").write_text('{"prompt": "my own data", "response": "not generated"}\n')  # no manifest.json
    assert main(["build", "--config", str(cfg), "--out", str(out)]) == 2
    line = error_line(capsys)
    assert "already has train.jsonl" in line and "--overwrite" in line
    assert "my own data" in (out / "train.jsonl").read_text() and not (out / "manifest.json").exists()
    assert main(["build", "--config", str(cfg), "--out", str(out), "--splits", "val"]) == 0  # other files: fine
    assert main(["build", "--config", str(cfg), "--out", str(out), "--overwrite"]) == 0
    assert read_manifest(out)["counts"]["train"] == 4


def test_build_reports_yaml_errors_and_unwritable_out_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("class_path: prosg.data.ConstructedDataModule\ninit_args: {train_size: [1, 2\n")
    assert main(["build", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    line = error_line(capsys)
    assert f"{bad}:3:1: YAML syntax error" in line and "fix the file" in line
    cfg = tmp_path / "d.yaml"
    cfg.write_text(SMALL_DM)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["build", "--config", str(cfg), "--out", str(blocker / "sub")]) == 2
    assert "cannot write the dataset" in error_line(capsys)


def test_non_utf8_jsonl_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "ok", "response": "fine"}\n'.encode() + '{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{path}:2: not valid UTF-8 \(byte 0xe9 at column 16\); save the file as UTF-8"):
        JSONLDataModule(train_path=str(path))
    cfg = tmp_path / "j.yaml"
    cfg.write_text(f"class_path: prosg.data.JSONLDataModule\ninit_args: {{train_path: {path}}}\n")
    assert main(["show", "--config", str(cfg), "--split", "train"]) == 2
    assert f"{path}:2: not valid UTF-8" in error_line(capsys)


def test_manifest_without_files_is_a_data_error(tmp_path, capsys):
    write_dataset(dm(), tmp_path / "ds")
    manifest = json.loads((tmp_path / "ds/manifest.json").read_text())
    del manifest["files"]
    (tmp_path / "ds/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="has no 'files' mapping.*rebuild the dataset"):
        read_dataset(tmp_path / "ds")
    assert main(["show", "--path", str(tmp_path / "ds")]) == 2
    assert "has no 'files' mapping" in error_line(capsys)


def test_data_takes_a_fit_config_and_overrides_like_fit(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["show", "--config", "conf/experiment/sg.yaml", "-n", "1", "--color", "never"]
    assert main([*args, "--data.init_args.val_size=3", "--data.init_args.seed", "5"]) == 0
    text = capsys.readouterr().out
    assert "ConstructedDataModule:" in text and "val_size=3" in text
    assert main([*args, "--seed=5"]) == 2
    assert "unrecognized argument '--seed=5'" in error_line(capsys)
    assert main([*args, "--data.init_args.sed=5"]) == 2
    assert "has no argument 'sed'" in error_line(capsys)
