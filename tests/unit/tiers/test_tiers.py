"""`make test-unit` needs only the virtualenv: no Go, no helm, no node.

What make would run for it (`make -n`, nothing executed) is checked for any
tool of those tiers, and the chart tests that run helm are deselected by their
marker there while `make test` still selects them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _dry_run(target: str) -> str:
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", target, f"VENV={Path(sys.executable).parents[1]}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PATH": "/usr/bin:/bin"},  # no Go on it
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_test_unit_runs_pytest_alone_and_leaves_helm_tests_out() -> None:
    commands = [line for line in _dry_run("test-unit").splitlines() if line.strip()]
    (pytest_line,) = [c for c in commands if "-m pytest" in c]
    assert pytest_line.endswith("-m pytest -q -m 'not chaos and not helm' tests/unit")
    for tool in ("go ", "helm", "install-tools", "npm", "node_modules", ".tools"):
        assert not [c for c in commands if tool in c and c != pytest_line], (tool, commands)


def test_make_test_still_builds_the_tools_and_selects_every_tier() -> None:
    commands = _dry_run("test")
    assert "install-tools.sh" in commands  # helm for the chart tests
    (pytest_line,) = [c for c in commands.splitlines() if "-m pytest" in c]
    assert pytest_line.endswith("-m pytest -q")  # pyproject's addopts: everything but chaos
