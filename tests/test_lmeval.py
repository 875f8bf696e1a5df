"""Free-running instruction following (prosg.lmeval): the checker, the examples, the evaluation on tiny random
models for every method, the callback inside `prosg test`, the sweep report and `prosg lm-eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prosg import lmeval, results
from prosg.backbones import build
from prosg.backbones.native import save_native
from prosg.cli import main as prosg_main
from prosg.data.tasks import InstructionTask, generate_example
from prosg.data.tasks.instruction import NAMES
from prosg.data.tokenizers import ByteTokenizer
from prosg.methods import JRT, Plain, ProSG, SoftPrompt
from prosg.sweep import collect, expand, load_sweep, prepare
from prosg.sweep.runner import write_status
from prosg.train import lightning_main

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POOL = NAMES[:16]
RULES = {"dog": "falcon", "bird": "comet"}
TASK = InstructionTask(n_facts=2, n_keywords=16, response_len=96, query_distances=[0, 32])


@pytest.mark.parametrize("text, outcome, letter", [
    ("falcon sees the cloud.", "acc", 1), (" Falcon.", "acc", 1), ("comet paints the road", "bind_err", 0),
    ("harbor", "not_prompt", 0), ("fal", "not_name", 1), ("falconry", "not_name", 1), ("", "not_name", 0),
    ("123 falcon", "not_name", 0), ("the falcon", "not_name", 0),
])
def test_checker_scores_the_first_word(text, outcome, letter):
    scores = lmeval.check(text, RULES, "dog", POOL)
    assert {k for k in lmeval.OUTCOMES if scores[k]} == {outcome}
    assert sum(scores[k] for k in lmeval.OUTCOMES) == 1 and scores["letter"] == letter


def test_cue_and_leak_helpers():
    assert lmeval.cue_text("", "old", "dog") == "The old dog named "
    assert lmeval.cue_text("It rains.", "old", "dog") == " The old dog named "
    assert lmeval.cue_text("It rains ", "old", "dog") == "The old dog named "
    assert lmeval.cue_text("the cloud", "old", "dog") == ". The old dog named "
    assert lmeval.mentions("The Falcon flies.", "falcon") and not lmeval.mentions("falconry is old", "falcon")
    assert lmeval.first_word("  Comet, the dog") == "comet"


def test_items_are_the_task_prompts_with_distances_drawn_by_bucket():
    edges = [0, 8, 16, 33]
    items = lmeval.make_items(TASK, ByteTokenizer(), 60, seed=3, edges=edges, max_distance=32)
    for it in items[:5]:
        ex = generate_example([TASK], [1.0], 3, "test", it.index)
        assert it.prompt_ids == ex["prompt_ids"] and it.rules == ex["meta"]["rules"] and it.asked in it.rules
        assert it.candidates == ex["candidates"]
    ds = [it.distance for it in items]
    assert min(ds) >= 0 and max(ds) <= 32
    assert all(sum(lo <= d < hi for d in ds) >= 8 for lo, hi in zip(edges, edges[1:]))  # every bucket covered
    again = lmeval.make_items(TASK, ByteTokenizer(), 60, seed=3, edges=edges, max_distance=32)
    assert [(it.distance, it.adjective) for it in again] == [(it.distance, it.adjective) for it in items]


def tiny(family: str):
    sizes = {"gpt": dict(d_model=32, n_layer=1, n_head=2), "mamba": dict(d_model=16, n_layer=1),
             "rwkv7": dict(d_model=32, n_layer=1, head_size=16)}
    return build(family, vocab_size=260, **sizes[family]).eval()


@pytest.mark.parametrize("method", [Plain, JRT, lambda: SoftPrompt(n_tokens=2), lambda: ProSG(rank=2, d_hidden=16)],
                         ids=["plain", "jrt", "soft_prompt", "sg"])
def test_evaluate_any_method_on_a_tiny_random_model(method):
    m = method()
    m.attach(tiny("mamba"))
    modes = lmeval.decodings(["greedy", "sampled"], 1.0, None, 0.9, seed=0)
    metrics, scored = lmeval.evaluate(m, TASK, ByteTokenizer(), n=4, seed=0, edges=[0, 16, 33], max_distance=32,
                                      modes=modes, batch_size=2)
    for mode in ("greedy", "sampled"):
        where = results.prefix("test", f"free/{mode}")
        counts = {b: metrics[f"{where}/n@{b}"] for b in ("0-16", "16-33")}
        assert sum(counts.values()) == 4
        for b, n in counts.items():
            assert (metrics[f"{where}/chance@{b}"], metrics[f"{where}/ceiling@{b}"]) == (1 / 16, 0.5) or n == 0
        assert metrics[f"{where}/acc"] + metrics[f"{where}/bind_err"] + metrics[f"{where}/not_prompt"] \
            + metrics[f"{where}/not_name"] == pytest.approx(1.0)
        for it in scored[mode]:
            assert it.cue.endswith(f"The {it.adjective} {it.asked} named ") and it.generated
            assert set(it.scores) == set(lmeval.STATS) and 0 <= it.distance <= 32
    assert "test/all/acc@0-16" in metrics  # the teacher-forced proxy beside it (byte-level data)
    greedy_again, _ = lmeval.evaluate(m, TASK, ByteTokenizer(), n=4, seed=0, edges=[0, 16, 33], max_distance=32,
                                      modes=modes[:1], batch_size=4, proxy=False)
    assert {k: v for k, v in greedy_again.items() if "/greedy/" in k} == \
        pytest.approx({k: v for k, v in metrics.items() if "/greedy/" in k}, nan_ok=True)  # batching changes nothing


def test_story_of_length_d_is_the_start_of_a_longer_one():
    """One free-running pass serves every d of a batch: its first d tokens are the story of length d."""
    from prosg.generate import generate

    m = Plain()
    m.attach(tiny("gpt"))
    prompt = torch.tensor([generate_example([TASK], [1.0], 0, "test", 0)["prompt_ids"]])
    long = generate(m, prompt, 12)
    assert torch.equal(generate(m, prompt, 5), long[:, :5])


def instruction_args(tmp_path: Path) -> list[str]:
    return ["--config", str(CONF / "experiment/plain.yaml"), "--model.backbone", str(CONF / "model/gpt.yaml"),
            "--model.backbone.init_args.d_model=32", "--model.backbone.init_args.n_layer=1",
            "--data", str(CONF / "data/instruction.yaml"),
            '--data.init_args.tasks=[{"name": "instruction", "response_len": 96, "query_distances": [0, 32]}]',
            "--data.init_args.train_size=8", "--data.init_args.val_size=2", "--data.init_args.test_size=4",
            "--data.init_args.batch_size=4", "--trainer", str(CONF / "trainer/debug.yaml"), "--trainer.max_steps=1",
            "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1", f"--trainer.default_root_dir={tmp_path}"]


def test_callback_adds_free_running_metrics_to_prosg_test(tmp_path):
    cli = lightning_main(["fit", *instruction_args(tmp_path),
                          '--trainer.callbacks+={"class_path": "prosg.lmeval.FreeRunningEval", '
                          '"init_args": {"n_examples": 3, "modes": ["greedy", "sampled"], "batch_size": 3}}'])
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    got = cli.trainer.callback_metrics
    edges = cli.datamodule.bucket_edges
    for mode in ("greedy", "sampled"):
        n = sum(float(got[f"test/free/{mode}/n@{lo}-{hi}"]) for lo, hi in zip(edges, edges[1:]))
        assert n == 3 and f"test/free/{mode}/letter" in got and f"test/free/{mode}/leak" in got
    assert "test/all/acc" in got  # the teacher-forced metrics of the same test


def fake_metrics(acc: float, seed: int) -> dict[str, float]:
    out = {"test/all/acc": acc, "test/all/acc@0-16": acc, "test/all/n@0-16": 4.0}
    for mode in ("greedy", "sampled"):
        for lo, hi in ((0, 16), (16, 33)):
            key = lambda s: f"test/free/{mode}/{results.bucket_metric(lo, hi, s)}"  # noqa: E731,B023
            out.update({key("acc"): acc + 0.1 * seed, key("bind_err"): 0.1, key("not_prompt"): 0.0,
                        key("not_name"): 0.9 - acc - 0.1 * seed, key("letter"): acc + 0.2, key("leak"): 0.0,
                        key("chance"): 1 / 16, key("ceiling"): 0.5, key("n"): 4.0, key("dmin"): lo, key("dmax"): hi - 1})
    return out


def test_sweep_report_has_the_compliance_tables_and_plots(tmp_path):
    body = ("seeds: [0, 1]\naxes:\n  method:\n    plain: {model.method: ../method/plain.yaml}\n"
            "    sg: {model.method: ../method/sg.yaml}\n")
    path = tmp_path / "s.yaml"
    path.write_text(f"experiment: {CONF / 'experiment/plain.yaml'}\nout_dir: {tmp_path / 'out'}\n{body}")
    sw = load_sweep(path)
    runs = expand(sw)
    prepare(runs, sw.out_dir)
    for run in runs:
        acc = 0.6 if run.labels["method"] == "sg" else 0.2
        test = results.json_scalars(fake_metrics(acc, run.seed))
        (sw.out_dir / run.name / "metrics.json").write_text(json.dumps(
            {"axes": run.axes, "seed": run.seed, "test": test, "val": {}, "train": {}, "wall_s": 1, "global_step": 1}))
        write_status(sw.out_dir / run.name, "done")
    collect(sw, runs)
    md = (sw.out_dir / "results.md").read_text()
    assert "## Free-running instruction following (test)" in md and "### Free-running, sampled" in md
    assert "| sg | 65.0 ± 7.1 (bind 10.0) | 65.0 ± 7.1 (bind 10.0) |" in md  # mean ± std over the two seeds
    assert "| *chance / value-set ceiling* | 6.2 / 50.0 | 6.2 / 50.0 |" in md
    assert "| plain | 40.0 ± 0.0 / 0.0 ± 0.0 | 40.0 ± 0.0 / 0.0 ± 0.0 |" in md  # first letter / leaked stories
    for mode in ("greedy", "sampled"):
        assert (sw.out_dir / f"compliance_{mode}.png").read_bytes()[:8] == PNG_MAGIC


def test_lm_eval_command_writes_json_markdown_and_plot(tmp_path, capsys):
    save_native(tiny("rwkv7"), tmp_path / "lm")
    out = tmp_path / "eval"
    assert prosg_main(["lm-eval", "--pretrained", str(tmp_path / "lm"), "--out", str(out), "--n", "3",
                       "--max-distance", "20", "--modes", "[greedy]"]) == 0
    got = json.loads((out / "results.json").read_text())
    assert got["config"]["task"]["n_facts"] == 2 and got["config"]["edges"] == [0, 21]
    assert got["metrics"]["test/free/greedy/n@0-21"] == 3 and "test/all/acc@0-21" in got["metrics"]
    assert len(got["samples"]["greedy"]) == 3 and {"story", "cue", "generated", "scores"} <= set(got["samples"]["greedy"][0])
    md = (out / "results.md").read_text()
    assert "| d | n | distances | compliance | first letter |" in md and md in capsys.readouterr().out
    assert (out / "compliance_greedy.png").read_bytes()[:8] == PNG_MAGIC
    assert prosg_main(["lm-eval", "--pretrained", str(tmp_path / "lm"), "--modes", "[beam]"]) == 1  # one-line error


@pytest.mark.slow  # two sweep runs, each a fresh Python importing torch + Lightning: ~40 s on 2 shared cores
def test_lm_instruction_sweep_gives_the_compliance_table_and_plot(tmp_path):
    """conf/sweep/lm_instruction.yaml, shrunk (a tiny random LM for the shipped one, 2 steps, 3 examples): one
    `prosg sweep` run of plain (evaluation only) and ProSG ends with the free-running table and plots."""
    from prosg.sweep import launch

    save_native(tiny("mamba"), tmp_path / "lm")
    sw = load_sweep(CONF / "sweep/lm_instruction.yaml", out_dir=tmp_path / "out")
    sw.seeds = [0]
    runs = [r for r in expand(sw) if r.name in ("mamba-plain-s0", "mamba-sg-s0")]
    small = {"model.pretrained": str(tmp_path / "lm"),
             "data.init_args.tasks": [{"name": "instruction", "response_len": 96, "query_distances": [0, 32]}],
             "data.init_args.val_size": 2, "data.init_args.test_size": 4, "data.init_args.batch_size": 2,
             "trainer.limit_val_batches": 1, "trainer.val_check_interval": 2,
             "trainer.callbacks+": {"class_path": "prosg.lmeval.FreeRunningEval", "init_args": {"n_examples": 3}}}
    for r in runs:  # later keys win: the shrunk settings go last
        sg = r.labels["method"] == "sg"
        extra = {**small, "trainer.max_steps": 2 if sg else 0, **({"model.method.init_args.d_hidden": 16} if sg else {})}
        r.overrides = {**{k: v for k, v in r.overrides.items() if k not in extra}, **extra}
    statuses = launch(sw, runs)
    assert [s["status"] for s in statuses] == ["done", "done"], [s.get("error") for s in statuses]
    collect(sw, runs)
    md = (sw.out_dir / "results.md").read_text()
    assert "## Free-running instruction following (test)" in md and "| mamba | plain |" in md and "| mamba | sg |" in md
    for mode in ("greedy", "sampled"):
        assert (sw.out_dir / f"compliance_{mode}.png").read_bytes()[:8] == PNG_MAGIC
    m = json.loads((sw.out_dir / "mamba-plain-s0" / "metrics.json").read_text())
    assert m["global_step"] == 0 and m["test"]["test/free/greedy/acc"] is not None and "test/all/acc" in m["test"]
