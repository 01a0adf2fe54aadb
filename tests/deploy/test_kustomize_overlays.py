"""Each overlay of deploy/k8s renders, every object in it is valid, and its images are pinned.

Rendering is tests/deploy/kustomize_build.py's (CI has no kubectl); where kubectl is
installed, its `kubectl kustomize` must print the same objects. Built-in kinds are checked
against the Kubernetes OpenAPI schemas that kubernetes-validate ships (strict: an unknown or
misspelt field fails); the operators' custom resources have no schema there, and get a
minimal check of their kind and shape.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.kustomize_build import build

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = {p.name: p for p in sorted((K8S / "overlays").iterdir()) if (p / "kustomization.yaml").is_file()}
RENDERED = {name: build(path) for name, path in OVERLAYS.items()}
# The oldest Kubernetes the manifests are meant for (PodDisruptionBudget's
# unhealthyPodEvictionPolicy is GA from 1.31).
KUBERNETES_VERSION = "1.31"
BUILT_IN_GROUPS = {"", "apps", "autoscaling", "policy", "networking.k8s.io", "rbac.authorization.k8s.io", "batch"}
# The custom resources, by the operator that defines them (deploy/k8s/README.md lists the installs).
CUSTOM_KINDS = {
    "keda.sh/v1alpha1": {"ScaledObject"},
    "postgresql.cnpg.io/v1": {"Cluster"},
    "jetstream.nats.io/v1beta2": {"Stream", "KeyValue"},
    "gateway.networking.k8s.io/v1": {"GatewayClass", "Gateway", "HTTPRoute"},
    "gateway.envoyproxy.io/v1alpha1": {"EnvoyProxy", "BackendTrafficPolicy", "SecurityPolicy", "EnvoyExtensionPolicy"},
    "monitoring.coreos.com/v1": {"PodMonitor", "PrometheusRule"},
}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

Doc = dict[str, Any]


def _key(doc: Doc) -> tuple[str, str, str, str]:
    return (doc["apiVersion"], doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])


def _group(doc: Doc) -> str:
    return doc["apiVersion"].rpartition("/")[0]


def test_there_is_a_dev_and_a_prod_overlay_over_the_same_objects() -> None:
    assert {"dev", "prod"} <= set(RENDERED)
    base = sorted(_key(doc) for doc in build(K8S / "base"))
    for name, docs in RENDERED.items():
        # Overlays patch; they add or drop nothing, so prod's checks speak for every object.
        assert sorted(_key(doc) for doc in docs) == base, name


def test_the_network_policies_are_the_same_in_every_overlay() -> None:
    """test_network_policies.py evaluates production's; no overlay may loosen them."""
    policies = {name: [d for d in docs if d["kind"] == "NetworkPolicy"] for name, docs in RENDERED.items()}
    assert all(p == policies["prod"] for p in policies.values())


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (CI renders with Python only)")
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_renderer_matches_kubectl_kustomize(overlay: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAYS[overlay])], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    theirs = {_key(doc): doc for doc in yaml.safe_load_all(out) if doc}
    ours = {_key(doc): doc for doc in RENDERED[overlay]}
    assert set(ours) == set(theirs)
    for key, doc in ours.items():
        assert doc == theirs[key], key


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_object_is_valid(overlay: str) -> None:
    invalid = []
    for doc in RENDERED[overlay]:
        where = f"{overlay}: {doc['kind']} {doc['metadata'].get('name')}"
        assert DNS_SUBDOMAIN.match(doc["metadata"]["name"]), where
        if _group(doc) in BUILT_IN_GROUPS:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                invalid.append(f"{where}: {'.'.join(str(part) for part in e.path)}: {e.message}")
        else:
            assert doc["kind"] in CUSTOM_KINDS.get(doc["apiVersion"], set()), f"{where}: unknown {doc['apiVersion']}"
            assert isinstance(doc.get("spec"), dict) and doc["spec"], f"{where}: no spec"
            assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, where
    assert not invalid, "\n".join(invalid)


