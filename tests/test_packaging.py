"""A regular (non-editable) install: the configs ship inside the package and are found from anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from prosg.paths import conf_dir, find_config, with_packaged_configs

ROOT = Path(__file__).resolve().parents[1]


def test_conf_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no conf/ here
    assert (conf_dir() / "sweep/demo.yaml").is_file()
    assert find_config("conf/sweep/smoke.yaml") == conf_dir() / "sweep/smoke.yaml"
    assert find_config("conf/sweep/nope.yaml") == Path("conf/sweep/nope.yaml")  # missing stays missing: its error names it
    assert find_config("other/x.yaml") == Path("other/x.yaml")
    args = ["fit", "--config", "conf/experiment/sg.yaml", "--model.backbone=conf/model/gpt.yaml", "--trainer.max_steps=3"]
    assert with_packaged_configs(args) == [
        "fit", "--config", str(conf_dir() / "experiment/sg.yaml"), f"--model.backbone={conf_dir() / 'model/gpt.yaml'}",
        "--trainer.max_steps=3"]
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf/mine.yaml").write_text("{}")
    assert with_packaged_configs(["conf/mine.yaml"]) == ["conf/mine.yaml"]  # a local file wins


@pytest.mark.slow  # builds a wheel (no network: the installed setuptools), ~10-30 s
def test_wheel_ships_the_configs_and_finds_them_installed(tmp_path):
    src = tmp_path / "src_copy"  # build a copy: an in-tree build would leave build/ in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "runs", "*.egg-info", "__pycache__",
                                                                "notebooks", "tests", "benchmarks", "docs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("prosg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = {str(p.relative_to(ROOT)) for p in (ROOT / "conf").rglob("*") if p.is_file()}
    assert {f"prosg/{c}" for c in conf} <= names  # every file of conf/, as prosg/conf/...
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = ("import prosg.paths as p, prosg.demo as d; from prosg.sweep import load_sweep\n"
            "print(p.conf_dir()); print(load_sweep('conf/sweep/demo.yaml').experiment)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(site / "prosg/conf"), str(site / "prosg/conf/experiment/plain.yaml")]
