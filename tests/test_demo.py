"""`prosg demo` end to end on a shortened schedule (2 steps, 1 seed): table, results.json, plots."""

import json

import pytest

from prosg.cli import main
from prosg.demo import bucket_table, format_table


@pytest.mark.slow
def test_demo_short_run_writes_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out-dir", str(out), "--steps", "2", "--seeds", "0"]) == 0
    printed = capsys.readouterr().out
    assert "Forgetting table" in printed and "results.json" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == {"plain", "sg"}
    assert set(results["accuracy"]["plain"]) == {"mamba", "rwkv7", "gpt"}
    assert set(results["accuracy"]["sg"]) == {"mamba", "rwkv7"}
    buckets = results["accuracy"]["plain"]["gpt"]
    assert buckets and all(0.0 <= b["mean"] <= 1.0 and list(b["seeds"]) == ["0"] for b in buckets.values())
    assert results["seeds"] == [0]
    assert list(out.glob("*.png")) and (out / "results.md").is_file()
    # --steps caps every run, gpt included (its axis sets its own schedule in the full demo)
    steps = {p.parent.name: json.loads(p.read_text())["global_step"] for p in out.glob("*/metrics.json")}
    assert len(steps) == 5 and set(steps.values()) == {2}, steps


def test_bucket_table_means_over_seeds():
    rows = [
        {"labels": {"backbone": "mamba", "method": "sg"}, "seed": s, "metrics": {
            "test/all/acc@0-16": a, "test/all/acc@16-32": b, "test/all/acc@32-inf": float("nan"), "val/all/acc@0-16": 0.0}}
        for s, a, b in [(0, 0.5, 0.25), (1, 0.7, 0.75)]
    ] + [{"labels": {"backbone": "gpt"}, "seed": 0, "metrics": {"test/all/acc@0-16": 1.0}}]
    table = bucket_table(rows)
    cell = table["sg"]["mamba"]
    assert cell["0-16"]["mean"] == pytest.approx(0.6) and cell["0-16"]["std"] == pytest.approx(0.1414213, rel=1e-5)
    assert cell["16-32"]["seeds"] == {"0": 0.25, "1": 0.75} and "32-inf" not in cell
    assert table["plain"]["gpt"]["0-16"]["mean"] == 1.0  # no method label: the plain reference
    text = format_table(table)
    assert "mamba    sg" in text and "60.0 ±14.1" in text and "d 16-32" in text


def test_bucket_order_is_numeric_in_results_json_and_the_table():
    # metrics.json sorts keys as text: acc@128-256 comes before acc@16-32 there
    metrics = {f"test/all/acc@{b}": 0.5 for b in ("0-16", "128-256", "16-32", "256-inf", "32-64")}
    table = bucket_table([{"labels": {"backbone": "mamba", "method": "plain"}, "seed": 0, "metrics": metrics}])
    order = ["0-16", "16-32", "32-64", "128-256", "256-inf"]
    assert list(table["plain"]["mamba"]) == order
    header = format_table(table).splitlines()[0]
    assert [header.index(f"d {b}") for b in order] == sorted(header.index(f"d {b}") for b in order)
