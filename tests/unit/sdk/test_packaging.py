"""cex-sdk's wheel: what an integrator's `pip install` gets, and nothing more.

The wheel is built from a copy of sdk/python and gen/python alone. It holds the
SDK and the generated code of every v1 contract (typed: py.typed and .pyi), it
depends on grpcio, protobuf and googleapis-common-protos only, and its version's
major is the contracts' version. Installing it into a fresh virtualenv and
running the examples from there against the stack: tests/e2e/test_sdk_examples.py.
"""

from __future__ import annotations

import email
import zipfile
from pathlib import Path

import pytest

import cex_sdk
from tests.sdk_dist import ROOT, SDK_REQUIREMENTS, build_wheel

GEN = ROOT / "gen" / "python"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("sdk-wheel"))


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(z.read(name))


def test_the_wheel_depends_on_what_a_client_needs_and_nothing_else(wheel: Path) -> None:
    metadata = _metadata(wheel)
    assert metadata["Name"] == "cex-sdk"
    assert sorted(metadata.get_all("Requires-Dist") or []) == sorted(SDK_REQUIREMENTS.values())


def test_the_version_is_the_sdk_s_and_its_major_is_the_contracts_version(wheel: Path) -> None:
    version = _metadata(wheel)["Version"]
    assert version == cex_sdk.__version__
    assert f"v{version.split('.')[0]}" == cex_sdk.CONTRACTS_VERSION == "v1"
    assert wheel.name == f"cex_sdk-{version}-py3-none-any.whl"


def test_the_wheel_carries_the_sdk_and_every_generated_v1_module_typed(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names} == {"cex", "cex_sdk", "cex_sdk-1.0.0.dist-info"}
    sdk = {p.relative_to(ROOT / "sdk/python").as_posix() for p in ROOT.glob("sdk/python/cex_sdk/*")}
    sdk = {n for n in sdk if n.endswith((".py", "py.typed"))}
    assert "cex_sdk/py.typed" in sdk and sdk <= names
    generated = {
        p.relative_to(GEN).as_posix()
        for p in GEN.rglob("*")
        if p.is_file() and p.suffix in (".py", ".pyi", ".typed")
    }
    # all eight packages of the contracts, with stubs: auth ... type
    packages = {n.split("/")[1] for n in generated if n.count("/") == 3}
    assert packages == {"auth", "funding", "ledger", "marketdata", "match", "order", "risk", "type"}
    assert {"cex/py.typed", "cex/order/v1/order_pb2.pyi", "cex/order/v1/order_pb2_grpc.pyi"} <= (
        generated
    )
    assert generated <= names, sorted(generated - names)
