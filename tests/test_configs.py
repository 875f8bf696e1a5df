"""Every YAML under conf/ is parsed and instantiated (and the experiments take a training step)."""

import importlib
import importlib.util
from pathlib import Path

import lightning as L
import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.loggers import Logger

from prosg.backbones.base import Backbone
from prosg.methods import Method
from prosg.train import lightning_main

CONF = Path(__file__).resolve().parents[1] / "conf"
# real_*: recipes for a user's own checkpoint (a local path); tests/test_real_recipe.py runs them on small random
# checkpoints written in those layouts, test_real_recipes_name_their_placeholders below parses them as shipped
REAL = sorted(CONF.glob("experiment/real_*.yaml"))
EXPERIMENTS = sorted(set(CONF.glob("experiment/*.yaml")) - set(REAL))
MODELS = sorted(CONF.glob("model/*.yaml"))
TINY_DATA = ["--data.init_args.train_size=8", "--data.init_args.batch_size=4", "--data.init_args.val_size=4",
             "--data.init_args.test_size=4"]


def instantiate(path: Path, base: type):
    parser = ArgumentParser(parser_mode="omegaconf")
    parser.add_subclass_arguments(base, "obj")
    cfg = parser.parse_object({"obj": yaml.safe_load(path.read_text())})
    return parser.instantiate_classes(cfg).obj


# where each conf/ group's YAMLs are parsed and instantiated: this file, test_datamodule.py (data), test_sweep.py (sweep)
TESTED_GROUPS = {"model", "method", "data", "trainer", "experiment", "sweep", "logger"}


def test_conf_tree_is_complete():
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert {"model", "method", "data", "trainer", "experiment", "sweep", "logger"} <= groups
    # every YAML in conf/ belongs to a group whose files the tests instantiate (data/examples holds JSONL only)
    untested = [str(p.relative_to(CONF)) for p in CONF.rglob("*.y*ml") if p.relative_to(CONF).parts[0] not in TESTED_GROUPS
                or len(p.relative_to(CONF).parts) != 2]
    assert untested == []
    # one experiment per method; the backbone is one more argument (a model YAML)
    assert {p.stem for p in EXPERIMENTS} >= {"plain", "sg", "oracle", "jrt", "soft_prompt"}
    assert {p.stem for p in MODELS} >= {"mamba", "rwkv7", "rwkv4", "gpt"}


