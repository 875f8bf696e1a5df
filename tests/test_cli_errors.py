"""Bad input to the ``prosg`` command: one line naming the problem and the fix, no traceback, no code run.

Also the conventions around the command: ``prosg --version``, the lazily imported Python API, configs
that never overwrite another run's, checkpoints that load only tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported here, its log handler binds pytest's stderr, not a test's capsys)
import pytest
import torch
import yaml

from prosg.cli import main
from prosg.train import lightning_main

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = [
    "--config", str(CONF / "experiment/plain.yaml"), "--model.backbone", str(CONF / "model/gpt.yaml"),
    "--trainer", str(CONF / "trainer/debug.yaml"), "--model.backbone.init_args.d_model=32",
    "--model.backbone.init_args.n_layer=1", "--data.init_args.train_size=8", "--data.init_args.batch_size=4",
    "--data.init_args.val_size=4", "--data.init_args.test_size=4", "--trainer.max_steps=1",
    "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1",
]
PAYLOAD = "PWNED: code in the checkpoint ran"


class Payload:
    """Pickles as a call to print: what a malicious checkpoint would run while being unpickled."""

    def __reduce__(self):
        return (print, (PAYLOAD,))


def unsafe_checkpoint(path: Path) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}, "payload": Payload()}, path)
    return path


def one_error_line(text: str) -> str:
    """The single ``prosg: error:`` line of a command's stderr (and no traceback)."""
    assert "Traceback" not in text
    lines = [ln for ln in text.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("prosg: error: "), text[-3000:]
    return lines[0]


def cli_error(capsys, args: list[str]) -> str:
    assert main(args) == 1
    captured = capsys.readouterr()
    assert PAYLOAD not in captured.out + captured.err
    assert "usage:" not in captured.out + captured.err  # no screenful of options before the message
    return one_error_line(captured.err)


# -- checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["validate", "test"])
def test_unsafe_checkpoint_is_refused_in_one_line_and_runs_nothing(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's switch back to full unpickling
    ckpt = unsafe_checkpoint(tmp_path / "evil.ckpt")
    line = cli_error(capsys, [command, *TINY, f"--trainer.default_root_dir={tmp_path}", "--ckpt_path", str(ckpt)])
    assert "safe loading refuses" in line and "evil.ckpt" in line
    line = cli_error(capsys, ["generate", "--ckpt", str(ckpt), "--prompt-ids", "1 2"])
    assert "safe loading refuses" in line


@pytest.mark.slow  # a fresh Python importing torch + Lightning: ~20 s on 2 shared cores
def test_unsafe_checkpoint_refused_by_the_real_command_even_when_torch_is_told_to_unpickle(tmp_path):
    ckpt = unsafe_checkpoint(tmp_path / "evil.ckpt")
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "prosg", "validate", *TINY, f"--trainer.default_root_dir={tmp_path}",
                           "--ckpt_path", str(ckpt)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert PAYLOAD not in proc.stdout + proc.stderr
    assert "safe loading refuses" in one_error_line(proc.stderr)


def test_missing_truncated_and_directory_checkpoints_are_one_line(tmp_path, capsys):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {}}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    args = [*TINY, f"--trainer.default_root_dir={tmp_path}", "--ckpt_path"]
    assert "does not exist" in cli_error(capsys, ["validate", *args, str(tmp_path / "missing.ckpt")])
    line = cli_error(capsys, ["validate", *args, str(truncated)])
    assert "could not load" in line and "truncated" in line
    assert "is a directory" in cli_error(capsys, ["test", *args, str(tmp_path)])


def test_checkpoint_data_reader_names_a_truncated_or_foreign_file(tmp_path):
    """``read_checkpoint`` (what recycling and ``generate`` read a checkpoint's data config with) fails in one line."""
    from prosg.checkpoints import read_checkpoint
    from prosg.errors import CheckpointError
    from prosg.generate_cli import checkpoint_datamodule

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {}}, good)
    assert checkpoint_datamodule(read_checkpoint(str(good))) is None  # no saved DataModule: names are optional
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="could not load .*truncated"):
        read_checkpoint(str(truncated))
    foreign = tmp_path / "list.ckpt"
    torch.save([torch.zeros(2)], foreign)
    with pytest.raises(CheckpointError, match="holds a list, not a checkpoint dict"):
        read_checkpoint(str(foreign))


