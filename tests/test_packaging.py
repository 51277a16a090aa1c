"""The built wheel ships the packages' py.typed markers (PEP 561)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_py_typed(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed (needed to build without network)")
    src = tmp_path / "src"  # a copy: the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("optical_memory", "renderers"):
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("optical_memory-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"optical_memory/py.typed", "renderers/py.typed"} <= names
    assert (ROOT / "optical_memory" / "py.typed").is_file()
    assert (ROOT / "renderers" / "py.typed").is_file()
