"""2-process CPU DDP (gloo) through the real CLI equals one process with the same global batch.

The DDP run goes through ``python -m prosg.sweep --run-one`` (``prosg.train.fit_and_test``, as
``prosg fit`` does; Lightning re-executes that command for rank 1), the single-process run through
the same ``run_one`` in this process. Each rank takes half of every global batch from Lightning's
DistributedSampler. Why the numbers can be equal (to float rounding), not just close:
  - the loss is normalised per rank (sum of weighted NLL / sum of weights on that rank) and DDP
    averages the ranks' gradients, which equals the gradient of the global loss only when both
    ranks hold the same total weight. The recall task here weights only the prompt answers
    (local_answer_weight 0), so every example carries the same weight and both coincide; with
    unequal weights the DDP run follows a slightly different (per-rank-normalised) objective;
  - the train order: one process shuffles with ``RandomSampler`` seeded by the data seed
    (``seed * 1_000_003 + epoch``), DDP with Lightning's ``DistributedSampler`` seeded by
    ``seed_everything`` (``seed + epoch``). Both seeds are 0 here, so both draw the same
    permutation; with other seeds a DDP run sees the same examples in another order than a
    single-process run (a datamodule matter: seeding the distributed sampler from the data seed
    would make the order independent of the device count);
  - val/test sizes are divisible by the world size, so no example is repeated by the sampler and
    the synchronised metric counts are exactly those of one process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest

from prosg.sweep.runner import execute_run, prepare, read_status, run_one
from prosg.sweep.spec import Run

ROOT = Path(__file__).resolve().parents[1]
TASK = [{"name": "recall", "n_facts": 2, "n_keys": 8, "n_values": 8, "response_len": 48,
         "query_distances": [0, 24], "local_answer_weight": 0.0}]
STEPS = 4


class StepRecorder(L.Callback):
    """Per rank: each step's loss, its loss-weight sum and example indices -> default_root_dir/steps.rank{r}.json."""

    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}
        self.start: list = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        moved = sum(float((p.detach() - p0).square().sum()) for p, p0 in zip(pl_module.parameters(), self.start))
        self.steps[trainer.global_step] = {
            "loss": float(outputs["loss"]),
            "moved": moved ** 0.5,  # distance of the weights from their initial values
            "weight": float(batch["loss_weight"].sum()),
            "index": batch["index"].tolist(),
        }

    def on_fit_end(self, trainer, pl_module) -> None:
        path = Path(trainer.default_root_dir) / f"steps.rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.steps))


def make_run(tmp: Path, name: str, devices: int, batch_size: int) -> Path:
    run = Run(
        name=name, labels={}, axes={}, seed=0, experiment=ROOT / "conf/experiment/plain.yaml",
        overrides={
            "trainer": str(ROOT / "conf/trainer/debug.yaml"), "model.backbone": str(ROOT / "conf/model/gpt.yaml"),
            "trainer.accelerator": "cpu", "trainer.devices": devices,
            "trainer.strategy": "ddp" if devices > 1 else "auto",
            "trainer.max_steps": STEPS, "trainer.val_check_interval": STEPS, "trainer.num_sanity_val_steps": 0,
            "trainer.limit_val_batches": None, "trainer.limit_test_batches": None,
            "trainer.callbacks+": "test_ddp.StepRecorder",
            "model.backbone.init_args.d_model": 32, "model.backbone.init_args.n_layer": 1,
            "model.warmup_steps": 0, "model.lr": 1e-2,
            "data.init_args.tasks": TASK, "data.init_args.seed": 0, "seed_everything": 0,
            "data.init_args.train_size": 64, "data.init_args.batch_size": batch_size,
            "data.init_args.val_size": 8, "data.init_args.test_size": 8,
        },
    )
    return prepare([run], tmp)[0]


def steps(run_dir: Path, rank: int) -> dict[int, dict]:
    return {int(k): v for k, v in json.loads((run_dir / f"steps.rank{rank}.json").read_text()).items()}


@pytest.mark.slow  # ~25-40 s on the shared 2 cores: two ranks each import torch + Lightning
def test_two_process_ddp_matches_single_process(tmp_path, monkeypatch):
    # the rank processes import this file's callback by name
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    ddp = make_run(tmp_path, "ddp", devices=2, batch_size=2)
    status = execute_run(ddp)
    assert status["status"] == "done", (status.get("error"), status.get("log_tail"))
    single = make_run(tmp_path, "single", devices=1, batch_size=4)
    run_one(single)
    assert read_status(single)["status"] == "done"

    one, r0, r1 = steps(single, 0), steps(ddp, 0), steps(ddp, 1)
    assert sorted(one) == sorted(r0) == sorted(r1) == list(range(1, STEPS + 1))
    for s in one:
        # the two ranks' halves make up exactly the single process's batch (DistributedSampler over
        # the re-instantiated ResumableDataLoader shards it and keeps its order) ...
        assert sorted(r0[s]["index"] + r1[s]["index"]) == sorted(one[s]["index"])
        assert not set(r0[s]["index"]) & set(r1[s]["index"])
        # ... with equal weight per rank, so the mean of the per-rank losses is the global loss
        assert r0[s]["weight"] == r1[s]["weight"] == one[s]["weight"] / 2
        assert (r0[s]["loss"] + r1[s]["loss"]) / 2 == pytest.approx(one[s]["loss"], rel=1e-5)
        # the weights move, and by the same amount in both runs: equal losses mean equal updates
        assert one[s]["moved"] > 0
        assert r0[s]["moved"] == r1[s]["moved"] == pytest.approx(one[s]["moved"], rel=1e-4)

    # val (after fit) and test metrics: synchronised over ranks, written once by rank 0
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (ddp, single))
    assert got["global_step"] == want["global_step"] == STEPS
    for split in ("val", "test"):
        assert got[split].keys() == want[split].keys() and f"{split}/all/acc" in got[split]
        for k, v in want[split].items():
            if v is None or isinstance(v, str):  # empty bucket (NaN) or a half-life never reached (inf)
                assert got[split][k] == v, k
            else:
                assert got[split][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert not list(ddp.glob("metrics.json.*")) and not list(ddp.glob(".*.tmp"))
    log = (ddp / "log.txt").read_text()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log
