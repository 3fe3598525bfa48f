"""Build the JSON schemas kubeconform validates the chart against, offline.

    k8s_schemas.py openapi SWAGGER_JSON OUT_DIR     built-in kinds from Kubernetes' OpenAPI v2
    k8s_schemas.py crds OUT_DIR CRD_YAML...         custom kinds from CRD openAPIV3Schema

Files are named as kubeconform's `{{ .ResourceKind }}{{ .KindSuffix }}.json`
template expects (`deployment-apps-v1.json`, `virtualservice-networking-v1.json`),
and are strict: every object that lists its properties refuses others (as
kubeconform's own strict schemas do), so a misspelt field fails validation.
Built-in schemas stay small by carrying only the definitions they reference.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

# Kinds whose value is "a string or an integer" in Kubernetes' own encoding.
INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
QUANTITY = {"oneOf": [{"type": "string"}, {"type": "number"}]}


def _strict(node: Any) -> Any:
    """Adds additionalProperties: false wherever properties are listed and
    unknown fields are not explicitly preserved; rewrites int-or-string."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    if node.get("format") == "int-or-string" or node.get("x-kubernetes-int-or-string"):
        return dict(INT_OR_STRING)
    out = {k: _strict(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            found.add(ref.removeprefix("#/definitions/"))
        for v in node.values():
            found |= _refs(v)
    elif isinstance(node, list):
        for v in node:
            found |= _refs(v)
    return found


def _file_name(kind: str, group: str, version: str) -> str:
    # kubeconform: "-" + first label of the group (if any) + "-" + version.
    suffix = f"-{group.split('.')[0].lower()}-{version}" if group else f"-{version}"
    return f"{kind.lower()}{suffix.lower()}.json"


def openapi(swagger_path: Path, out: Path) -> int:
    definitions: dict[str, Any] = json.loads(swagger_path.read_text())["definitions"]
    definitions["io.k8s.apimachinery.pkg.util.intstr.IntOrString"] = dict(INT_OR_STRING)
    definitions["io.k8s.apimachinery.pkg.api.resource.Quantity"] = dict(QUANTITY)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, schema in definitions.items():
        gvks = schema.get("x-kubernetes-group-version-kind") or []
        if len(gvks) != 1 or re.search(r"\.(List|WatchEvent)$", name) or name.endswith("List"):
            continue
        gvk = gvks[0]
        needed: dict[str, Any] = {}
        todo = _refs(schema)
        while todo:
            ref = todo.pop()
            if ref in needed:
                continue
            needed[ref] = definitions[ref]
            todo |= _refs(definitions[ref]) - needed.keys()
        doc = dict(schema)
        props = dict(doc.get("properties", {}))
        group = gvk["group"]
        api_version = f"{group}/{gvk['version']}" if group else gvk["version"]
        props["apiVersion"] = {"type": "string", "enum": [api_version]}
        props["kind"] = {"type": "string", "enum": [gvk["kind"]]}
        doc["properties"] = props
        doc["required"] = sorted({*doc.get("required", []), "apiVersion", "kind"})
        doc["definitions"] = needed
        doc["$schema"] = "http://json-schema.org/draft-04/schema#"
        target = out / _file_name(gvk["kind"], group, gvk["version"])
        target.write_text(json.dumps(_strict(doc), sort_keys=True))
        written += 1
    return written


def crds(out: Path, files: list[Path]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in files:
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            kind, group = spec["names"]["kind"], spec["group"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                schema = dict(version["schema"]["openAPIV3Schema"])
                props = dict(schema.get("properties", {}))
                props["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
                props["kind"] = {"type": "string", "enum": [kind]}
                props["metadata"] = {"type": "object"}
                schema["properties"] = props
                schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
                schema["$schema"] = "http://json-schema.org/draft-04/schema#"
                target = out / _file_name(kind, group, version["name"])
                target.write_text(json.dumps(_strict(schema), sort_keys=True))
                written += 1
    return written


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "openapi":
        n = openapi(Path(argv[1]), Path(argv[2]))
        print(f"k8s_schemas: {n} built-in kinds -> {argv[2]}")
        return 0
    if len(argv) >= 3 and argv[0] == "crds":
        n = crds(Path(argv[1]), [Path(p) for p in argv[2:]])
        print(f"k8s_schemas: {n} custom kind versions -> {argv[1]}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
