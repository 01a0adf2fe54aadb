"""`kubectl kustomize`, for the subset deploy/k8s uses, in Python: CI has no kubectl.

A kustomization may hold `resources` (files of YAML documents, or directories with a
kustomization of their own), `images` (newName, newTag, digest) and `patches` (strategic
merge patches by `path`, each document naming the object it patches). Anything else is
refused rather than ignored, so an overlay cannot use a feature this renderer would skip;
extend it, and compare with `kubectl kustomize` (test_kustomize_overlays.py does where
kubectl is installed).

Strategic merge, as kustomize applies it: maps merge key by key, `null` deletes a key, and a
list of a built-in kind merges item by item on its merge key (containers by name, ports by
containerPort, ...) where the Kubernetes schema gives it one; every other list, and every
list of a custom resource, is replaced whole.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]

KNOWN_FIELDS = {"apiVersion", "kind", "resources", "images", "patches"}
# Kinds whose schema kustomize knows (its built-in OpenAPI document): their lists merge on
# the keys below. Custom resources (KEDA, CNPG, NACK, ...) are merged as JSON: lists replace.
BUILT_IN_GROUPS = {"", "apps", "autoscaling", "policy", "networking.k8s.io", "batch"}
# The lists of those kinds' schemas that merge item by item, and the key they merge on.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "volumes": "name",
    "imagePullSecrets": "name",
}


def build(directory: Path) -> list[Doc]:
    """The objects `kubectl kustomize <directory>` prints, in the order of `resources` (kubectl
    sorts them by kind)."""
    kustomization = _read_kustomization(directory)
    unknown = set(kustomization) - KNOWN_FIELDS
    if unknown:
        raise NotImplementedError(f"{directory}: the renderer does not know {sorted(unknown)}")
    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        docs.extend(build(path) if path.is_dir() else _load(path))
    ids = [_id(doc) for doc in docs]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise ValueError(f"{directory}: objects declared twice: {sorted(duplicates)}")
    for entry in kustomization.get("patches", []):
        if set(entry) != {"path"}:
            raise NotImplementedError(f"{directory}: only `patches: - path:` is supported, not {entry}")
        for patch in _load((directory / entry["path"]).resolve()):
            matches = [i for i, doc in enumerate(docs) if _id(doc) == _id(patch)]
            if len(matches) != 1:
                raise ValueError(f"{directory}: patch {entry['path']} matches no object {_id(patch)}")
            (i,) = matches
            docs[i] = _merge(docs[i], patch, docs[i]["kind"] if _is_built_in(docs[i]) else None)
    for image in kustomization.get("images", []):
        for doc in docs:
            _set_image(doc, image)
    return docs


def _read_kustomization(directory: Path) -> Doc:
    names = ("kustomization.yaml", "kustomization.yml", "Kustomization")
    (path,) = [directory / name for name in names if (directory / name).is_file()]
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _id(doc: Doc) -> tuple[str, str, str, str]:
    meta = doc["metadata"]
    return (doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"])


def _is_built_in(doc: Doc) -> bool:
    api_version: str = doc["apiVersion"]
    group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
    return group in BUILT_IN_GROUPS


def _merge(base: Any, patch: Any, kind: str | None, field: str = "") -> Any:
    """`patch` over `base`; `kind` is None for a custom resource (JSON merge: lists replace)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if any(str(key).startswith("$") for key in patch):
            raise NotImplementedError(f"patch directives are not supported: {sorted(patch)}")
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], value, kind, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and kind is not None:
        key = _merge_key(kind, field, base + patch)
        if key is not None:
            return _merge_list(base, patch, key, kind)
    return copy.deepcopy(patch)


def _merge_key(kind: str, field: str, items: list[Any]) -> str | None:
    if not all(isinstance(item, dict) for item in items):
        return None
    if field == "ports":
        # A container's ports merge on containerPort, a Service's on port; others are atomic.
        if all("containerPort" in item for item in items):
            return "containerPort"
        return "port" if kind == "Service" else None
    return MERGE_KEYS.get(field)


def _merge_list(base: list[Doc], patch: list[Doc], key: str, kind: str) -> list[Doc]:
    """kustomize's order: the patch's items first (merged into the base's of the same key),
    then the base's items the patch does not name."""
    named = {item.get(key) for item in patch}
    out = []
    for item in patch:
        existing = next((b for b in base if b.get(key) == item.get(key)), None)
        out.append(copy.deepcopy(item) if existing is None else _merge(existing, item, kind))
    return out + [copy.deepcopy(b) for b in base if b.get(key) not in named]


def _split_image(image: str) -> tuple[str, str, str]:
    """name, tag, digest of an image reference (a registry port is no tag)."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def _set_image(node: Any, image: Doc) -> None:
    """kustomize's images transformer: every container of every object whose image is `name`."""
    unknown = set(image) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise NotImplementedError(f"images: {sorted(unknown)}")
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
        return
    if not isinstance(node, dict):
        return
    for field, value in node.items():
        if field in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                name, tag, digest = _split_image(container.get("image", ""))
                if name != image["name"]:
                    continue
                name = image.get("newName", name)
                if "digest" in image:
                    container["image"] = f"{name}@{image['digest']}"
                elif "newTag" in image:
                    container["image"] = f"{name}:{image['newTag']}"
                else:
                    container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
        else:
            _set_image(value, image)
