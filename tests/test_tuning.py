"""Equal tuning effort: the best setting per cell is chosen on validation only, and reported on test."""

from pathlib import Path

import pytest

from prosg.errors import ConfigError
from prosg.sweep.tuning import Tuning, best_per_cell, parse_tuning, tuning_markdown


def row(method, lr, seed, val, test):
    return {"labels": {"method": method, "lr": lr}, "seed": seed,
            "metrics": {"val/all/acc": val, "test/all/acc@0-16": test, "test/all/bind_err@0-16": 0.1,
                        "test/all/chance@0-16": 0.125, "test/all/ceiling@0-16": 0.25,
                        "test/all/dmin@0-16": 2.0, "test/all/dmax@0-16": 14.0}}


def test_best_setting_is_chosen_by_mean_validation_never_by_test():
    done = [row("plain", "lr1", 0, 0.5, 0.9), row("plain", "lr1", 1, 0.3, 0.9),  # mean val 0.4, great test
            row("plain", "lr2", 0, 0.45, 0.2), row("plain", "lr2", 1, 0.45, 0.3),  # mean val 0.45: chosen
            row("sg", "lr1", 0, 0.8, 0.7), row("sg", "lr2", 0, 0.1, 0.99)]
    tuning = Tuning(["lr"], "val/all/acc")
    best = {b["labels"]["method"]: b for b in best_per_cell(done, tuning, ["method", "lr"])}
    assert best["plain"]["chosen"] == {"lr": "lr2"} and best["plain"]["score"].mean == pytest.approx(0.45)
    assert best["sg"]["chosen"] == {"lr": "lr1"} and best["plain"]["tried"] == 2
    md = tuning_markdown(list(best.values()), tuning, ["method", "lr"])
    assert "| plain | lr2 | 0.450 ± 0.000 | 2 | 2 |" in md and "| plain | 25.0 ± 7.1 (bind 10.0) |" in md


