"""The Go module and the TypeScript package build on their own, every package of them.

Not only the four packages the examples import: each of the eight v1 packages
(auth, funding, ledger, marketdata, match, order, risk, type) is compiled, in a
copy that holds only what the module or package is made of, so nothing else of
the checkout can fill a gap.

- Go: gen/go (go.mod and go.sum from sdk/go) copied alone; `go build ./...` and
  `go vet ./...` with -mod=readonly, so a dependency missing from go.mod or a
  checksum missing from go.sum fails.
- TypeScript: sdk/ts (package.json, tsconfig.json) and gen/ts copied alone,
  with the project's pinned node_modules; strict `tsc` emits a .js and a .d.ts
  per file, node loads every module, and every bare import is a dependency that
  sdk/ts/package.json declares.

Needs go and `make setup`'s node_modules (make test has both).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ["auth", "funding", "ledger", "marketdata", "match", "order", "risk", "type"]
GO_MODULE = "github.com/cex-core/cex-core/gen/go"


def _run(argv: list[str], cwd: Path, **env: str) -> str:
    done = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_go_module_builds_every_package_on_its_own(tmp_path: Path) -> None:
    go = shutil.which("go")
    assert go, "Go is required (make test and CI have it): https://go.dev/dl/"
    module = tmp_path / "go"
    shutil.copytree(ROOT / "gen/go", module)
    env = {"GOFLAGS": "-mod=readonly", "GOWORK": "off"}
    listed = _run([go, "list", "./..."], module, **env).split()
    assert listed == [f"{GO_MODULE}/cex/{p}/v1" for p in PACKAGES]
    _run([go, "build", "./..."], module, **env)
    _run([go, "vet", "./..."], module, **env)


def test_the_typescript_package_compiles_every_package_on_its_own(tmp_path: Path) -> None:
    node, tsc = shutil.which("node"), ROOT / "node_modules/.bin/tsc"
    assert node and tsc.exists(), "run `make setup` (npm ci installs tsc and @bufbuild/protobuf)"
    shutil.copytree(ROOT / "sdk/ts", tmp_path / "sdk/ts", ignore=shutil.ignore_patterns("dist"))
    shutil.copytree(ROOT / "gen/ts", tmp_path / "gen/ts")
    (tmp_path / "node_modules").symlink_to(ROOT / "node_modules")
    gen = tmp_path / "gen/ts"
    sources = sorted(p.relative_to(gen) for p in gen.rglob("*.ts"))
    assert {s.parts[1] for s in sources if s.parts[0] == "cex"} == set(PACKAGES)

    _run([str(tsc), "-p", "sdk/ts"], tmp_path)

    dist = tmp_path / "sdk/ts/dist"
    for source in sources:
        stem = dist / source.with_suffix("")
        assert stem.with_suffix(".js").is_file() and stem.with_suffix(".d.ts").is_file(), source
    # Every compiled module loads (its imports resolve) and the services are there.
    modules = [str(dist / s.with_suffix(".js")) for s in sources]
    script = (
        f"const ms = {json.dumps(modules)};"
        "const loaded = await Promise.all(ms.map((m) => import(m)));"
        "console.log(JSON.stringify(loaded.flatMap((m) => Object.entries(m))"
        ".filter(([, v]) => v && v.kind === 'service').map(([k]) => k).sort()));"
    )
    services = json.loads(_run([node, "--input-type=module", "-e", script], tmp_path))
    assert services == sorted(
        f"{name}Service"
        for name in ["Auth", "Funding", "Ledger", "MarketData", "Match", "Order", "Risk"]
    )
    # Bare imports of the generated code are what package.json declares.
    manifest = json.loads((ROOT / "sdk/ts/package.json").read_text())
    imported = {
        re.sub(r"^(@[^/]+/[^/]+|[^@/][^/]*).*", r"\1", spec)
        for s in sources
        for spec in re.findall(r'from "([^".][^"]*)"', (tmp_path / "gen/ts" / s).read_text())
    }
    assert imported == set(manifest["dependencies"]) == {"@bufbuild/protobuf"}


@pytest.mark.parametrize("part", ["go", "ts"])
def test_the_sdk_versions_follow_the_contracts(part: str) -> None:
    """The TypeScript package's major and the Python SDK's are the contracts' (v1);
    the Go module's is v0/v1 by its import path (no /v2 suffix)."""
    if part == "ts":
        version = json.loads((ROOT / "sdk/ts/package.json").read_text())["version"]
        assert version.split(".")[0] == "1"
    else:
        declared = re.search(r"^module (\S+)$", (ROOT / "sdk/go/gen-go.mod").read_text(), re.M)
        assert declared and declared.group(1) == GO_MODULE
