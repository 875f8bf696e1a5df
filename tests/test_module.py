"""The LightningModule through the real CLI: fit, resume, validate, generate, bad input."""

import glob
import re

import lightning as L
import pytest
import torch

from prosg.backbones import build
from prosg.cli import main
from prosg.methods import MethodOutput, SoftPrompt, repeat_prompt
from prosg.train import lightning_main
from prosg.errors import ConfigError, ProSGError

def exp(method: str) -> list[str]:
    """An experiment (one file per method) on the gpt backbone, chosen by its model YAML."""
    return ["--config", f"conf/experiment/{method}.yaml", "--model.backbone", "conf/model/gpt.yaml"]


SMALL = [
    "--trainer", "conf/trainer/debug.yaml",
    "--data.init_args.train_size=64", "--data.init_args.batch_size=4",
    "--data.init_args.val_size=8", "--data.init_args.test_size=8",
]


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def recorder(cli):
    return next(c for c in cli.trainer.callbacks if isinstance(c, LossRecorder))


def fit_args(tmp_path, method="sg", steps=8):
    return [
        *exp(method), *SMALL, f"--trainer.max_steps={steps}", "--trainer.val_check_interval=100",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=3", "--trainer.callbacks.save_top_k=-1",
        f"--trainer.callbacks.dirpath={tmp_path}/ck",
        "--trainer.callbacks+=test_module.LossRecorder",
    ]


@pytest.fixture(scope="module")
def sg_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sg")
    cli = lightning_main(["fit", *fit_args(tmp)])
    return tmp, cli


def test_fit_trains_and_resumes_mid_epoch_identically(sg_run):
    tmp, cli = sg_run
    first = recorder(cli).losses
    assert sorted(first) == list(range(1, 9))
    assert first[8] < first[1]  # it learns
    ckpt = next(p for p in glob.glob(f"{tmp}/ck/*.ckpt") if "step=3" in p)  # 3 of 16 batches: mid-epoch
    resumed = lightning_main(["fit", *fit_args(tmp), f"--ckpt_path={ckpt}"])
    again = recorder(resumed).losses
    assert sorted(again) == list(range(4, 9))
    for step in again:
        assert again[step] == pytest.approx(first[step], rel=1e-6, abs=1e-7)


def test_prompt_state_dropout_resumes_mid_epoch_identically(tmp_path):
    """The dropout mask's generator travels in the checkpoint: a resumed run drops the samples the
    uninterrupted one dropped, so its losses are the same from the first step after resume."""
    args = [*fit_args(tmp_path, steps=6), "--model.method.init_args.prompt_state_dropout=0.5"]
    first = recorder(lightning_main(["fit", *args])).losses
    ckpt = next(p for p in glob.glob(f"{tmp_path}/ck/*.ckpt") if "step=3" in p)
    again = recorder(lightning_main(["fit", *args, f"--ckpt_path={ckpt}"])).losses
    assert sorted(again) == [4, 5, 6]
    for step in again:
        assert again[step] == pytest.approx(first[step], rel=1e-6, abs=1e-7)


def test_validate_and_generate_from_sg_checkpoint(sg_run, capsys):
    tmp, _ = sg_run
    ckpt = next(p for p in glob.glob(f"{tmp}/ck/*.ckpt") if "step=6" in p)
    cli = lightning_main(["validate", *exp("sg"), *SMALL, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp}/validate"])
    metrics = cli.trainer.callback_metrics
    assert "val/recall/n4/acc" in metrics and "val/all/area" in metrics
    assert 0.0 <= float(metrics["val/recall/n4/acc"]) <= 1.0
    capsys.readouterr()
    assert main(["generate", "--ckpt", ckpt, "--prompt-ids", "1 5 21 6 22 2", "--max-new-tokens", "5"]) == 0
    tokens = capsys.readouterr().out.split()  # printed by name in the checkpoint's task vocabulary
    assert len(tokens) == 5 and all(re.fullmatch(r"<\w+>|[kv]\d+", t) for t in tokens)
    assert main(["generate", "--ckpt", ckpt, "--prompt-ids", "1 5 21 6 22 2", "--max-new-tokens", "5",
                 "--ids", "true"]) == 0
    ids = capsys.readouterr().out.split()
    assert len(ids) == 5 and all(t.isdigit() for t in ids)


def _validate_with(method, ckpt):
    """Build the module of experiment ``method`` in Python and load ``ckpt`` into it (no CLI hparam adoption)."""
    cli = lightning_main([*exp(method), *SMALL], run=False)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, limit_val_batches=1, inference_mode=False)
    return trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, verbose=False)


def test_sg_checkpoint_into_model_without_head(sg_run):
    tmp, _ = sg_run
    ckpt = next(p for p in glob.glob(f"{tmp}/ck/*.ckpt") if "step=6" in p)
    with pytest.raises(ConfigError, match="trained with method ProSG but this config builds Plain"):
        _validate_with("plain", ckpt)


