"""docs/quickstart.md cannot rot: its shell blocks run as written against the stack,
and what each prints is checked against the output the page shows.

The page's first block is `make run`: the test's stack stands in for it. The
page says `export CEX=127.0.0.1:50050`; that one line gets the test stack's
edge instead, and CEX_STATE_DIR (which every `cex` command honours) points at
the test stack's state directory. Everything else runs verbatim, in order, in
one bash, as a reader pasting the blocks into one shell would.

Expected output: each line the page shows (after a block, in a ```text block)
must appear in the block's output (stdout and stderr, as a terminal shows
them), in order, with whitespace runs compared as one space; `...` inside a
line matches anything, and a line that is only `...` stands for lines omitted.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cex_stack.supervisor import Stack

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "docs" / "quickstart.md"
EDGE_LINE = "export CEX=127.0.0.1:50050"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@dataclass
class Block:
    commands: str
    expected: list[str]
    line: int  # where it starts in the page, for failure messages


def blocks(text: str) -> list[Block]:
    """Each ```sh block with the ```text block that follows it (before the next sh)."""
    found: list[Block] = []
    for match in _FENCE.finditer(text):
        kind, body = match.group(1), match.group(2)
        line = text.count("\n", 0, match.start()) + 1
        if kind == "sh":
            found.append(Block(body, [], line))
        elif kind == "text" and found and not found[-1].expected:
            found[-1].expected = body.splitlines()
    return found


def _normal(line: str) -> str:
    return " ".join(line.split())


def unmatched(expected: list[str], output: str) -> str | None:
    """The first expected line not found (in order) in `output`, or None."""
    lines = [_normal(line) for line in output.splitlines()]
    at = 0
    for want in expected:
        want = _normal(want)
        if not want or want == "...":
            continue
        pattern = re.compile(".*".join(re.escape(part) for part in want.split("...")))
        while at < len(lines) and not pattern.fullmatch(lines[at]):
            at += 1
        if at == len(lines):
            return want
        at += 1
    return None


def test_the_matcher_can_fail() -> None:
    assert unmatched(["a ... c", "...", "d"], "x\na b c\ny\nd\n") is None
    assert unmatched(["d", "a ... c"], "a b c\nd\n") == "a ... c"  # order counts
    assert unmatched(["available: 0"], "available: 10") == "available: 0"  # whole lines


def test_the_page_is_linked_first_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    first_link = re.search(r"\]\(([^)]+)\)", readme)
    assert first_link is not None and first_link.group(1) == "docs/quickstart.md"


async def test_the_quickstart_runs_as_written(stack: Stack) -> None:
    page = blocks(QUICKSTART.read_text())
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
    env.update(CEX_STATE_DIR=str(stack.state_dir), PATH=f"{Path(sys.executable).parent}:"
               + env.get("PATH", ""))  # fmt: skip
    began = time.monotonic()
    result = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", "\n".join(script)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        check=False,
    )
    took = time.monotonic() - began
    outputs = re.split(r"^<<<block (\d+)>>>$\n?", result.stdout, flags=re.MULTILINE)
    by_block = {int(outputs[i]): outputs[i + 1] for i in range(1, len(outputs) - 1, 2)}
    for index, block in enumerate(page[1:], 1):
        output = by_block.get(index)
        if output is None:
            pytest.fail(
                f"block at docs/quickstart.md:{block.line} never ran "
                f"(bash exited {result.returncode}):\n{result.stdout[-3000:]}"
            )
        missing = unmatched(block.expected, output)
        assert missing is None, (
            f"docs/quickstart.md:{block.line}: expected {missing!r} in the output:\n{output}"
        )
    assert result.returncode == 0, result.stdout[-3000:]
    print(f"the quickstart's {len(page) - 1} blocks ran in {took:.1f}s")
