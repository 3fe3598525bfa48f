"""docs/ccxt.md cannot rot: its shell blocks run as written against the test
stack (after `make run`, which the stack stands in for), in one bash, and what
each prints is checked against the page's output blocks, with the quickstart's
matcher (tests/e2e/test_quickstart.py: `...` matches anything)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cex_stack.supervisor import Stack
from tests.e2e.test_quickstart import EDGE_LINE, blocks, unmatched

ROOT = Path(__file__).resolve().parents[3]
PAGE = ROOT / "docs" / "ccxt.md"


def test_the_readme_links_the_page() -> None:
    assert "](docs/ccxt.md)" in (ROOT / "README.md").read_text()


async def test_the_ccxt_page_runs_as_written(stack: Stack) -> None:
    page = blocks(PAGE.read_text())
    assert page[0].commands.strip() == "make run", "the page starts the exchange first"
    assert all(block.expected for block in page), "every step shows what it prints"
    assert sum(EDGE_LINE in block.commands for block in page) == 1
    script = ["set -eo pipefail"]
    for index, block in enumerate(page[1:], 1):
        commands = block.commands.replace(EDGE_LINE, f"export CEX={stack.edge}")
        script += [f"echo '<<<block {index}>>>'", commands]
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CEX", "DATABASE_URL", "NATS_"))
    }
    env.update(
        CEX_STATE_DIR=str(stack.state_dir),
        PATH=f"{Path(sys.executable).parent}:" + env.get("PATH", ""),
    )
    result = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", "\n".join(script)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=180,
        check=False,
    )
    outputs = re.split(r"^<<<block (\d+)>>>$\n?", result.stdout, flags=re.MULTILINE)
    by_block = {int(outputs[i]): outputs[i + 1] for i in range(1, len(outputs) - 1, 2)}
    for index, block in enumerate(page[1:], 1):
        output = by_block.get(index)
        if output is None:
            pytest.fail(f"docs/ccxt.md:{block.line} never ran:\n{result.stdout[-3000:]}")
        missing = unmatched(block.expected, output)
        assert missing is None, f"docs/ccxt.md:{block.line}: expected {missing!r} in:\n{output}"
    assert result.returncode == 0, result.stdout[-3000:]
