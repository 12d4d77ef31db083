"""Where the files that ship with the code are: SQL migrations, the default config and prices.

The repository keeps them at the top level (``migrations/``, ``config/``), the
source of truth.  A built wheel (``pip install .``) carries copies inside the
package, under ``gateway/_data/`` (``setup.py`` copies them at build time), so
that a release installed without its source tree still migrates and starts.
The packaged copy wins when it exists; a source checkout or an editable
install (``pip install -e .``) uses the top-level directories.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_PACKAGED = PACKAGE_DIR / "_data"
_SOURCE_TREE = PACKAGE_DIR.parent


def shipped(name: str) -> Path:
    """The directory ``name`` (``migrations`` or ``config``): the packaged copy, else the source tree's."""
    packaged = _PACKAGED / name
    return packaged if packaged.is_dir() else _SOURCE_TREE / name


MIGRATIONS_DIR = shipped("migrations")
CONFIG_DIR = shipped("config")
