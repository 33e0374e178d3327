#!/usr/bin/env python3
"""Render a kustomization without a cluster or kubectl and validate every object offline.

Usage: validate_manifests.py KUSTOMIZATION_DIR

Renders the subset of kustomize this project uses (resources: files and directories,
namespace, images, replacements with plain dotted field paths, local-config resources dropped)
and refuses any other kustomization field, so nothing is silently ignored. Every built-in kind
is validated against the Kubernetes OpenAPI schemas shipped by the PyPI package
`kubernetes-validate` (strict: unknown fields are errors) for each version in K8S_VERSIONS;
the prometheus-operator kinds against the small strict schemas below. Prints the rendered
objects as a JSON list on stdout; exits 1 with one line per problem on stderr.
"""

import copy
import json
import os
import sys

import jsonschema
import kubernetes_validate
import yaml

# Oldest and newest Kubernetes minor the manifests are checked against.
K8S_VERSIONS = ["1.29.0", "1.37.0"]

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "replacements"}
LOCAL_CONFIG = "config.kubernetes.io/local-config"

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
    pass


def render(directory):
    path = os.path.join(directory, "kustomization.yaml")
    try:
        with open(path) as f:
            kustomization = yaml.safe_load(f)
    except OSError as e:
        raise RenderError(f"{path}: {e}") from e
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise RenderError(f"{path}: unsupported kustomize fields {sorted(unknown)}")
    objects = []
    for resource in kustomization.get("resources", []):
        full = os.path.normpath(os.path.join(directory, resource))
        if os.path.isdir(full):
            objects.extend(render(full))
        else:
            objects.extend(load_file(full))
    if "namespace" in kustomization:
        for obj in objects:
            obj.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        apply_image(objects, image)
    for replacement in kustomization.get("replacements", []):
        apply_replacement(objects, replacement, path)
    return objects


# The top kustomization dir, for short source names in messages.
_TOP = []


def load_file(path):
    try:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        raise RenderError(f"{path}: {e}") from e
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise RenderError(f"{path}: a document without apiVersion/kind")
        doc["__source"] = os.path.relpath(path, _TOP[0])
    return docs


def is_local_config(obj):
    annotations = obj.get("metadata", {}).get("annotations") or {}
    return annotations.get(LOCAL_CONFIG) == "true"


def containers_of(obj):
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("containers", []) + pod.get("initContainers", [])


def apply_image(objects, image):
    for obj in objects:
        for c in containers_of(obj):
            name = c.get("image", "").split(":")[0]
            if name == image["name"]:
                c["image"] = f'{image.get("newName", name)}:{image["newTag"]}'


def get_path(obj, field_path, where):
    node = obj
    for part in field_path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise RenderError(f"{where}: field {field_path} not found in {obj['kind']}/{obj['metadata']['name']}")
        node = node[part]
    return node


def set_path(obj, field_path, value, where):
    parts = field_path.split(".")
    parent = get_path(obj, ".".join(parts[:-1]), where) if len(parts) > 1 else obj
    if parts[-1] not in parent:
        raise RenderError(f"{where}: target field {field_path} does not exist")
    parent[parts[-1]] = value


def selects(obj, sel):
    meta = obj.get("metadata", {})
    return all([
        sel.get("kind") in (None, obj["kind"]),
        sel.get("name") in (None, meta.get("name")),
        sel.get("namespace") in (None, meta.get("namespace")),
    ])


def apply_replacement(objects, replacement, where):
    source = replacement["source"]
    sources = [o for o in objects if selects(o, source)]
    if len(sources) != 1:
        raise RenderError(f"{where}: replacement source {source} matches {len(sources)} objects")
    value = get_path(sources[0], source["fieldPath"], where)
    for target in replacement["targets"]:
        matched = [o for o in objects if selects(o, target["select"])]
        if not matched:
            raise RenderError(f"{where}: replacement target {target['select']} matches nothing")
        for obj in matched:
            for field_path in target["fieldPaths"]:
                set_path(obj, field_path, copy.deepcopy(value), where)


def validate(obj):
    """Returns a list of problems with one object."""
    problems = []
    name = f'{obj["__source"]}: {obj["kind"]}/{obj.get("metadata", {}).get("name")}'
    clean = {k: v for k, v in obj.items() if k != "__source"}
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
    _TOP.append(os.path.normpath(sys.argv[1]))
    try:
        # Local-config inputs (the kube-dns Service stub) feed replacements, never the output.
        objects = [o for o in render(_TOP[0]) if not is_local_config(o)]
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
