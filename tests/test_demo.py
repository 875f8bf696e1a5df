"""`prosg demo` end to end on a shortened schedule (2 steps, 1 seed): table, results.json, plots."""

import json

import pytest

from prosg.cli import main
from prosg import results
from prosg.demo import demo_group, format_table


@pytest.mark.slow
def test_demo_short_run_writes_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out-dir", str(out), "--steps", "2", "--seeds", "0"]) == 0
    printed = capsys.readouterr().out
    assert "Forgetting table" in printed and "results.json" in printed
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["table"]) == {"mamba/plain", "mamba/sg", "rwkv7/plain", "rwkv7/sg", "gpt/plain"}
    buckets = summary["table"]["gpt/plain"]
    assert buckets and all(0.0 <= b["acc"]["mean"] <= 1.0 and list(b["acc"]["seeds"]) == ["0"] for b in buckets.values())
    assert all({"bind_err", "chance", "ceiling", "dmin", "dmax", "n"} <= set(b) for b in buckets.values())
    assert summary["seeds"] == [0] and "data.init_args.seed" in summary["seed_keys"]  # seeds re-draw the data
    assert "distances" in printed and "chance / ceiling" in printed
    assert list(out.glob("*.png")) and (out / "results.md").is_file()
    # --steps caps every run, gpt included (its axis sets its own schedule in the full demo)
    steps = {p.parent.name: json.loads(p.read_text())["global_step"] for p in out.glob("*/metrics.json")}
    assert len(steps) == 5 and set(steps.values()) == {2}, steps


def test_forgetting_table_means_over_seeds_with_reference_lines():
    def m(a, b, bind):
        return {"test/all/acc@0-16": a, "test/all/acc@16-32": b, "test/all/acc@32-inf": float("nan"),
                "test/all/bind_err@0-16": bind, "test/all/chance@0-16": 0.125, "test/all/ceiling@0-16": 0.25,
                "test/all/dmin@0-16": 2.0, "test/all/dmax@0-16": 14.0, "val/all/acc@0-16": 0.0}

    rows = [{"labels": {"backbone": "mamba", "method": "sg"}, "seed": s, "metrics": m(a, b, bind)}
            for s, a, b, bind in [(0, 0.5, 0.25, 0.3), (1, 0.7, 0.75, 0.1)]]
    rows += [{"labels": {"backbone": "gpt"}, "seed": 0, "metrics": m(1.0, 1.0, 0.0)}]
    table = results.forgetting_table(rows, demo_group)
    cell = table[("mamba", "sg")]
    assert cell["0-16"]["acc"]["mean"] == pytest.approx(0.6) and cell["0-16"]["acc"]["std"] == pytest.approx(0.1414213, rel=1e-5)
    assert cell["16-32"]["acc"]["seeds"] == {"0": 0.25, "1": 0.75} and "32-inf" not in cell
    assert cell["0-16"]["bind_err"]["mean"] == pytest.approx(0.2)
    assert table[("gpt", "plain")]["0-16"]["acc"]["mean"] == 1.0  # no method label: the plain reference
    text = format_table(table)
    assert "mamba    sg" in text and "60.0 ±14.1 b20.0" in text and "d 16-32" in text
    assert "2–14" in text and "12.5 / 25.0" in text
    md = results.forgetting_markdown(table, ["backbone", "method"])
    assert "| mamba | sg | 60.0 ± 14.1 (bind 20.0) |" in md and "*chance / value-set ceiling*" in md


def test_bucket_order_is_numeric_in_results_json_and_the_table():
    # metrics.json sorts keys as text: acc@128-256 comes before acc@16-32 there
    metrics = {f"test/all/acc@{b}": 0.5 for b in ("0-16", "128-256", "16-32", "256-inf", "32-64")}
    table = results.forgetting_table([{"labels": {"backbone": "mamba", "method": "plain"}, "seed": 0, "metrics": metrics}],
                                     demo_group)
    order = ["0-16", "16-32", "32-64", "128-256", "256-inf"]
    assert list(table[("mamba", "plain")]) == order
    header = format_table(table).splitlines()[0]
    assert [header.index(f"d {b}") for b in order] == sorted(header.index(f"d {b}") for b in order)
