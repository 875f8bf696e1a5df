"""Shortcut audit: on generated data, no solver that ignores the prompt's bindings beats its analytic
baseline in any distance bucket — and the audit catches the shortcuts when they are put back."""

import dataclasses
from pathlib import Path

import pytest

from prosg.data.audit import SOLVERS, audit, solver_scores
from prosg.data.cli import load_datamodule_config
from prosg.data.cli import main as data_main
from prosg.data.constructed import ConstructedDataModule
from prosg.data.tasks import TASKS, CopyTask, InstructionTask, RecallTask

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
N = 600  # test examples per config: enough for 4-standard-error tolerances of a few points


def audit_config(name: str, **overrides):
    cfg = load_datamodule_config(CONF / f"{name}.yaml")["init_args"]
    dm = ConstructedDataModule(**{**cfg, "test_size": N, **overrides})
    ds = dm.dataset("test")
    examples = [ds[i] for i in range(len(ds))]
    return {t.name: audit([e for e in examples if e["meta"]["task_id"] == k], t, dm.bucket_edges)
            for k, t in enumerate(dm.split_tasks["test"])}


@pytest.mark.parametrize("name", ["recall", "recall_hard", "copy", "instruction", "mixture", "lm"])
def test_shipped_tasks_admit_no_shortcut(name):
    for task, buckets in audit_config(name).items():
        if not TASKS[task].prompt_answers:  # plain text (the LM mixture): nothing asked, nothing to audit
            assert buckets == []
            continue
        assert buckets, f"{task}: no prompt answers audited"
        for b in buckets:
            assert not b.shortcuts(), f"{name}/{task} bucket {b.lo}-{b.hi}: {b.shortcuts()} beat their baselines"
            # the reference lines the metrics report: chance and the value-set ceiling, both flat in distance
            assert b.measured["chance"] == pytest.approx(b.baseline["chance"])


def test_old_recall_is_caught_elimination_grows_with_distance():
    """The first demo's task (every fact asked once, in slot order, iid values) is flagged."""
    old = [{"name": "recall", "n_facts": 2, "n_keys": 16, "n_values": 8, "response_len": 48,
            "query_distances": [0, 24], "n_prompt_queries": 2, "distinct_values": False}]
    dm = ConstructedDataModule(tasks=old, eval_distance_scale=4, test_size=N)
    ds = dm.dataset("test")
    buckets = audit([ds[i] for i in range(N)], dm.split_tasks["test"][0], dm.bucket_edges)
    flagged = [b for b in buckets if "elimination" in b.shortcuts()]
    assert flagged and flagged[-1].measured["elimination"] > 0.9  # the far bucket holds only last queries
    assert buckets[-1].measured["elimination"] > buckets[0].measured["elimination"]


class RepeatedCopy(CopyTask):
    """The old copy task's flaw: the reproduction appears twice, the second copyable from the first."""

    def generate(self, rng):
        ex = super().generate(rng)
        c = self.n_copy
        start = len(ex["response_ids"]) - c
        ex["response_ids"] += ex["response_ids"][start:]
        ex["answer_kind"] += [2] * c
        ex["distance"] += list(range(start + c, start + 2 * c))
        ex["loss_weight"] += [1.0] * c
        return ex


class RuleInEverySentence(InstructionTask):
    """The old instruction task's flaw: the named sentence repeats, so later names copy the first."""

    def generate(self, rng):
        ex = super().generate(rng)
        d = ex["distance"][ex["answer_kind"].index(2)]
        sentence = ex["response_ids"][d - 20 : d + 10]
        ex["response_ids"] += [32] + sentence
        n = len(sentence) + 1
        ex["answer_kind"] += [0] * n
        ex["answer_kind"][-11] = 2
        ex["distance"] += [-1] * n
        ex["distance"][-11] = len(ex["response_ids"]) - 11
        ex["loss_weight"] += [1.0] * n
        return ex


@pytest.mark.parametrize("task", [RepeatedCopy(gap_range=[0, 40]), RuleInEverySentence()], ids=["copy", "instruction"])
def test_copying_from_the_response_is_caught(task):
    import numpy as np

    examples = [task.generate(np.random.default_rng([7, i])) for i in range(300)]
    buckets = audit(examples, task, task.edges)
    assert any("copy_response" in b.shortcuts() for b in buckets)


def test_solver_scores_by_hand():
    ex = {"response_ids": [3, 9, 7, 4, 9, 8], "answer_kind": [0, 0, 2, 0, 0, 2], "distance": [-1, -1, 2, -1, -1, 5],
          "candidates": [7, 8, 8, 6], "chance": 0.1}
    first, second = solver_scores(ex)
    assert set(first) == {"distance", "answer_index", *SOLVERS}
    assert first["value_set"] == 0.25 and second["value_set"] == 0.5
    assert second["elimination"] == pytest.approx(2 / 3)  # 7 already given: {8, 8, 6}
    assert first["last_prompt_value"] == 0 and second["most_frequent"] == 0 and first["most_frequent"] == 0.1
    assert first["copy_response"] == 0.1  # nothing earlier to copy: a guess


def test_recall_knobs_are_checked():
    with pytest.raises(Exception, match="distinct_values needs n_values >= n_facts"):
        RecallTask(n_facts=5, n_keys=16, n_values=4)
    assert dataclasses.replace(RecallTask(), distinct_values=False).shortcut_baselines(0)["value_set"] > 0.25


def test_audit_command_prints_the_table_and_fails_on_a_shortcut(tmp_path, capsys):
    cfg = tmp_path / "old.yaml"
    cfg.write_text("class_path: prosg.data.ConstructedDataModule\ninit_args:\n  tasks:\n"
                   "    - {name: recall, n_facts: 2, n_keys: 8, n_values: 8, response_len: 30, n_prompt_queries: 2}\n"
                   "  test_size: 400\n")
    assert data_main(["audit", "--config", str(cfg), "-n", "400"]) == 1
    out = capsys.readouterr().out
    assert "elimination" in out and "!" in out
    assert data_main(["audit", "--config", str(CONF / "recall.yaml"), "-n", "200"]) == 0
