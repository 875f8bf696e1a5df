"""``prosg sweep``: grid expansion, local + submitit launchers, resume, failure isolation, collect."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest

from prosg import plots
from prosg.cli import main as prosg_main
from prosg.errors import ConfigError
from prosg.sweep import (
    collect, expand, format_value, launchers, load_sweep, main, prepare, read_status, run_one, submitit_parameters,
)
from prosg.sweep.command import Outcome, cap_steps
from prosg.sweep.report import Collected
from prosg.sweep.launchers import INTERRUPTED, NOT_STARTED
from prosg.sweep.runner import write_status
from prosg.train import lightning_main

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DEMO = CONF / "sweep/smoke.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Segfault(L.Callback):
    """Kills its process with SIGSEGV when training starts: a crash no Python handler can catch."""

    def on_fit_start(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGSEGV)


def write_sweep(tmp: Path, body: str, name: str = "s.yaml") -> Path:
    path = tmp / name
    path.write_text(f"experiment: {CONF / 'experiment/plain.yaml'}\nout_dir: {tmp / 'out'}\n{body}")
    return path


GRID = """
seeds: [0, 1]
overrides:
  trainer.max_steps: 7
  model.lr: 0.1
axes:
  backbone:
    gpt: {model.backbone: ../model/gpt.yaml}
    tiny: {model.backbone: ../model/gpt.yaml, model.backbone.init_args.d_model: 16}
  method:
    plain: {model.method: ../method/plain.yaml}
    sg: {model.method: ../method/sg.yaml, model.lr: 0.2}
  rank: {key: model.method.init_args.rank, values: [4, 8], when: {method: sg}}
"""


# -- expansion ----------------------------------------------------------------------------------
def test_grid_expansion_counts_names_and_conditional_axis(tmp_path):
    (tmp_path / "sub").mkdir()
    sw = load_sweep(write_sweep(tmp_path / "sub", GRID))
    runs = expand(sw)
    # backbone (2) x [plain + sg x rank (2)] (3) x seeds (2); rank is not crossed with plain
    assert len(runs) == 2 * 3 * 2
    assert [r.name for r in runs[:6]] == [
        "gpt-plain-s0", "gpt-plain-s1", "gpt-sg-rank4-s0", "gpt-sg-rank4-s1", "gpt-sg-rank8-s0", "gpt-sg-rank8-s1",
    ]
    plain, sg8 = runs[0], runs[4]
    assert plain.axes == {"backbone": "gpt", "method": "plain"} and plain.seed == 0
    assert sg8.axes == {"backbone": "gpt", "method": "sg", "rank": 8} and sg8.labels["rank"] == "rank8"
    assert len({r.name for r in runs}) == len(runs)
    # a .yaml value is relative to the sweep file (here tmp/sub/../model/gpt.yaml)
    assert plain.overrides["model.backbone"] == str(tmp_path / "model/gpt.yaml")


def test_overrides_merge_order_and_formatting(tmp_path):
    sw = load_sweep(write_sweep(tmp_path, GRID))
    run = next(r for r in expand(sw) if r.name == "tiny-sg-rank8-s1")
    # common overrides, then axes in order, then the seed; a replaced key moves to the end
    assert list(run.overrides) == [
        "trainer.max_steps", "model.backbone", "model.backbone.init_args.d_model", "model.method", "model.lr",
        "model.method.init_args.rank", "seed_everything", "data.init_args.seed",
    ]
    assert run.overrides["model.lr"] == 0.2 and run.overrides["seed_everything"] == 1
    args = run.args()
    assert args[:2] == ["--config", str(CONF / "experiment/plain.yaml")]
    assert args.index("--model.method.init_args.rank=8") > args.index(f"--model.method={tmp_path.parent / 'method/sg.yaml'}")
    assert format_value(None) == "null" and format_value(False) == "false"
    assert format_value(1e-5) == "1.0e-05" and format_value(0.003) == "0.003"
    assert format_value([{"name": "recall", "n_facts": 2}]) == '[{"name": "recall", "n_facts": 2}]'


@pytest.mark.parametrize(
    "body, match",
    [
        ("axes: {a: {x: {model.lr: 1}}}\nbogus: 1\n", r"unknown key\(s\) \['bogus'\]"),
        ("axes:\n  r: {key: model.lr, values: [1], when: {m: sg}}\n  m: {sg: {}}\n", "not an axis listed before"),
        ("axes: {a: {x/y: {}}}\n", "not usable in a run directory name"),
        ("overrides: {--model.lr: 1}\n", "without '--'"),
        ("seeds: 3\n", "seeds must be a non-empty list"),
        ("launcher: {name: slurm}\n", "choose one of local, submitit"),
    ],
)
def test_bad_sweep_files_name_the_fix(tmp_path, body, match):
    with pytest.raises(ConfigError, match=match):
        expand(load_sweep(write_sweep(tmp_path, body)))


def test_steps_cap_every_run_and_keep_shorter_axis_schedules(tmp_path):
    """--steps of demo / pretrain / recycle: one meaning, at most N steps; an axis's 250 or 0 (evaluation only) stays."""
    body = """
seeds: [0]
overrides: {trainer.max_steps: 400, trainer.val_check_interval: 400}
axes:
  method:
    plain: {model.method: ../method/plain.yaml, trainer.max_steps: 0}
    short: {model.method: ../method/plain.yaml, trainer.max_steps: 250, trainer.val_check_interval: 250}
    sg: {model.method: ../method/sg.yaml}
"""
    for cap, want in ((100, {"plain": 0, "short": 100, "sg": 100}), (300, {"plain": 0, "short": 250, "sg": 300})):
        sweep = load_sweep(write_sweep(tmp_path, body))
        cap_steps(sweep, cap)
        got = {r.labels["method"]: r.overrides["trainer.max_steps"] for r in expand(sweep)}
        assert got == want
    with pytest.raises(ConfigError, match="--steps -1"):
        cap_steps(sweep, -1)