# -- arguments ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_misspelt_key_is_one_line_without_the_usage(command, tmp_path, capsys):
    line = cli_error(capsys, [command, *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_stepz=3"])
    assert "--trainer.max_stepz" in line and f"prosg {command} -h" in line


def test_optimizer_flag_cannot_replace_the_modules_param_groups(tmp_path, capsys):
    line = cli_error(capsys, ["fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--optimizer=Adam"])
    assert "unrecognized arguments: --optimizer=Adam" in line


def test_unwritable_default_root_dir_is_named(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a directory cannot be made under a file (permissions do not stop root)
    line = cli_error(capsys, ["fit", *TINY, f"--trainer.default_root_dir={blocker / 'runs'}"])
    assert "trainer.default_root_dir" in line and "not a writable directory" in line


def test_runs_without_a_logger_sharing_a_root_keep_their_own_config(tmp_path, capsys):
    for seed in (1, 2):
        lightning_main(["fit", *TINY, f"--trainer.default_root_dir={tmp_path}", f"--seed_everything={seed}"])
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed_everything"] == 1
    assert yaml.safe_load((tmp_path / "config-v1.yaml").read_text())["seed_everything"] == 2
    assert "this run's config is" in capsys.readouterr().err


# -- the command and the Python API -------------------------------------------------------------
def test_version(capsys):
    from prosg import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"prosg {__version__}"


API = ["ProSGModule", "SGHead", "build", "from_pretrained", "ConstructedDataModule", "JSONLDataModule",
       "StoredDataModule", "generate", "ProSG", "Plain", "JRT", "SoftPrompt", "GlobalPromptCell", "Oracle", "Method", "lightning_main",
       "fit_and_test"]


def test_python_api_is_lazy_and_complete():
    code = (
        "import sys, prosg\n"
        "assert not {'torch', 'lightning'} & set(sys.modules), 'import prosg loaded torch / lightning'\n"
        f"names = {API!r}\n"
        "assert set(names) <= set(dir(prosg)) and set(names) <= set(prosg.__all__)\n"
        "from prosg import ProSGModule, generate, lightning_main, ProSG, Method\n"
        "import prosg.generate\n"  # the submodule of the same name must not replace the function
        "assert callable(prosg.generate) and prosg.generate is generate and generate.__module__ == 'prosg.generate'\n"
        "assert issubclass(ProSG, Method) and lightning_main.__module__ == 'prosg.train'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_python_api_trains_like_the_command(tmp_path):
    import prosg

    cli = prosg.lightning_main(["fit", *TINY, f"--trainer.default_root_dir={tmp_path}"])
    assert isinstance(cli.model, prosg.ProSGModule) and isinstance(cli.model.method, prosg.Plain)
    assert cli.trainer.global_step == 1
    assert any(k.startswith("lr-") for k in cli.trainer.callback_metrics)  # the learning rate is logged


# -- prosg generate -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gen")
    assert main(["fit", *TINY, f"--trainer.default_root_dir={tmp}"]) == 0
    return next(tmp.rglob("last.ckpt"))


@pytest.mark.parametrize("extra, words", [
    (["--prompt-ids", "1 a 2"], ["--prompt-ids", "'a' is not one"]),
    (["--prompt-ids", "1 2", "--max-new-tokens", "-5"], ["--max-new-tokens -5", ">= 1"]),
    (["--prompt-ids", "1 2", "--temperature", "-1"], ["--temperature -1", ">= 0"]),
    ([], ["exactly one of --prompt"]),
])
def test_generate_bad_arguments_are_one_line(tiny_ckpt, extra, words, capsys):
    line = cli_error(capsys, ["generate", "--ckpt", str(tiny_ckpt), *extra])
    assert all(w in line for w in words), line


def test_generate_on_a_directory_says_it_is_one(tiny_ckpt, capsys):
    line = cli_error(capsys, ["generate", "--ckpt", str(tiny_ckpt.parent), "--prompt-ids", "1 2"])
    assert "is a directory" in line and "does not exist" not in line


def test_zero_width_head_is_blamed_on_its_knob(tmp_path, capsys):
    line = cli_error(capsys, ["fit", *TINY, f"--trainer.default_root_dir={tmp_path}",
                              "--model.method", str(CONF / "method/sg.yaml"), "--model.method.init_args.d_hidden=0"])
    assert "d_hidden" in line and "lr" not in line.split("d_hidden")[0]
