"""The suite's own machinery: a @shared fixture is built once per session however many xdist workers need it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFTEST = """
import importlib.util, sys, time

sys.path.insert(0, {tests!r})
spec = importlib.util.spec_from_file_location("suite_conftest", {tests!r} + "/conftest.py")
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)  # the suite's conftest under another name: this file is `conftest` here
shared = suite.shared


@shared("session")
def built(tmp_path_factory):
    with open({log!r}, "a") as f:
        f.write("built\\n")
    time.sleep(1)  # both workers ask for it at once
    return tmp_path_factory.mktemp("run")
"""
TESTS = """
import os, pytest


@pytest.mark.parametrize("i", range(4))
def test_uses(built, i):
    assert built.is_dir()
    with open({log!r}, "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
"""


def test_shared_fixtures_are_built_once_across_xdist_workers(tmp_path):
    log = tmp_path / "log.txt"
    (tmp_path / "conftest.py").write_text(CONFTEST.format(tests=str(Path(__file__).parent), log=str(log)))
    (tmp_path / "test_uses.py").write_text(TESTS.format(log=str(log)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", "-o", "addopts=", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = log.read_text().split()
    assert lines.count("built") == 1 and len(set(lines) - {"built"}) == 2, lines  # once, though both workers used it
