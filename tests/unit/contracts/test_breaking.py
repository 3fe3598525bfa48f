"""`make proto-breaking`: the v1 contracts against their baseline (proto/baseline/v1.binpb).

Each check runs the Makefile's own target (mk/proto.mk) in a copy of the
contracts, so what CI calls is what is tested: the tree as it is passes, and a
copy with a field removed, a field renumbered or a method removed fails with
buf's reason. Only buf is needed (the buf-bin wheel in the virtualenv).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
BASELINE = ROOT / "proto/baseline/v1.binpb"
ORDER = Path("proto/cex/order/v1/order.proto")


@pytest.fixture
def contracts(tmp_path: Path) -> Path:
    """A copy of what `make proto-breaking` reads: buf.yaml, proto/ (with the
    baseline), the vendored googleapis and mk/proto.mk."""
    for part in ("proto", "third_party", "mk"):
        shutil.copytree(ROOT / part, tmp_path / part)
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    return tmp_path


def proto_breaking(where: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-f", "mk/proto.mk", "proto-breaking", f"BIN={BIN}"],
        cwd=where, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def edit(where: Path, pattern: str, replacement: str) -> None:
    path = where / ORDER
    text, count = re.subn(pattern, replacement, path.read_text(), count=1, flags=re.M)
    assert count == 1, pattern
    path.write_text(text)


def test_the_baseline_holds_the_v1_contracts_as_landed() -> None:
    image = descriptor_pb2.FileDescriptorSet.FromString(BASELINE.read_bytes())
    ours = {f.name for f in image.file if f.name.startswith("cex/")}
    assert ours == {
        p.relative_to(ROOT / "proto").as_posix() for p in ROOT.glob("proto/cex/**/*.proto")
    }
    assert len(ours) == 8 and all(f.package.endswith(".v1") for f in image.file if f.name in ours)


def test_the_contracts_as_they_are_do_not_break_the_baseline(contracts: Path) -> None:
    done = proto_breaking(contracts)
    assert done.returncode == 0, done.stdout + done.stderr


def test_adding_a_field_does_not_break_the_baseline(contracts: Path) -> None:
    edit(contracts, r"^(message PlaceOrderRequest \{\n)", r"\1  string note = 99;\n")
    done = proto_breaking(contracts)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("pattern", "replacement", "reason"),
    [
        (
            r"^(message PlaceOrderRequest \{\n(?:.*\n)*?)  string client_order_id = 1;\n",
            r"\1",
            'Previously present field "1" with name "client_order_id" on message'
            ' "PlaceOrderRequest" was deleted',
        ),
        (
            r"^(message PlaceOrderRequest \{\n(?:.*\n)*?  string client_order_id = )1;",
            r"\g<1>100;",
            'Previously present field "1" with name "client_order_id" on message'
            ' "PlaceOrderRequest" was deleted',
        ),
        (
            r"^  rpc PlaceOrder\(PlaceOrderRequest\) returns \(PlaceOrderResponse\) \{\n"
            r"(?:.*\n)*?  \}\n",
            "",
            'Previously present RPC "PlaceOrder" on service "OrderService" was deleted',
        ),
    ],
    ids=["field-removed", "field-renumbered", "method-removed"],
)
def test_a_breaking_change_fails(
    contracts: Path, pattern: str, replacement: str, reason: str
) -> None:
    edit(contracts, pattern, replacement)
    done = proto_breaking(contracts)
    assert done.returncode != 0, "buf breaking let a breaking change through"
    assert reason in done.stdout + done.stderr, done.stdout + done.stderr
