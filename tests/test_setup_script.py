"""scripts/setup.sh skips its installs when nothing they install has changed.

The script runs for real (bash) in a copy of the checkout, with stand-ins on PATH for the
commands that would change this machine: `python3` (logs each pip install; answers the
editable-install check as told, or hands it to the real interpreter), `dpkg-query` (the fonts
are installed) and `optical-memory`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
case "$1" in
  -VV) echo "Python 3 (stand-in)";;
  -c) exit 0;;  # the torch version check: the pinned build is there
  -m) echo "$*" >> "$SETUP_LOG"; [ "${FAKE_PIP_FAIL:-0}" = 1 ] && exit 1; exit 0;;
  -)
    if [ -n "${FAKE_INSTALLED:-}" ]; then cat >/dev/null; [ "$FAKE_INSTALLED" = 1 ]; exit; fi
    exec "$REAL_PYTHON" "$@";;  # the real check of which checkout is installed
  *) exit 2;;
esac
"""


@pytest.fixture
def checkout(tmp_path):
    if shutil.which("bash") is None or shutil.which("sha256sum") is None:
        pytest.skip("needs bash and sha256sum")
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [
        ("python3", FAKE_PYTHON),
        ("dpkg-query", "#!/bin/sh\necho 'install ok installed'\n"),
        ("optical-memory", "#!/bin/sh\nexit 0\n"),
    ]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    log.touch()

    def run(*extras: str, **env: str) -> tuple[subprocess.CompletedProcess, int]:
        """Run the script; returns its result and how many pip installs it ran."""
        before = len(log.read_text().splitlines())
        done = subprocess.run(
            ["bash", str(repo / "scripts" / "setup.sh"), *extras], capture_output=True,
            text=True, timeout=60, check=False,
            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path),
                 "SETUP_LOG": str(log), "REAL_PYTHON": sys.executable,
                 "FAKE_INSTALLED": "1", **env},
        )
        return done, len(log.read_text().splitlines()) - before

    return repo, run, log


def test_second_run_installs_nothing(checkout):
    repo, run, log = checkout
    done, pips = run()
    assert done.returncode == 0, done.stderr
    assert pips == 1 and "install -q -e .[deepseek-ocr,redis]" in log.read_text()
    stamp = repo / "build" / "setup-deepseek-ocr-redis.stamp"
    assert stamp.is_file()

    done, pips = run()
    assert done.returncode == 0 and pips == 0
    assert done.stdout.startswith("set-up: up to date")


def test_what_makes_it_install_again(checkout):
    repo, run, _ = checkout
    assert run()[1] == 1
    # other extras: a stamp of their own (demo and test do not undo each other's)
    assert run("deepseek-ocr,test,redis")[1] == 1
    assert run("deepseek-ocr,test,redis")[1] == 0
    assert run()[1] == 0
    # a changed pyproject.toml
    with (repo / "pyproject.toml").open("a") as f:
        f.write("\n# changed\n")
    assert run()[1] == 1
    assert run()[1] == 0
    # asked to
    assert run(SETUP_FORCE="1")[1] == 1
    # this checkout is no longer the installed one
    assert run(FAKE_INSTALLED="0")[1] == 1
    assert run()[1] == 0


def test_a_failed_install_leaves_no_stamp(checkout):
    repo, run, _ = checkout
    done, pips = run(FAKE_PIP_FAIL="1")
    assert done.returncode != 0 and pips == 1
    assert not (repo / "build").exists()
    assert run()[1] == 1 and run()[1] == 0


def test_a_stamp_counts_only_for_the_installed_checkout(checkout):
    """The real check: the editable install on this machine is not of the copy, so the copy's
    stamp never skips the install."""
    _, run, _ = checkout
    assert run(FAKE_INSTALLED="")[1] == 1
    assert run(FAKE_INSTALLED="")[1] == 1
