"""Every YAML under conf/ is parsed and instantiated (and the experiments take a training step)."""

import importlib
from pathlib import Path

import lightning as L
import pytest
import yaml
from jsonargparse import ArgumentParser

from prosg.backbones.base import Backbone
from prosg.sg import SGHead
from prosg.train import lightning_main

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(CONF.glob("experiment/*.yaml"))
TINY_DATA = ["--data.init_args.train_size=8", "--data.init_args.batch_size=4", "--data.init_args.val_size=4",
             "--data.init_args.test_size=4"]


def instantiate(path: Path, base: type):
    parser = ArgumentParser(parser_mode="omegaconf")
    parser.add_subclass_arguments(base, "obj")
    cfg = parser.parse_object({"obj": yaml.safe_load(path.read_text())})
    return parser.instantiate_classes(cfg).obj


def test_conf_tree_is_complete():
    groups = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert {"model", "data", "trainer", "experiment"} <= groups
    for backbone in ("mamba", "rwkv7", "rwkv4", "gpt"):
        for method in ("plain", "sg", "sg_oracle", "jrt", "soft_prompt"):
            assert (CONF / "experiment" / f"{backbone}_{method}.yaml").is_file()


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_trains_a_step(path, tmp_path):
    cli = lightning_main(["fit", "--config", str(path), "--trainer", str(CONF / "trainer/debug.yaml"), *TINY_DATA,
                          "--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1",
                          f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 1
    assert "val/all/acc" in cli.trainer.callback_metrics


@pytest.mark.parametrize("path", sorted(CONF.glob("model/*.yaml")), ids=lambda p: p.stem)
def test_backbone_yaml(path):
    cfg = yaml.safe_load(path.read_text())
    module, name = cfg["class_path"].rsplit(".", 1)
    model = getattr(importlib.import_module(module), name)(vocab_size=32, **cfg["init_args"])
    assert isinstance(model, Backbone)


@pytest.mark.parametrize("path", sorted(CONF.glob("model/sg_head/*.yaml")), ids=lambda p: p.stem)
def test_sg_head_yaml(path):
    head = instantiate(path, SGHead)
    from prosg.backbones import build

    head.attach(build("gpt", vocab_size=16, d_model=32, n_layer=1, n_head=4))
    assert head.targets


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
