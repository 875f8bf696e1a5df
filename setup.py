"""Build hook only (metadata lives in pyproject.toml): ship the repository's conf/ inside the package.

conf/ stays the one source of truth at the top of the repository (``prosg fit --config conf/...`` from
a clone); every build (wheel, ``pip install .``) copies it to ``prosg/conf`` so that a non-editable
install has the configs too. ``prosg.paths.conf_dir`` finds whichever is there.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"


class BuildPyWithConf(build_py):
    def run(self) -> None:
        super().run()
        if CONF.is_dir():  # absent only in a broken sdist; MANIFEST.in grafts it
            target = Path(self.build_lib) / "prosg" / "conf"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(CONF, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithConf})