@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.stem)
@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_backbone_x_method_trains_a_step(path, model, tmp_path):
    """The documented one-liner: prosg fit --config conf/experiment/<method>.yaml --model.backbone conf/model/<backbone>.yaml"""
    cli = lightning_main(["fit", "--config", str(path), "--model.backbone", str(model),
                          "--trainer", str(CONF / "trainer/debug.yaml"), *TINY_DATA,
                          "--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1",
                          f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 1
    assert type(cli.model.backbone).__name__ == yaml.safe_load(model.read_text())["class_path"].rsplit(".", 1)[1]
    assert "val/all/acc" in cli.trainer.callback_metrics


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_recipes_name_their_placeholders(path, tmp_path):
    """As shipped, a real-checkpoint recipe parses and stops at its first /path/to/ placeholder, in one line."""
    from prosg.errors import ProSGError

    cfg = yaml.safe_load(path.read_text())
    assert cfg["model"]["pretrained"].startswith("/path/to/") and cfg["model"]["freeze_backbone"] is True
    assert cfg["data"]["init_args"]["tokenizer"].startswith("/path/to/") and cfg["trainer"] == "../trainer/gpu.yaml"
    with pytest.raises(ProSGError, match="/path/to/") as err:
        lightning_main(["--config", str(path), f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_backbone_yaml(path):
    cfg = yaml.safe_load(path.read_text())
    module, name = cfg["class_path"].rsplit(".", 1)
    model = getattr(importlib.import_module(module), name)(vocab_size=32, **cfg["init_args"])
    assert isinstance(model, Backbone)


@pytest.mark.parametrize("path", sorted(CONF.glob("method/*.yaml")), ids=lambda p: p.stem)
def test_method_yaml(path):
    method = instantiate(path, Method)
    from prosg.backbones import build

    method.attach(build("gpt", vocab_size=16, d_model=32, n_layer=1, n_head=4))
    assert method.memory_size() >= 0


@pytest.mark.parametrize("path", sorted(CONF.glob("trainer/*.yaml")), ids=lambda p: p.stem)
def test_trainer_checkpoints_monitor_validation_accuracy(path):
    """A trainer that keeps checkpoints keeps the last one and the best by val/all/acc (higher is better)."""
    cfg = yaml.safe_load(path.read_text())
    checkpoints = [c["init_args"] for c in cfg.get("callbacks") or [] if c["class_path"].endswith("ModelCheckpoint")]
    if path.stem == "debug":
        return  # a few steps for tests: Lightning's default checkpointing
    assert len(checkpoints) == 1
    ck = checkpoints[0]
    assert ck["monitor"] == "val/all/acc" and ck["mode"] == "max" and ck["save_last"] is True and ck["save_top_k"] >= 1
    assert "every_n_train_steps" not in ck  # saved after each validation, when the monitored metric is fresh
    assert "/" not in ck.get("filename", "")  # a metric name in the file name would make directories


@pytest.mark.parametrize("path", sorted(CONF.glob("trainer/*.yaml")), ids=lambda p: p.stem)
def test_trainer_yaml(path, tmp_path):
    cfg = yaml.safe_load(path.read_text())
    cfg["accelerator"] = "cpu"  # gpu.yaml is for GPU machines; here only its parsing and wiring are checked
    cfg["precision"] = "32-true" if cfg.get("precision") == "bf16-mixed" else cfg.get("precision", "32-true")
    cfg["devices"] = 1
    cfg["default_root_dir"] = str(tmp_path)
    parser = ArgumentParser(parser_mode="omegaconf")
    parser.add_class_arguments(L.Trainer, "trainer")
    trainer = parser.instantiate_classes(parser.parse_object({"trainer": cfg})).trainer
    assert isinstance(trainer, L.Trainer)


def logger_from_yaml(path: Path, tmp_path: Path):
    cfg = yaml.safe_load(path.read_text())
    cfg["init_args"]["save_dir"] = str(tmp_path)
    if path.stem == "wandb":
        cfg["init_args"]["offline"] = True
    parser = ArgumentParser(parser_mode="omegaconf")
    parser.add_subclass_arguments(Logger, "logger")
    return parser.instantiate_classes(parser.parse_object({"logger": cfg})).logger


@pytest.mark.parametrize("path", sorted(CONF.glob("logger/*.yaml")), ids=lambda p: p.stem)
def test_logger_yaml_logs(path, tmp_path, monkeypatch):
    if path.stem == "wandb":
        pytest.importorskip("wandb", reason="the wandb extra is not installed")
        monkeypatch.setenv("WANDB_MODE", "disabled")
    if path.stem == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        pytest.skip("the tensorboard extra is not installed")
    logger = logger_from_yaml(path, tmp_path)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.finalize("success")
    if path.stem != "wandb":
        assert any(p.is_file() for p in Path(logger.log_dir).rglob("*"))


def test_logger_yaml_is_a_trainer_logger(tmp_path):
    """The documented one-liner: --trainer.logger conf/logger/<name>.yaml, and the lr of each group is logged."""
    cli = lightning_main(["fit", "--config", str(EXPERIMENTS[0]), "--model.backbone", str(CONF / "model/gpt.yaml"),
                          "--trainer", str(CONF / "trainer/debug.yaml"), "--trainer.logger", str(CONF / "logger/csv.yaml"),
                          *TINY_DATA, "--trainer.max_steps=1", "--trainer.limit_val_batches=1",
                          "--trainer.val_check_interval=1", f"--trainer.default_root_dir={tmp_path}",
                          f"--trainer.logger.init_args.save_dir={tmp_path}"])
    header = (Path(cli.trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert any(h.startswith("lr-") for h in header) and "val/all/acc" in header