@pytest.mark.parametrize("statuses, failed, code", [
    ([{"status": "done"}], [], 0),
    ([], [], 0),  # everything was done before
    ([{"status": "failed"}], ["a"], 1),
    ([{"status": "done"}, {"status": INTERRUPTED}], ["b"], 130),
    ([{"status": NOT_STARTED}], ["a"], 130),
])
def test_sweep_commands_exit_130_when_interrupted(statuses, failed, code, capsys):
    collected = Collected(rows=[], summary=[], columns={}, problems=[{"name": n} for n in failed], files=[], notes=[])
    assert Outcome(sweep=None, runs=[], launched=statuses, collected=collected).exit_status() == code
    err = capsys.readouterr().err
    assert ("did not finish: " + ", ".join(failed) in err) == bool(failed)


def test_structured_label_axis_with_when(tmp_path):
    body = "axes:\n  a: {x: {}, z: {}}\n  c: {values: {y: {model.lr: 1}, w: null}, when: {a: x}}\n"
    runs = expand(load_sweep(write_sweep(tmp_path, body)))
    assert [r.name for r in runs] == ["x-y-s0", "x-w-s0", "z-s0"]
    assert runs[0].overrides == {"model.lr": 1, "seed_everything": 0, "data.init_args.seed": 0}
    assert runs[1].axes == {"a": "x", "c": "w"}


def test_duplicate_run_names_are_rejected(tmp_path):
    body = "axes:\n  a: {key: model.lr, values: [1, 2], label: 'lr'}\n"
    with pytest.raises(ConfigError, match="duplicate labels"):
        load_sweep(write_sweep(tmp_path, body))
    body = "axes:\n  a: {x-y: {}, x: {}}\n  b: {z: {}, y-z: {}}\n"  # x-y + z == x + y-z
    with pytest.raises(ConfigError, match="both named 'x-y-z-s0'"):
        expand(load_sweep(write_sweep(tmp_path, body)))


