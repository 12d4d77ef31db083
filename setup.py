"""Build step: ship migrations/ and config/ inside the package (everything else is in pyproject.toml).

The repository keeps them at the top level; a wheel gets copies under
``gateway/_data/`` so that a non-editable install (``pip install .``, a
release) can migrate a database and start on its default configuration.
``gateway/resources.py`` finds them either way.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SHIPPED = {"migrations": "*.sql", "config": "*.toml"}


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the source tree directly
            return
        for name, pattern in SHIPPED.items():
            files = sorted((HERE / name).glob(pattern))
            if not files:
                raise SystemExit(f"setup.py: no {pattern} in {HERE / name}: refusing to build a release without them")
            target = Path(self.build_lib) / "gateway" / "_data" / name
            target.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, target / f.name)


setup(cmdclass={"build_py": BuildPyWithData})
