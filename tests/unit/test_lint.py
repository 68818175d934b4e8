"""flake8 and mypy (python_version 3.9, per setup.cfg) run as tests."""
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("tool, args", [
    ("flake8", ["pbs_chroot", "tests", "benchmarks", "prologue/prologue", "epilogue/epilogue"]),
    ("mypy", []),
])
def test_lint(tool: str, args: list) -> None:
    pytest.importorskip(tool)
    res = subprocess.run([sys.executable, "-m", tool, *args], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
