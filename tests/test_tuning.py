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
    assert "| plain | lr2 | 0.450 ± 0.000 | 2 |" in md and "| plain | 25.0 ± 7.1 (bind 10.0) |" in md


@pytest.mark.parametrize("raw, match", [
    ({"over": ["nope"]}, "not axes"),
    ({"over": ["lr"], "by": "test/all/acc"}, "validation metric"),
    ({"by": "val/all/acc"}, "tune must be"),
])
def test_bad_tune_sections_name_the_fix(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_tuning(raw, ["method", "lr"], Path("s.yaml"))
    assert parse_tuning(None, ["lr"], Path("s.yaml")) is None