@pytest.mark.parametrize("raw, match", [
    ({"over": ["nope"]}, "not axes"),
    ({"over": ["lr"], "by": "test/all/acc"}, "validation metric"),
    ({"by": "val/all/acc"}, "tune must be"),
])
def test_bad_tune_sections_name_the_fix(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_tuning(raw, ["method", "lr"], Path("s.yaml"))
    assert parse_tuning(None, ["lr"], Path("s.yaml")) is None


def test_confirmation_seeds_never_choose():
    """Runs on ``tune.seeds`` are reported with the chosen setting but never decide which setting it is."""
    done = [row("sg", "lr1", 0, 0.6, 0.5), row("sg", "lr2", 0, 0.5, 0.5),
            row("sg", "lr1", 1, 0.1, 0.5), row("sg", "lr2", 1, 0.9, 0.5)]  # seed 1 alone would flip the choice
    (best,) = best_per_cell(done, Tuning(["lr"], "val/all/acc", seeds=[1]), ["method", "lr"])
    assert best["chosen"] == {"lr": "lr1"} and best["score"].mean == pytest.approx(0.6) and best["score"].n == 1
    assert sorted(r["seed"] for r in best["runs"]) == [0, 1]  # the confirmation run is reported with it


def _tuned_sweep(tmp_path, seeds="[0]", tune_seeds="[1, 2]"):
    from prosg.paths import conf_dir
    from prosg.sweep.spec import load_sweep

    path = tmp_path / "tuned.yaml"
    path.write_text(f"experiment: {conf_dir() / 'experiment' / 'plain.yaml'}\nout_dir: {tmp_path / 'runs'}\n"
                    f"seeds: {seeds}\naxes:\n  method: {{plain: {{}}, sg: {{}}}}\n"
                    "  lr: {key: model.lr, values: [0.001, 0.01], label: 'lr{value}'}\n"
                    f"tune: {{over: [lr], by: val/all/acc, seeds: {tune_seeds}}}\n")
    return load_sweep(path)


def _finish(sweep, run, val):
    """A done run with test metrics and, unless ``val`` is None (a run that never validated), its val accuracy."""
    import json

    d = sweep.out_dir / run.name
    d.mkdir(parents=True, exist_ok=True)
    (d / "status.json").write_text(json.dumps({"status": "done"}))
    m = row(run.labels["method"], run.labels.get("lr", ""), run.seed, val, 0.5)["metrics"]
    (d / "metrics.json").write_text(json.dumps({**({} if val is None else {"val": {"val/all/acc": val}}),
                                                "test": {k: v for k, v in m.items() if k.startswith("test/")}}))


def test_tuned_sweep_confirms_each_cells_choice_on_the_extra_seeds(tmp_path):
    from prosg.sweep.report import _tuned_label, collect, confirmation_runs
    from prosg.sweep.spec import expand

    sweep = _tuned_sweep(tmp_path)
    runs = expand(sweep)
    assert sorted(r.name for r in runs) == ["plain-lr0.001-s0", "plain-lr0.01-s0", "sg-lr0.001-s0", "sg-lr0.01-s0"]
    val = {"plain-lr0.001-s0": 0.7, "plain-lr0.01-s0": 0.2, "sg-lr0.001-s0": 0.3}
    for run in runs:
        if run.name in val:
            _finish(sweep, run, val[run.name])
    confirm, waiting = confirmation_runs(sweep, runs)
    assert [r.name for r in confirm] == ["plain-lr0.001-s1", "plain-lr0.001-s2"] and waiting == ["sg"]
    assert confirm[0].overrides["model.lr"] == 0.001 and confirm[1].overrides["seed_everything"] == 2
    assert confirm[1].overrides["data.init_args.seed"] == 2
    collect(sweep, runs, plots=False)  # sg's choice is made from 1 of its 2 settings so far: the table says so
    md = (sweep.out_dir / "results.md").read_text()
    assert "| sg | lr0.001 | 0.300 | 1 of 2 runs (provisional) | 1 |" in md
    assert "| sg (provisional) |" in md.split("The chosen settings")[1]  # its test row too
    _finish(sweep, next(r for r in runs if r.name == "sg-lr0.01-s0"), 0.9)
    confirm, waiting = confirmation_runs(sweep, runs)
    assert sorted(r.name for r in confirm)[2:] == ["sg-lr0.01-s1", "sg-lr0.01-s2"] and waiting == []
    for run in confirm:
        _finish(sweep, run, 0.0)  # worse than every tuning run: the choice stands (seed 0 decides)
    collected = collect(sweep, runs)
    assert len(collected.rows) == 8 and not collected.problems
    md = (sweep.out_dir / "results.md").read_text()
    assert "provisional" not in md
    assert "| plain | lr0.001 | 0.700 | 2 | 3 |" in md and "| sg | lr0.01 | 0.900 | 2 | 3 |" in md
    assert sweep.out_dir / "tuned_forgetting.png" in collected.files  # one curve per method at its chosen lr
    assert _tuned_label({"labels": {"method": "sg"}, "chosen": {"lr": "lr0.01", "aux": ""}}) == "sg (lr0.01)"


def test_confirmation_seeds_must_differ_from_the_tuning_seeds(tmp_path):
    with pytest.raises(ConfigError, match="must differ from seeds"):
        _tuned_sweep(tmp_path, seeds="[0, 1]", tune_seeds="[1, 2]")
    with pytest.raises(ConfigError, match="tune.seeds must be a list of distinct ints"):
        _tuned_sweep(tmp_path, tune_seeds="[1, 1]")


def test_a_cell_with_a_tuning_seed_missing_is_provisional_and_waits_for_its_confirmation(tmp_path):
    """With two tuning seeds, every setting tried once is not enough: the table and the confirmation agree."""
    from prosg.sweep.report import collect, confirmation_runs
    from prosg.sweep.spec import expand
    from prosg.sweep.tuning import planned_runs

    sweep = _tuned_sweep(tmp_path, seeds="[0, 1]", tune_seeds="[2]")
    runs = expand(sweep)
    for run in runs:
        if run.name != "sg-lr0.01-s1":  # sg tried both lrs, but lr0.01 on seed 0 only
            _finish(sweep, run, 0.5)
    planned = planned_runs([r.labels for r in runs], sweep.tune, ["method", "lr"])
    assert planned == {("plain",): 4, ("sg",): 4}
    confirm, waiting = confirmation_runs(sweep, runs)
    assert waiting == ["sg"] and [r.name for r in confirm] == ["plain-lr0.001-s2"]
    collect(sweep, runs, plots=False)
    md = (sweep.out_dir / "results.md").read_text()
    assert "| sg | lr0.001 | 0.500 ± 0.000 | 3 of 4 runs (provisional) | 2 |" in md
    assert "| plain | lr0.001 | 0.500 ± 0.000 | 2 | 2 |" in md  # complete, its confirmation not run yet


def test_a_cell_with_nothing_to_tune_is_confirmed_without_a_validation_score(tmp_path):
    """A method the tuned axes skip (``when``) and that never validates (evaluated as is: max_steps 0) still gets its
    confirmation seeds and a row; a cell with several settings still needs a score to choose."""
    from prosg.paths import conf_dir
    from prosg.sweep.report import collect, confirmation_runs
    from prosg.sweep.spec import expand, load_sweep

    path = tmp_path / "tuned.yaml"
    path.write_text(f"experiment: {conf_dir() / 'experiment' / 'plain.yaml'}\nout_dir: {tmp_path / 'runs'}\n"
                    "seeds: [0]\naxes:\n  method: {asis: {trainer.max_steps: 0}, sg: {}}\n"
                    "  lr: {key: model.lr, values: [0.001, 0.01], label: 'lr{value}', when: {method: [sg]}}\n"
                    "tune: {over: [lr], by: val/all/acc, seeds: [1, 2]}\n")
    sweep = load_sweep(path)
    runs = expand(sweep)
    assert sorted(r.name for r in runs) == ["asis-s0", "sg-lr0.001-s0", "sg-lr0.01-s0"]
    for run in runs:
        _finish(sweep, run, None if run.name in ("asis-s0", "sg-lr0.01-s0") else 0.6)
    confirm, waiting = confirmation_runs(sweep, runs)
    assert sorted(r.name for r in confirm) == ["asis-s1", "asis-s2", "sg-lr0.001-s1", "sg-lr0.001-s2"]
    assert waiting == []  # sg's unscored setting is never chosen over its scored one
    collect(sweep, runs, plots=False)
    md = (sweep.out_dir / "results.md").read_text()
    assert "| asis |  | n/a | 1 | 1 |" in md and "| sg | lr0.001 | 0.600 | 2 | 1 |" in md
