"""``prosg.results``: metric keys built, parsed and sorted in one place; statistics over seeds."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from prosg import results
from prosg.metrics import ForgettingCurve, ForgettingMetrics


def test_keys_round_trip():
    keys = [
        results.metric_key("test", results.ALL, results.bucket_metric(64, 128)),
        results.metric_key("val", results.slice_name("recall", 4), results.AREA),
        results.metric_key("test", results.ALL, results.LOCAL_ACC),
        results.metric_key("test", None, results.PPL),
        results.metric_key("val", "gen/copy/n2", results.bucket_metric(32, math.inf)),
    ]
    assert keys == ["test/all/acc@64-128", "val/recall/n4/area", "test/all/local_acc", "test/ppl",
                    "val/gen/copy/n2/acc@32-inf"]
    parsed = [results.parse_key(k) for k in keys]
    assert [str(p) for p in parsed] == keys
    assert parsed[0] == results.Key("test", "all", "acc@64-128") and parsed[0].bucket == (64, 128)
    assert parsed[1].slice == "recall/n4" and parsed[1].prefix == "val/recall/n4" and parsed[1].bucket is None
    assert parsed[3] == results.Key("test", None, "ppl") and parsed[3].prefix == "test"
    assert parsed[4].bucket == (32, math.inf) and results.is_open_bucket(keys[4]) and not results.is_open_bucket(keys[0])
    assert results.parse_key("wall_s") is None and results.parse_key("test/all/acc@1-x").bucket is None
    assert results.flat_metric(results.curve_bucket(16, math.inf)) == "acc@16-inf" and results.flat_metric("area") == "area"


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metrics_write_the_same_key_strings():
    m = ForgettingMetrics([0, 4, 8], tasks=["recall"], n_facts=[2])
    per_bucket = {f"{stat}@{b}" for stat in results.BUCKET_STATS for b in ("0-4", "4-8", "8-inf")}
    overall = ("acc", "bind_err", "not_prompt", "ceiling", "chance", "area", "half_life", "local_acc")
    assert set(m.compute()) == {f"{s}/{k}" for s in ("recall/n2", "all") for k in (*per_bucket, *overall)} | {"ppl"}
    curve = ForgettingCurve([0, 4, 8], overflow=False)
    curve.update(torch.ones(1, 2, dtype=torch.bool), torch.tensor([[1, 5]]), torch.full((1, 2), 2))
    assert list(curve.compute())[:3] == ["acc/0-4", "bind_err/0-4", "not_prompt/0-4"]
    assert {results.flat_metric(k) for k in curve.compute()} >= {"acc@0-4", "dmax@4-8", "acc", "area"}
    key = results.parse_key("test/all/bind_err@16-32")
    assert key.bucket is None and key.bucket_stat == ("bind_err", 16, 32)  # bucket: accuracy only


def test_buckets_sort_numerically_with_inf_last():
    keys = ["test/all/acc@128-inf", "test/all/acc@16-32", "test/all/acc", "test/all/acc@0-16", "val/all/acc@0-8",
            "test/all/acc@64-128", "test/recall/n4/acc@0-16", "test/all/acc@32-64"]
    got = results.bucket_keys(keys, under="test/all")
    assert [k for k, _, _ in got] == ["test/all/acc@0-16", "test/all/acc@16-32", "test/all/acc@32-64",
                                      "test/all/acc@64-128", "test/all/acc@128-inf"]
    assert got[0][1:] == (0, 16) and got[-1][1:] == (128, math.inf)
    assert len(results.bucket_keys(keys)) == 7  # every slice and split without `under`
    assert results.sort_labels(["128-inf", "16-32", "0-16", "128-256", "2-4"]) == ["0-16", "2-4", "16-32", "128-256", "128-inf"]


def test_mean_std_is_the_sample_std_over_non_nan_values():
    vals = [0.25, 0.5, 0.875, math.nan]
    s = results.mean_std(vals)
    assert s.n == 3 and s.mean == statistics.fmean(vals[:3]) and s.std == statistics.stdev(vals[:3])
    mean, std, n = s  # unpacks like the (mean, std, n) tuple the tables always used
    assert (mean, std, n) == (s.mean, s.std, 3) and s.band() == s.std
    one = results.mean_std([0.5, math.nan])
    assert one.n == 1 and math.isnan(one.std) and one.band() == 0.0
    none = results.mean_std([math.nan])
    assert none.n == 0 and math.isnan(none.mean) and math.isnan(none.band())
    inf = results.mean_std([3.0, math.inf])
    assert inf.mean == math.inf and math.isnan(inf.std) and inf.n == 2
    assert results.format_stats(s, of=4) == f"{s.mean:.3f} ± {s.std:.3f} (n=3)" and results.format_stats(s) == f"{s.mean:.3f} ± {s.std:.3f}"
    assert results.format_stats(one) == "0.500" and results.format_stats(none) == "n/a" and results.format_stats(inf) == "inf"


def test_cells_over_runs():
    rows = [{"seed": s, "metrics": {"test/all/acc": a, "test/all/acc@0-4": b}} for s, a, b in
            [(0, 0.5, math.nan), (1, 0.7, 0.2), (2, 0.9, 0.4)]]
    assert results.cell_stats(rows, "test/all/acc") == results.mean_std([0.5, 0.7, 0.9])
    assert results.cell_stats(rows, "test/missing").n == 0
    assert results.per_seed(rows, "test/all/acc@0-4") == {"1": 0.2, "2": 0.4}


def test_metrics_json_numbers_round_trip_and_flatten():
    values = {"test/all/half_life": math.inf, "test/all/acc@0-4": math.nan, "test/all/acc": 0.5, "val/x": -math.inf}
    written = results.json_scalars(values)
    assert written == {"test/all/acc": 0.5, "test/all/acc@0-4": None, "test/all/half_life": "inf", "val/x": "-inf"}
    assert list(written) == sorted(values)
    flat = results.flat_metrics({"test": results.of_split(written, "test"), "val": results.of_split(written, "val"),
                                 "wall_s": 2.5, "global_step": 4, "sizes": {"memory": 96, "trainable_params": 10,
                                                                            "state": 96}})
    assert flat["test/all/half_life"] == math.inf and math.isnan(flat["test/all/acc@0-4"]) and flat["val/x"] == -math.inf
    assert flat["wall_s"] == 2.5 and flat["memory"] == 96.0 and flat["trainable_params"] == 10.0 and "state" not in flat
    assert math.isnan(results.number("")) and [c for c in flat if not results.is_metric_column(c)] == []
    assert not results.is_metric_column("backbone")


def test_headline_keys():
    rows = [{"metrics": {"test/all/acc": 0.5, "test/all/acc@0-4": math.nan, "test/all/acc@4-8": 0.5,
                         "test/all/acc@8-inf": 0.1, "test/all/area": 0.4, "test/ppl": 3.0, "val/all/acc": 1.0}}]
    assert results.headline_keys(rows) == {
        "acc": "test/all/acc", "area": "test/all/area", "near acc@4-8": "test/all/acc@4-8",
        "far acc@8-inf": "test/all/acc@8-inf", "ppl": "test/ppl",
    }
    assert results.headline_keys(rows, finite=True) == {
        "acc": "test/all/acc", "area": "test/all/area", "near acc@4-8": "test/all/acc@4-8", "ppl": "test/ppl",
    }
    assert results.headline_keys([{"metrics": {"val/all/acc": 1.0}}]) == {"acc": "val/all/acc"}
