#!/usr/bin/env python3
"""Render a kustomization with `kubectl kustomize` and validate every object offline.

Usage: validate_manifests.py KUSTOMIZATION_DIR

Renders with the real kustomize (`kubectl kustomize`, no cluster needed; KUBECTL overrides
the binary). Every built-in kind is validated against the Kubernetes OpenAPI schemas shipped by
the PyPI package `kubernetes-validate` (strict: unknown fields are errors) for each version in
K8S_VERSIONS; the prometheus-operator kinds against the small strict schemas below. Prints the
rendered objects as a JSON list on stdout; exits 1 with one line per problem on stderr.
"""

import json
import os
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

# Oldest and newest Kubernetes minor the manifests are checked against.
K8S_VERSIONS = ["1.29.0", "1.37.0"]

_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep",
                            "hashmod", "lowercase", "uppercase", "keepequal", "dropequal",
                            "Replace", "Keep", "Drop", "LabelMap", "LabelDrop", "LabelKeep",
                            "HashMod", "Lowercase", "Uppercase", "KeepEqual", "DropEqual"]},
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
}
# The fields of monitoring.coreos.com/v1 this project uses, from the operator's CRDs.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "additionalProperties": False,
                "properties": {
                    "jobLabel": {"type": "string"},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "portNumber": {"type": "integer"},
                                "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                                "scrapeTimeout": {"type": "string"},
                                "honorLabels": {"type": "boolean"},
                                "relabelings": {"type": "array", "items": _RELABEL},
                                "metricRelabelings": {"type": "array", "items": _RELABEL},
                            },
                        },
                    },
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": "string", "minLength": 1},
                                            "for": {"type": "string"},
                                            "keep_firing_for": {"type": "string"},
                                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


class RenderError(Exception):
    """The kustomization cannot be rendered."""


def render(directory):
    """The objects `kubectl kustomize DIRECTORY` renders; raises RenderError."""
    kubectl = os.environ.get("KUBECTL", "kubectl")
    try:
        out = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True)
    except OSError as e:
        raise RenderError(f"cannot run {kubectl} (KUBECTL): {e}") from e
    if out.returncode != 0:
        raise RenderError(f"{kubectl} kustomize {directory}: {out.stderr.strip()}")
    try:
        docs = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    except yaml.YAMLError as e:
        raise RenderError(f"{kubectl} kustomize {directory}: {e}") from e
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise RenderError(f"{directory}: a rendered document without apiVersion/kind")
    return docs


def validate(obj):
    """Returns a list of problems with one object."""
    problems = []
    name = f'{obj["kind"]}/{obj.get("metadata", {}).get("name")}'
    clean = obj
    crd_schema = CRD_SCHEMAS.get((clean["apiVersion"], clean["kind"]))
    if crd_schema is not None:
        for error in jsonschema.Draft7Validator(crd_schema).iter_errors(clean):
            problems.append(f"{name}: {'.'.join(map(str, error.absolute_path))}: {error.message}")
        return problems
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(clean, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(map(str, e.path))
            problems.append(f"{name} (Kubernetes {version}): {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{name}: no schema ({e}); add one to CRD_SCHEMAS")
    return problems


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        objects = render(sys.argv[1])
    except RenderError as e:
        print(f"render: {e}", file=sys.stderr)
        return 1
    if not objects:
        print("render: no objects", file=sys.stderr)
        return 1
    problems = [p for obj in objects for p in validate(obj)]
    for p in problems:
        print(p, file=sys.stderr)
    json.dump(objects, sys.stdout)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
