"""Validate rendered custom resources against their engines' published CRDs, offline.

    python deploy/validate-crds.py [--require-kinds "KIND ..."] CRD_DIR MANIFEST.yaml...

CRD_DIR holds CustomResourceDefinition files (../shared/k8s-crds: KServe, Kubeflow Trainer). Each
document of a manifest whose API group one of those CRDs defines is checked against the
``openAPIV3Schema`` of the served version its apiVersion names, with the kind the CRD declares.
Like ``kubectl apply --validate=strict``, a field the schema does not declare is an error unless
the schema preserves unknown fields; the schemas' CEL rules (x-kubernetes-validations) are the
API server's and are not evaluated here. Documents of other groups are left to
kubernetes-validate, except the kinds named by --require-kinds: a document of one of those
that no CRD in CRD_DIR defines is an error, so a missing CRD file cannot pass for a valid
resource. Exit status: 0 all valid, 1 a document is invalid or unchecked (each error printed
with its path), 2 usage.

Runs with the tools venv (.venv-tools: jsonschema, PyYAML), like the other deploy checks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator

CRD_KIND = "CustomResourceDefinition"


def closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its properties.

    A structural schema prunes undeclared fields silently on the server; strict validation
    (kubectl's default) refuses them, which is what catches a misspelt field.
    """
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: closed(value) for key, value in schema.items()}
    if (
        "properties" in result
        and "additionalProperties" not in result
        and not result.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


def load_schemas(crd_dir: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(group, version, kind) -> the version's openAPIV3Schema, for every served version."""
    schemas: dict[tuple[str, str, str], dict[str, Any]] = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != CRD_KIND:
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if version.get("served", True):
                    key = (spec["group"], version["name"], spec["names"]["kind"])
                    schemas[key] = closed(version["schema"]["openAPIV3Schema"])
    return schemas


def documents(paths: list[Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict):
                yield path, doc


def validate(
    schemas: dict[tuple[str, str, str], dict[str, Any]], doc: dict[str, Any]
) -> list[str] | None:
    """The errors of ``doc`` (empty: valid), or None when no CRD here defines its group."""
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    groups = {key[0] for key in schemas}
    if group not in groups:
        return None
    schema = schemas.get((group, version, doc.get("kind", "")))
    if schema is None:
        known = sorted(f"{g}/{v} {k}" for g, v, k in schemas if g == group)
        return [f"no served CRD version for {doc.get('apiVersion')} {doc.get('kind')} ({known})"]
    validator = Draft7Validator(schema)
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    ]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--require-kinds", default="", help="space-separated kinds that must be checked"
    )
    parser.add_argument("crd_dir", type=Path)
    parser.add_argument("manifests", type=Path, nargs="+")
    args = parser.parse_args(argv)
    schemas = load_schemas(args.crd_dir)
    if not schemas:
        print(f"error: no CustomResourceDefinition in {args.crd_dir}", file=sys.stderr)
        return 2
    required = set(args.require_kinds.split())
    failed = checked = 0
    for path, doc in documents(args.manifests):
        errors = validate(schemas, doc)
        if errors is None and doc.get("kind") in required:
            errors = [f"no CRD in {args.crd_dir} defines {doc.get('apiVersion')}"]
        if errors is None:
            continue
        checked += 1
        name = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')} ({path.name})"
        if errors:
            failed += 1
            print(f"invalid: {name}", file=sys.stderr)
            for error in errors:
                print(f"  {error}", file=sys.stderr)
        else:
            print(f"valid: {name} against {doc['apiVersion']}")
    print(f"{checked} custom resources checked, {failed} invalid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
