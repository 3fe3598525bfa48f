"""The `cex` CLI as an operator runs it, against a test's stack."""

from __future__ import annotations

import os
import subprocess
import sys

from cex_stack.supervisor import Stack

__all__ = ["cex"]


def cex(stack: Stack, *args: str, env: dict[str, str] | None = None) -> str:
    """`cex --state-dir <the stack's> <args>`: its output; the test fails if it does."""
    result = subprocess.run(
        [sys.executable, "-m", "cex_stack.cli", "--state-dir", str(stack.state_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