def test_cli_adopts_the_checkpoint_model_config(sg_run):
    # LightningCLI rebuilds the model from the hyper-parameters stored in the checkpoint
    tmp, _ = sg_run
    ckpt = next(p for p in glob.glob(f"{tmp}/ck/*.ckpt") if "step=6" in p)
    cli = lightning_main(["validate", *exp("plain"), *SMALL, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp}/validate"])
    assert type(cli.model.method).__name__ == "ProSG"


def test_plain_checkpoint_into_model_with_head(tmp_path):
    lightning_main(["fit", *exp("plain"), *SMALL, "--trainer.max_steps=1",
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=true"])
    ckpt = glob.glob(f"{tmp_path}/**/*.ckpt", recursive=True)[0]
    with pytest.raises(ConfigError, match="trained with method Plain but this config builds ProSG"):
        _validate_with("sg", ckpt)


def test_nan_loss_names_step_and_cause():
    cli = lightning_main([*exp("plain"), *SMALL], run=False)
    module, dm = cli.model, cli.datamodule
    batch = next(iter(dm.train_dataloader()))
    module.forward = lambda b: MethodOutput(torch.full((*b["input_ids"].shape, dm.vocab_size), float("nan")))
    with pytest.raises(ProSGError, match=r"(?s)loss became nan at global step 0.*learning rate"):
        module.training_step(batch, 0)


def test_generate_cli_rejects_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "none.ckpt"), "--prompt", "hi"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_repeat_prompt_keeps_annotations_with_their_tokens():
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool),
        "answer_kind": torch.tensor([[0, 0, 2, 0, 1], [0, 2, 0, 1, 0]]),
        "distance": torch.tensor([[-1, -1, 0, -1, -1], [-1, 0, -1, -1, -1]]),
        "loss_weight": torch.tensor([[0, 0, 1.0, 0, 1], [0, 1.0, 0, 1, 0]]),
        "prompt_len": torch.tensor([2, 1]),
        "task": ["recall", "recall"],
    }
    out = repeat_prompt(batch, pad_id=0)
    assert out["prompt_len"].tolist() == [4, 2]
    assert out["input_ids"][0].tolist() == [1, 2, 1, 2, 3, 4, 5]
    assert out["input_ids"][1].tolist() == [6, 6, 7, 8, 9, 0, 0]
    assert out["answer_kind"][0].tolist() == [0, 0, 0, 0, 2, 0, 1]
    assert out["distance"][1].tolist() == [-1, -1, 0, -1, -1, -1, -1]
    assert out["attention_mask"][1].tolist() == [True, True, True, True, True, False, False]


def test_soft_prompt_prepends_learned_prefix_from_token_embeddings():
    backbone = build("gpt", vocab_size=20, d_model=8, n_layer=1, n_head=2)
    sp = SoftPrompt(3)
    sp.attach(backbone)
    vocab = backbone.embed(torch.arange(20)).detach()
    assert all(any(torch.equal(row, v) for v in vocab) for row in sp.prefix.data)  # starts at real tokens
    x = torch.randn(2, 5, 8)
    y = sp.prepend(x)
    assert y.shape == (2, 8, 8) and torch.equal(y[:, 3:], x) and torch.equal(y[0, :3], sp.prefix.data)


@pytest.mark.parametrize("method", ["jrt", "soft_prompt"])
def test_baseline_methods_train_and_validate(method, tmp_path):
    cli = lightning_main(["fit", *exp(method), *SMALL, "--trainer.max_steps=2",
                          f"--trainer.default_root_dir={tmp_path}"])
    assert "val/all/acc" in cli.trainer.callback_metrics


def test_frozen_backbone_with_head():
    cli = lightning_main([*exp("sg"), *SMALL, "--model.freeze_backbone=true"], run=False)
    m = cli.model
    assert not any(p.requires_grad for p in m.backbone.parameters())
    groups = m.configure_optimizers()["optimizer"].param_groups
    assert [g["name"] for g in groups] == ["head"]


def test_head_and_backbone_learning_rates():
    cli = lightning_main([*exp("sg"), *SMALL, "--model.lr=0.01", "--model.lr_backbone=0.001"], run=False)
    groups = {g["name"]: g["lr"] for g in cli.model.configure_optimizers()["optimizer"].param_groups}
    assert groups == {"head": pytest.approx(0.01 / 100), "backbone": pytest.approx(0.001 / 100)}  # warmup step 0 of 100


def test_predict_returns_aligned_predictions():
    cli = lightning_main([*exp("plain"), *SMALL], run=False)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, limit_predict_batches=1)
    (out,) = trainer.predict(cli.model, datamodule=cli.datamodule)
    batch = next(iter(cli.datamodule.predict_dataloader()))
    assert torch.equal(out["index"], batch["index"]) and out["pred"].shape == batch["input_ids"].shape
    assert (out["pred"][:, 0] == -1).all()
    assert torch.equal(out["correct"], out["pred"] == batch["input_ids"])


def test_copy_task_is_also_scored_by_free_running_generation(tmp_path):
    cli = lightning_main(["validate", *exp("sg"), "--data", "conf/data/copy.yaml",
                          "--trainer", "conf/trainer/debug.yaml", "--data.init_args.val_size=4",
                          "--data.init_args.batch_size=4", f"--trainer.default_root_dir={tmp_path}"])
    metrics = cli.trainer.callback_metrics
    teacher = [k for k in metrics if k.startswith("val/copy/") and k.endswith("/acc")]
    free = [k for k in metrics if k.startswith("val/gen/copy/") and k.endswith("/acc")]
    assert teacher and free
    assert 0.0 <= float(metrics[free[0]]) <= 1.0