# hand-counted grids of the shipped sweeps (a sweep not listed is checked for self-consistency only)
EXPECTED_RUNS = {"smoke": 4, "demo": 15, "methods": 15, "recall_methods": 36, "rank_ablation": 22, "state_size": 30,
                 "compare_joint": 72, "pretrain": 2, "frozen": 68, "recycle": 40, "pretrain_lm": 3,
                 "lm_instruction": 27}
# tiny stand-ins for pretrained backbones a sweep names but the checkout does not hold yet
STAND_IN = {"mamba": {"d_model": 16, "n_layer": 1}, "rwkv7": {"d_model": 32, "n_layer": 1, "head_size": 16},
            "gpt": {"d_model": 32, "n_layer": 1, "n_head": 2}}


def pretrained_args(run, tmp_path: Path) -> list[str]:
    """``--model.pretrained`` pointing at a tiny random backbone of the run's family (native layout; rwkv7 when the
    run has no backbone label) when the checkpoint the run names is not in the checkout (assets/ is made by
    `prosg pretrain`): every other override of the cell is still checked. Its vocabulary (512) covers every
    shipped task's."""
    from prosg.backbones import build
    from prosg.backbones.native import save_native

    path = run.overrides.get("model.pretrained")
    if path is None or (ROOT / path).exists():
        return [] if path is None else [f"--model.pretrained={ROOT / path}"]
    family = run.labels.get("backbone")
    family = family if family in STAND_IN else "rwkv7"
    stand_in = tmp_path / family
    if not stand_in.exists():
        save_native(build(family, vocab_size=512, **STAND_IN[family]), stand_in)
    return [f"--model.pretrained={stand_in}"]