def _images(node: Any) -> list[str]:
    """Every container image, and CloudNativePG's `imageName`, anywhere in an object."""
    found: list[str] = []
    if isinstance(node, dict):
        for field, value in node.items():
            if field in ("containers", "initContainers") and isinstance(value, list):
                found += [c["image"] for c in value]
            elif field == "imageName" and isinstance(value, str):
                found.append(value)
            else:
                found += _images(value)
    elif isinstance(node, list):
        for item in node:
            found += _images(item)
    return found


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_images_are_pinned_to_a_version(overlay: str) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    images = [image for doc in RENDERED[overlay] for image in _images(doc)]
    ours = [image for image in images if image.rpartition("/")[2].startswith("pregonero")]
    assert len(ours) == 4, images
    for image in images:
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and "/" not in tag, f"{overlay}: {image} names no tag"
        assert tag != "latest", f"{overlay}: {image}"
    for image in ours:
        # The image built from this tree: `docker build -t pregonero:<pyproject version> .`
        assert image.rpartition(":")[2] == version, f"{overlay}: {image} is not this tree's version {version}"


def test_the_renderer_merges_as_kustomize_does(tmp_path: Path) -> None:
    """The strategic merge rules the overlays rely on, for a CI without kubectl."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "app.yaml").write_text(
        yaml.safe_dump_all(
            [
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": "app", "namespace": "ns"},
                    "spec": {
                        "template": {
                            "spec": {
                                "containers": [
                                    {
                                        "name": "a",
                                        "image": "app:1",
                                        "env": [{"name": "X", "value": "1"}],
                                        "args": ["1"],
                                    },
                                    {"name": "b", "image": "other:2"},
                                ]
                            }
                        }
                    },
                },
                {
                    "apiVersion": "keda.sh/v1alpha1",
                    "kind": "ScaledObject",
                    "metadata": {"name": "app", "namespace": "ns"},
                    "spec": {"minReplicaCount": 1, "triggers": [{"type": "cpu"}, {"type": "nats-jetstream"}]},
                },
            ]
        )
    )
    (tmp_path / "base" / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["app.yaml"]}))
    (tmp_path / "patch.yaml").write_text(
        yaml.safe_dump_all(
            [
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": "app", "namespace": "ns"},
                    "spec": {
                        "template": {
                            "spec": {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}], "args": ["2"]}]}
                        }
                    },
                },
                {
                    "apiVersion": "keda.sh/v1alpha1",
                    "kind": "ScaledObject",
                    "metadata": {"name": "app", "namespace": "ns"},
                    "spec": {"minReplicaCount": None, "triggers": [{"type": "cpu"}]},
                },
            ]
        )
    )
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["base"],
                "patches": [{"path": "patch.yaml"}],
                "images": [{"name": "app", "newName": "registry.example/app", "newTag": "1.2.3"}],
            }
        )
    )
    deployment, scaled = build(tmp_path)
    a, b = deployment["spec"]["template"]["spec"]["containers"]
    # Containers and env merge by name, the patch's items first; other lists (args) are
    # replaced; only `app` is retagged.
    assert a == {
        "name": "a",
        "image": "registry.example/app:1.2.3",
        "env": [{"name": "Y", "value": "2"}, {"name": "X", "value": "1"}],
        "args": ["2"],
    }
    assert b == {"name": "b", "image": "other:2"}
    # A custom resource's lists are replaced whole, and null deletes a field.
    assert scaled["spec"] == {"triggers": [{"type": "cpu"}]}

    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["base"], "namespace": "x"}))
    with pytest.raises(NotImplementedError, match="namespace"):
        build(tmp_path)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_file_of_an_overlay_is_used(overlay: str) -> None:
    kustomization = yaml.safe_load((OVERLAYS[overlay] / "kustomization.yaml").read_text(encoding="utf-8"))
    used = {entry["path"] for entry in kustomization.get("patches", [])}
    on_disk = {p.name for p in OVERLAYS[overlay].iterdir()} - {"kustomization.yaml"}
    assert on_disk == used, f"{overlay}: {sorted(on_disk - used)} are applied by no one"
