"""The SDK as an integrator gets it: cex-sdk's wheel, built from a copy of only
what its build reads (sdk/python and gen/python), and a virtualenv that has that
wheel and its dependencies from the package index, nothing else.

Shared by tests/unit/sdk/test_packaging.py (the wheel) and
tests/e2e/test_sdk_examples.py (the examples run from the virtualenv).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What `pip install <the wheel>` may bring: the SDK and what it depends on.
SDK_REQUIREMENTS = {
    "grpcio": "grpcio<1.86,>=1.85.1",
    "protobuf": "protobuf<8,>=7.36",
    "googleapis-common-protos": "googleapis-common-protos<2,>=1.76",
}


def _run(argv: list[str], *, cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def build_wheel(into: Path) -> Path:
    """cex-sdk's wheel, built from a copy of sdk/python and gen/python alone (so
    nothing else of the checkout, and no stale build/ directory, can leak in)."""
    src = into / "src"
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "*.pyc")
    shutil.copytree(ROOT / "sdk/python", src / "sdk/python", ignore=ignore)
    shutil.copytree(ROOT / "gen/python", src / "gen/python", ignore=ignore)
    dist = into / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "-w", str(dist), str(src / "sdk/python")],
        cwd=into,
    )  # fmt: skip
    (wheel,) = dist.glob("cex_sdk-*.whl")
    return wheel


def fresh_venv_with(wheel: Path, into: Path) -> Path:
    """A new virtualenv (no system site-packages) with the wheel installed by pip,
    its dependencies resolved from the index; returns its python."""
    venv.EnvBuilder(with_pip=True, clear=True).create(into)
    python = into / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], cwd=into)
    _run([str(python), "-m", "pip", "check"], cwd=into)
    return python


def installed(python: Path) -> set[str]:
    """The distributions in a virtualenv, by normalised name."""
    out = _run([str(python), "-m", "pip", "list", "--format=freeze"], cwd=python.parent)
    return {line.split("==")[0].lower().replace("_", "-") for line in out.splitlines() if line}