@pytest.mark.parametrize("path", sorted((CONF / "sweep").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_conf_sweep_expands(path, tmp_path, capsys):
    assert prosg_main(["sweep", str(path), "--dry-run", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    sw = load_sweep(path)
    runs = expand(sw)
    expected = EXPECTED_RUNS.get(path.stem, len(runs))
    assert out.startswith(f"{expected} runs ")
    assert len(runs) == expected and all(f"{r.name} [new]: --config" in out for r in runs)
    for r in runs:  # every config path the sweep refers to exists
        for v in r.overrides.values():
            if isinstance(v, str) and v.endswith(".yaml"):
                assert Path(v).is_file(), (r.name, v)
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.parametrize("path", sorted((CONF / "sweep").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_sweep_cell_builds_its_model_and_data(path, tmp_path):
    # one run per cell through the real parser, so a misspelt override fails here and not mid-sweep
    cells = {}
    for r in expand(load_sweep(path)):
        cells.setdefault(tuple(sorted(r.labels.items())), r)
    for r in cells.values():
        cli = lightning_main([*r.args(), *pretrained_args(r, tmp_path), "--trainer.logger=false",
                              "--trainer.callbacks=[]"], run=False)
        assert cli.model.backbone is not None and cli.datamodule is not None
        if "model.pretrained" in r.overrides:
            assert not any(p.requires_grad for p in cli.model.backbone.parameters())  # frozen LMs


def test_sweep_callbacks_instantiate():
    """The callbacks the sweeps append (dropped above) build from their overrides."""
    from jsonargparse import ArgumentParser

    found = {}
    for path in sorted((CONF / "sweep").glob("*.yaml")):
        for r in expand(load_sweep(path)):
            extra = r.overrides.get("trainer.callbacks+")
            if isinstance(extra, str):  # the shorthand `trainer.callbacks+: prosg.pretrain.ExportBackbone`
                extra = {"class_path": extra}
            if extra is not None:
                found[extra["class_path"]] = extra
    assert set(found) >= {"prosg.pretrain.ExportBackbone", "prosg.lmeval.FreeRunningEval"}
    parser = ArgumentParser()
    parser.add_subclass_arguments(L.Callback, "cb")
    for cfg in found.values():
        assert isinstance(parser.instantiate_classes(parser.parse_object({"cb": cfg})).cb, L.Callback)


# -- the demo sweep end to end: s0 with the local launcher, s1 with submitit (cluster: local) ---------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main([str(DEMO), "--out-dir", str(out), "--only", "*-s0"]) == 0
    first = {d.name: (d / "status.json").stat().st_mtime_ns for d in out.glob("*-s0")}
    # the second invocation skips the finished s0 runs and sends the s1 runs to a submitit job array
    assert main([str(DEMO), "--out-dir", str(out), "--launcher", "submitit", "--cluster", "local"]) == 0
    return out, first


@pytest.mark.slow  # ~40-60 s on 2 shared cores (4 runs, each a fresh Python importing torch + Lightning)
def test_demo_runs_end_to_end_local_and_submitit(demo):
    out, first = demo
    names = ["plain-s0", "plain-s1", "sg-s0", "sg-s1"]
    assert sorted(p.name for p in out.iterdir() if (p / "run.json").exists()) == names
    for name in names:
        d = out / name
        assert read_status(d)["status"] == "done"
        for f in ("overrides.yaml", "config.yaml", "log.txt", "metrics.json"):
            assert (d / f).is_file(), (name, f)
        m = json.loads((d / "metrics.json").read_text())
        assert m["axes"] == {"method": name.split("-")[0]} and m["seed"] == int(name[-1]) and m["global_step"] == 2
        assert 0 <= m["test"]["test/all/acc"] <= 1 and "val/all/acc" in m["val"] and "train/loss" in m["train"]
        sizes = m["sizes"]  # prosg.train.model_sizes of the trained model
        assert sizes["memory"] == sizes["state"] + sizes["method"] > 0 and 0 < sizes["trainable_params"] <= sizes["total_params"]
        assert (d / "checkpoints/last.ckpt").is_file()  # checkpoints stay in the run directory
        assert "`Trainer.fit` stopped: `max_steps=2` reached." in (d / "log.txt").read_text()  # Lightning logs kept
    # the submitit runs went through the job array
    assert list((out / "_submitit").glob("*_log.out"))
    assert {d: (out / d / "status.json").stat().st_mtime_ns for d in first} == first
    for f in ("results.csv", "results.md", "forgetting.png"):
        assert (out / f).is_file()
    assert (out / "forgetting.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_resume_launches_nothing(demo, monkeypatch, capsys):
    out, _ = demo
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/status.json")}

    def must_not_run(run_dir):
        raise AssertionError(f"finished run {run_dir} launched again")

    monkeypatch.setattr(launchers, "execute_run", must_not_run)
    assert main([str(DEMO), "--out-dir", str(out)]) == 0
    assert "4 already done, 0 to run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/status.json")} == before


@pytest.mark.slow
def test_collect_tables_match_metrics(demo, capsys):
    out, _ = demo
    assert main([str(DEMO), "--out-dir", str(out), "--collect"]) == 0
    printed = capsys.readouterr().out
    metrics = {d.name: json.loads((d / "metrics.json").read_text()) for d in out.iterdir() if (d / "metrics.json").exists()}
    rows = {r["run"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert sorted(rows) == sorted(metrics)
    for name, m in metrics.items():
        assert rows[name]["status"] == "done" and rows[name]["method"] == m["axes"]["method"]
        for k, v in {**m["test"], **m["val"]}.items():
            want = "" if v is None else str(float(v))
            assert (str(float(rows[name][k])) if rows[name][k] else "") == want, (name, k)

    sw = load_sweep(DEMO, out_dir=out)
    got = collect(sw, expand(sw))
    md = (out / "results.md").read_text()
    assert md in printed and "| method | n | acc | area | half-life |" in md
    assert "Each seed re-draws the initialisation and the data." in md  # the default seed_keys
    for cell in got.summary:
        method = cell["labels"]["method"]
        accs = [metrics[f"{method}-s{s}"]["test"]["test/all/acc"] for s in (0, 1)]
        mean, std, n = cell["acc"]
        assert n == 2 and mean == pytest.approx(statistics.fmean(accs)) and std == pytest.approx(statistics.stdev(accs))
        assert f"| {method} | 2 | {mean:.3f} ± {std:.3f} |" in md
    assert "acc-vs-rank plot skipped" in md  # demo has no rank axis: noted, not fatal
    assert got.problems == []


def test_collect_plots_rank_axis_and_reports_missing_runs(tmp_path):
    sw = load_sweep(write_sweep(tmp_path, "seeds: [0, 1]\naxes:\n  rank: {key: model.method.init_args.rank, values: [2, 4, 8]}\n"))
    runs = expand(sw)
    prepare(runs, sw.out_dir)
    for i, run in enumerate(runs[:-1]):  # the last run never ran
        acc = 0.1 * i
        test = {"test/all/acc": acc, "test/all/acc@0-16": acc + 0.2, "test/all/acc@16-inf": None,
                "test/all/area": acc, "test/all/half_life": "inf", "test/ppl": 5.0}
        (sw.out_dir / run.name / "metrics.json").write_text(json.dumps(
            {"axes": run.axes, "seed": run.seed, "test": test, "val": {}, "train": {}, "wall_s": 1, "global_step": 1}))
        write_status(sw.out_dir / run.name, "done")
    got = collect(sw, runs)
    assert [p["name"] for p in got.problems] == ["rank8-s1"] and got.problems[0]["status"] == "missing"
    by_rank = {c["labels"]["rank"]: c for c in got.summary}
    assert by_rank["rank2"]["acc"][:2] == pytest.approx((0.05, statistics.stdev([0.0, 0.1])))
    assert by_rank["rank8"]["n"] == 1 and by_rank["rank8"]["half-life"][0] == float("inf")
    md = (sw.out_dir / "results.md").read_text()
    assert "- rank8-s1 — missing" in md and "| rank8 | 1 | 0.400 |" in md
    for f in ("forgetting.png", "acc_vs_rank.png"):
        assert (sw.out_dir / f).read_bytes()[:8] == PNG_MAGIC
    assert "acc-vs-memory plot skipped" in md and not (sw.out_dir / "acc_vs_memory.png").exists()


def test_collect_tables_sizes_and_plots_accuracy_vs_memory(tmp_path):
    body = "axes:\n  d_state: {key: model.backbone.init_args.d_state, values: [2, 8]}\n  method: {plain: {}, sg: {}}\n"
    sw = load_sweep(write_sweep(tmp_path, body))
    runs = expand(sw)
    prepare(runs, sw.out_dir)
    for run in runs:
        state = 100 * run.axes["d_state"]
        sizes = {"state": state, "method": 0, "memory": state, "trainable_params": 1000 + state, "total_params": 5000}
        test = {"test/all/acc": 0.1 * run.axes["d_state"] + (run.axes["method"] == "sg"), "test/all/acc@0-16": 0.5}
        (sw.out_dir / run.name / "metrics.json").write_text(json.dumps(
            {"axes": run.axes, "seed": run.seed, "test": test, "val": {}, "train": {}, "wall_s": 1, "global_step": 1,
             "sizes": sizes}))
        write_status(sw.out_dir / run.name, "done")
    got = collect(sw, runs)
    md = (sw.out_dir / "results.md").read_text()
    assert md.splitlines()[4].endswith("| memory | trainable params |")
    assert "| d_state8 | sg | 1 | 1.800 | 0.500 | 800 | 1800 |" in md
    rows = {r["run"]: r for r in csv.DictReader(open(sw.out_dir / "results.csv"))}
    assert float(rows["d_state2-plain-s0"]["memory"]) == 200 and float(rows["d_state2-sg-s0"]["trainable_params"]) == 1200
    assert (sw.out_dir / "acc_vs_memory.png").read_bytes()[:8] == PNG_MAGIC
    assert "acc-vs-memory" not in md and got.columns["memory"] == "memory"


def test_submitit_parameters_are_accepted_by_submitit(tmp_path):
    import submitit

    launcher = {"name": "submitit", "nodes": 1, "gpus_per_node": 4, "timeout_min": 30, "partition": "gpu",
                "array_parallelism": 8, "cpus_per_task": 8, "slurm": {"account": "proj"}}
    params = submitit_parameters(launcher, "recall")
    assert params == {"name": "recall", "timeout_min": 30, "nodes": 1, "tasks_per_node": 4, "gpus_per_node": 4,
                      "cpus_per_task": 8, "slurm_partition": "gpu", "slurm_array_parallelism": 8,
                      "slurm_account": "proj"}
    # AutoExecutor checks every name, the slurm_* ones against the SLURM executor, on any cluster
    submitit.AutoExecutor(folder=tmp_path, cluster="local").update_parameters(**params)
    assert submitit_parameters({"name": "submitit"}, "x")["tasks_per_node"] == 1


def test_plot_statistics_are_over_seeds():
    xs, mean, std = plots.series_stats({8.0: [0.4], 2.0: [0.0, 0.1, float("nan")]})
    assert xs.tolist() == [2.0, 8.0]
    assert mean.tolist() == pytest.approx([0.05, 0.4]) and std.tolist() == pytest.approx([statistics.stdev([0, 0.1]), 0])
    pts = plots.bucket_midpoints(["t/acc@16-32", "t/acc@32-inf", "t/acc@0-16", "t/acc"])
    assert pts == [("t/acc@0-16", 8.0), ("t/acc@16-32", 24.0), ("t/acc@32-inf", 40.0)]


# -- failures -------------------------------------------------------------------------------------
TINY = """
overrides:
  trainer: {debug}
  trainer.max_steps: 2
  trainer.val_check_interval: 2
  trainer.limit_val_batches: 1
  trainer.limit_test_batches: 1
  trainer.num_sanity_val_steps: 0
  model.backbone: {gpt}
  model.backbone.init_args.d_model: 16
  model.backbone.init_args.n_layer: 1
  data.init_args.tasks: [{{name: recall, n_facts: 2, n_keys: 8, n_values: 8, response_len: 24}}]
  data.init_args.train_size: 8
  data.init_args.batch_size: 4
  data.init_args.val_size: 4
  data.init_args.test_size: 4
"""


@pytest.mark.slow  # two subprocess runs, ~15-25 s
def test_crashed_run_is_isolated_reported_and_retried(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    body = TINY.format(debug=CONF / "trainer/debug.yaml", gpt=CONF / "model/gpt.yaml") + (
        "axes:\n  case:\n    segv: {trainer.callbacks+: test_sweep.Segfault}\n    ok: {}\n"
    )
    path = write_sweep(tmp_path, body)
    out = tmp_path / "out"
    assert main([str(path)]) == 1  # a failed run makes the exit status 1 ...
    segv, ok = read_status(out / "segv-s0"), read_status(out / "ok-s0")
    assert ok["status"] == "done"  # ... but never stops the runs after it
    assert segv["status"] == "failed" and segv["error"] == "killed by signal SIGSEGV" and segv["returncode"] == -11
    assert segv["log"] == str(out / "segv-s0/log.txt") and Path(segv["log"]).is_file()
    err = capsys.readouterr()
    assert "1 done now, 0 skipped (already done), 1 failed" in err.err
    assert "FAILED segv-s0: killed by signal SIGSEGV" in err.err and f"log: {out / 'segv-s0/log.txt'}" in err.err
    assert "- segv-s0 — failed: killed by signal SIGSEGV" in (out / "results.md").read_text()
    assert "| ok | 1 |" in err.out

    launched = []
    monkeypatch.setattr(launchers, "execute_run", lambda d, env=None: launched.append(Path(d).name) or read_status(d))
    assert main([str(path)]) == 1
    assert launched == ["segv-s0"]  # failed runs are retried on re-run, done ones are not


def test_bad_override_fails_with_the_cli_error(tmp_path):
    body = TINY.format(debug=CONF / "trainer/debug.yaml", gpt=CONF / "model/gpt.yaml") + "axes:\n  bb: {missing: {model.backbone: missing.yaml}}\n"
    sw = load_sweep(write_sweep(tmp_path, body))
    (run_dir,) = prepare(expand(sw), sw.out_dir)
    with pytest.raises(ConfigError, match="do not parse"):
        run_one(run_dir)
    status = read_status(run_dir)
    assert status["status"] == "failed" and "missing.yaml" in status["error"] and "model.backbone" in status["error"]


def test_changed_settings_of_a_finished_run_are_an_error(tmp_path):
    path = write_sweep(tmp_path, "overrides: {model.lr: 0.1}\n")
    sw = load_sweep(path)
    (run_dir,) = prepare(expand(sw), sw.out_dir)
    write_status(run_dir, "done")
    prepare(expand(sw), sw.out_dir)  # unchanged: fine
    path.write_text(path.read_text().replace("0.1", "0.2"))
    with pytest.raises(ConfigError, match="finished with different settings.*delete"):
        prepare(expand(load_sweep(path)), sw.out_dir)


def test_local_launcher_runs_jobs_in_parallel_with_thread_cap(tmp_path, monkeypatch):
    seen = []

    def fake(d, env=None):
        seen.append((Path(d).name, dict(env or {})))
        time.sleep(0.2)
        return {"status": "done"}

    monkeypatch.setattr(launchers, "execute_run", fake)
    dirs = [tmp_path / f"r{i}" for i in range(4)]
    start = time.time()
    results = launchers.launch_local(dirs, jobs=2, threads=1)
    assert time.time() - start < 0.75  # 4 runs x 0.2 s, two at a time
    assert [r["status"] for r in results] == ["done"] * 4
    assert sorted(n for n, _ in seen) == ["r0", "r1", "r2", "r3"]
    assert all(env == {"OMP_NUM_THREADS": "1"} for _, env in seen)


# -- re-runs and interruptions --------------------------------------------------------------------
def test_rerun_starts_from_scratch_and_names_the_logger_run(tmp_path):
    """A failed / interrupted run that runs again leaves no stale last.ckpt (no last-v1.ckpt) or logs of the old attempt."""
    body = TINY.format(debug=CONF / "trainer/debug.yaml", gpt=CONF / "model/gpt.yaml") + (
        "  trainer.logger: {class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: elsewhere}}\n"
        "name: mysweep\n"
    )
    sw = load_sweep(write_sweep(tmp_path, body))
    (run,) = expand(sw)
    (run_dir,) = prepare([run], sw.out_dir)
    run_one(run_dir)
    logs = run_dir / "mysweep" / run.name  # CSV / TensorBoard: save_dir/<sweep>/<run>
    first = sorted(p.name for p in (logs / "checkpoints").iterdir())
    assert "last.ckpt" in first and (logs / "metrics.csv").is_file()
    (logs / "checkpoints" / "stale-from-the-first-attempt.ckpt").write_bytes(b"x")
    write_status(run_dir, "failed", error="pretend it crashed")
    run_one(run_dir)
    assert sorted(p.name for p in (logs / "checkpoints").iterdir()) == first  # no last-v1.ckpt, nothing stale
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "config.yaml", "metrics.json", "mysweep", "overrides.yaml", "run.json", "status.json"]
    assert read_status(run_dir)["status"] == "done"


@pytest.mark.parametrize(("cls", "expected"), [
    ("CSVLogger", {"save_dir": "RUN", "name": "grp", "version": "r-s0"}),
    ("TensorBoardLogger", {"save_dir": "RUN", "name": "grp", "version": "r-s0"}),
    ("WandbLogger", {"save_dir": "RUN", "name": "r-s0"}),
    ("MLFlowLogger", {"run_name": "r-s0", "experiment_name": "grp"}),
])
def test_sweep_runs_are_named_and_grouped_in_loggers(cls, expected):
    from prosg.train import name_logger

    logger = {"class_path": f"lightning.pytorch.loggers.{cls}",
              "init_args": {"save_dir": "runs"} if cls != "MLFlowLogger" else {}}
    name_logger(logger, "RUN", "r-s0", "grp")
    assert logger["init_args"] == expected
    assert logger.get("dict_kwargs") == ({"group": "grp"} if cls == "WandbLogger" else None)
    assert expand(load_sweep(DEMO))[0].spec()["sweep"] == "smoke"


@pytest.mark.slow  # a real sweep in a subprocess, interrupted during its first run: ~30-60 s
def test_interrupted_sweep_ends_with_its_summary_and_resumes(tmp_path):
    body = TINY.format(debug=CONF / "trainer/debug.yaml", gpt=CONF / "model/gpt.yaml").replace(
        "trainer.max_steps: 2", "trainer.max_steps: 100000\n  trainer.max_time: '00:00:05:00'") + (
        "seeds: [0, 1, 2]\n"
    )
    path = write_sweep(tmp_path, body)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "prosg", "sweep", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # a background job (``cmd &`` in a script) starts with SIGINT ignored, which Python
                            # then keeps: give the sweep the terminal's default, as a Ctrl-C would find it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while read_status(out / "s0").get("status") != "running":  # the first run has started
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground process group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "sweep s: interrupted: 0 done now, 0 skipped (already done), 0 failed, 1 interrupted, 2 not started" in stderr
    assert "run the same command again to resume" in stderr
    assert read_status(out / "s0")["status"] == "interrupted"
    assert not (out / "s1" / "status.json").exists() and not (out / "s1" / "log.txt").exists()
    assert (out / "results.md").is_file() and "s0 — interrupted" in (out / "results.md").read_text()


def test_seeds_redraw_the_data_by_default_and_templates_fill_in_the_seed(tmp_path):
    runs = expand(load_sweep(write_sweep(tmp_path, "seeds: [3, 4]\n")))
    assert [(r.overrides["seed_everything"], r.overrides["data.init_args.seed"]) for r in runs] == [(3, 3), (4, 4)]
    body = "seeds: [1, 2]\nseed_keys: {seed_everything: '{seed}', model.pretrained: 'assets/bb-s{seed}'}\n"
    runs = expand(load_sweep(write_sweep(tmp_path, body, name="t.yaml")))
    assert [r.overrides["model.pretrained"] for r in runs] == ["assets/bb-s1", "assets/bb-s2"]
    assert runs[0].overrides["seed_everything"] == 1 and "data.init_args.seed" not in runs[0].overrides
    with pytest.raises(ConfigError, match="seed_keys must be"):
        load_sweep(write_sweep(tmp_path, "seed_keys: 3\n", name="u.yaml"))


@pytest.mark.slow  # three subprocess runs, ~20-40 s
def test_tuned_sweep_runs_the_chosen_setting_on_the_confirmation_seeds(tmp_path, monkeypatch, capsys):
    """``prosg sweep`` with ``tune.seeds``: the grid on the tuning seed, then the chosen setting on the extra seed,
    all in the tuned table; running it again launches nothing."""
    body = TINY.format(debug=CONF / "trainer/debug.yaml", gpt=CONF / "model/gpt.yaml") + (
        "axes:\n  lr: {key: model.lr, values: [0.001, 0.01], label: 'lr{value}'}\n"
        "tune: {over: [lr], by: val/all/acc, seeds: [1]}\n"
    )
    path = write_sweep(tmp_path, body)
    out = tmp_path / "out"
    assert main([str(path)]) == 0
    done = sorted(d.name for d in out.iterdir() if d.is_dir() and read_status(d).get("status") == "done")
    chosen = [d for d in done if d.endswith("-s1")]
    assert len(done) == 3 and len(chosen) == 1 and chosen[0].replace("-s1", "-s0") in done
    assert "confirming the chosen settings: 1 run(s) on seeds [1]" in capsys.readouterr().out
    assert f"| {chosen[0].split('-')[0]} | " in (out / "results.md").read_text().split("Best per cell")[1]
    launched = []
    monkeypatch.setattr(launchers, "execute_run", lambda d, env=None: launched.append(Path(d).name) or read_status(d))
    assert main([str(path)]) == 0 and launched == []
