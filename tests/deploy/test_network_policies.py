"""deploy/k8s/base/network-policies.yaml: default deny, and exactly the flows the design needs.

A small evaluator of NetworkPolicy semantics (the subset the manifests use: podSelector and
namespaceSelector with matchLabels, ipBlock with except, ports with protocol, port and
endPort) runs connections between a model of the cluster's pods: the suite's own, taken
from its Deployments, and the ones its operators and charts run (NATS, nats-box,
CloudNativePG, Envoy Gateway's proxies, KEDA, NACK, kube-dns) with the labels those set.
A connection passes when the source's egress and the destination's ingress both allow it;
a side that no policy selects in that direction is open, as in Kubernetes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.deploy.kustomize_build import build

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
NAMESPACE = "pregonero"
SERVICES = ("accounts", "campaigns", "dispatcher", "gateway")
GRPC_SERVICES = ("accounts", "campaigns", "dispatcher")

Doc = dict[str, Any]

# What production applies; the policies are the base's, the same in every overlay.
DOCS: list[Doc] = build(K8S / "overlays" / "prod")
POLICIES: list[Doc] = [d for d in DOCS if d["kind"] == "NetworkPolicy"]


def _one(kind: str, name: str | None = None) -> Doc:
    (doc,) = [d for d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


# --- the cluster, as far as the policies can see it ------------------------------------


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: Mapping[str, str]
    ip: str
    ports: Mapping[str, int] = field(default_factory=dict)  # container port name → number


@dataclass(frozen=True)
class Host:
    """An address that is no pod: the internet, the metadata endpoint, nodes, the VPC."""

    name: str
    ip: str


Endpoint = Pod | Host


def _namespace_labels(namespace: str) -> dict[str, str]:
    # Set by Kubernetes on every namespace (1.22+).
    return {"kubernetes.io/metadata.name": namespace}


def _url_port(url: str, default: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or default


_config = _one("ConfigMap", "pregonero-config")["data"]
_secrets = _one("Secret", "pregonero-secrets")["stringData"]
NATS_HOST, NATS_CLIENT_PORT = _url_port(_config["NATS_URL"], 4222)
PG_HOST, PG_PORT = _url_port(_secrets["DATABASE_URL"], 5432)
PG_CLUSTER = _one("Cluster")["metadata"]["name"]
_monitoring = _one("ScaledObject", "dispatcher")["spec"]["triggers"][0]["metadata"]["natsServerMonitoringEndpoint"]
NATS_MONITOR_PORT = int(_monitoring.rsplit(":", 1)[1])
NATS_CLUSTER_PORT = 6222  # the chart's route port (config.cluster.port)
CNPG_STATUS_PORT = 8000  # the instance manager's status endpoint, polled by the operator

_addresses = (f"10.244.0.{n}" for n in range(10, 250))


def _deployment_pods() -> dict[str, Pod]:
    pods = {}
    for doc in DOCS:
        if doc["kind"] != "Deployment":
            continue
        template = doc["spec"]["template"]
        containers = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for c in containers for p in c.get("ports", []) if "name" in p}
        name = doc["metadata"]["name"]
        pods[name] = Pod(name, doc["metadata"]["namespace"], template["metadata"]["labels"], next(_addresses), ports)
    return pods


def _nats_labels(component: str) -> dict[str, str]:
    # The official chart (1.x), release named after the host of NATS_URL.
    return {
        "app.kubernetes.io/name": "nats",
        "app.kubernetes.io/instance": NATS_HOST,
        "app.kubernetes.io/component": component,
    }


def _envoy_labels(gateway: str, namespace: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "envoy",
        "app.kubernetes.io/component": "proxy",
        "app.kubernetes.io/managed-by": "envoy-gateway",
        "gateway.envoyproxy.io/owning-gateway-name": gateway,
        "gateway.envoyproxy.io/owning-gateway-namespace": namespace,
    }


OURS = _deployment_pods()
_nats_ports = {"nats": NATS_CLIENT_PORT, "cluster": NATS_CLUSTER_PORT, "monitor": NATS_MONITOR_PORT}
_pg_ports = {"postgresql": PG_PORT, "status": CNPG_STATUS_PORT}
_gateway = _one("Gateway")["metadata"]
THEIRS = {
    pod.name: pod
    for pod in (
        Pod("nats-0", NAMESPACE, _nats_labels("nats"), next(_addresses), _nats_ports),
        Pod("nats-1", NAMESPACE, _nats_labels("nats"), next(_addresses), _nats_ports),
        Pod("nats-box", NAMESPACE, _nats_labels("nats-box"), next(_addresses)),
        Pod(
            "pg-1",
            NAMESPACE,
            {"cnpg.io/cluster": PG_CLUSTER, "cnpg.io/instanceRole": "primary", "cnpg.io/podRole": "instance"},
            next(_addresses),
            _pg_ports,
        ),
        Pod(
            "pg-2",
            NAMESPACE,
            {"cnpg.io/cluster": PG_CLUSTER, "cnpg.io/instanceRole": "replica", "cnpg.io/podRole": "instance"},
            next(_addresses),
            _pg_ports,
        ),
        Pod("envoy", "envoy-gateway-system", _envoy_labels(_gateway["name"], _gateway["namespace"]), next(_addresses)),
        Pod("keda", "keda", {"app": "keda-operator", "app.kubernetes.io/name": "keda-operator"}, next(_addresses)),
        Pod("nack", "nack", {"app.kubernetes.io/name": "nack", "app.kubernetes.io/instance": "nack"}, next(_addresses)),
        Pod("cnpg-operator", "cnpg-system", {"app.kubernetes.io/name": "cloudnative-pg"}, next(_addresses)),
        Pod("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, next(_addresses)),
        # prometheus-operator's Prometheus (kube-prometheus-stack in `monitoring`).
        Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, next(_addresses)),
        # Pods that must get nothing: another team's Envoy, a pod elsewhere wearing our
        # labels, the KEDA and NACK labels in the wrong namespace, a debug pod among ours.
        Pod("other-envoy", "envoy-gateway-system", _envoy_labels("other", "shop"), next(_addresses)),
        Pod("impostor", "default", {"app": "gateway"}, next(_addresses)),
        Pod("fake-keda", "default", {"app.kubernetes.io/name": "keda-operator"}, next(_addresses)),
        Pod("fake-nack", "default", {"app.kubernetes.io/name": "nack"}, next(_addresses)),
        Pod("fake-prometheus", "default", {"app.kubernetes.io/name": "prometheus"}, next(_addresses)),
        Pod("debug", NAMESPACE, {"app": "debug"}, next(_addresses)),
    )
}
PODS: dict[str, Pod] = {**OURS, **THEIRS}
HOSTS = {
    host.name: host
    for host in (
        Host("provider", "157.240.22.19"),  # a public address (Meta's Graph API range)
        Host("other-public", "1.1.1.1"),
        Host("metadata", "169.254.169.254"),
        Host("api-server", "10.0.0.10"),  # a control-plane endpoint on the node network
        Host("vpc", "172.16.5.5"),
        Host("lan", "192.168.1.20"),
    )
}
ENDPOINTS: dict[str, Endpoint] = {**PODS, **HOSTS}
IN_NAMESPACE = [pod for pod in PODS.values() if pod.namespace == NAMESPACE]


# --- the evaluator ---------------------------------------------------------------------


def _selects(selector: Doc, labels: Mapping[str, str]) -> bool:
    unsupported = set(selector) - {"matchLabels"}
    assert not unsupported, f"the evaluator does not know {unsupported}"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _policy_types(spec: Doc) -> list[str]:
    return spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])]


def _applying(pod: Pod, direction: str, policies: list[Doc] | None = None) -> list[Doc]:
    return [
        p
        for p in (POLICIES if policies is None else policies)
        if p["metadata"]["namespace"] == pod.namespace
        and direction in _policy_types(p["spec"])
        and _selects(p["spec"]["podSelector"], pod.labels)
    ]


def _peer_matches(peer: Doc, policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        assert set(peer) == {"ipBlock"}, f"ipBlock goes alone in a peer: {peer}"
        # Matched against any address, pods' too: the stricter reading (CNIs differ).
        ip = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    assert set(peer) <= {"podSelector", "namespaceSelector"} and peer, f"unknown peer {peer}"
    if not isinstance(other, Pod):
        return False
    if "namespaceSelector" in peer:
        in_namespace = _selects(peer["namespaceSelector"], _namespace_labels(other.namespace))
    else:
        in_namespace = other.namespace == policy_namespace
    return in_namespace and _selects(peer.get("podSelector") or {}, other.labels)


def _port_matches(ports: list[Doc] | None, dst: Endpoint, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        value = entry["port"]
        if isinstance(value, str):  # a named port is the destination pod's container port
            if isinstance(dst, Pod) and dst.ports.get(value) == port:
                return True
        else:
            first: int = value
            last: int = entry.get("endPort", first)
            if first <= port <= last:
                return True
    return False


def _side_allows(
    pod: Endpoint, direction: str, other: Endpoint, dst: Endpoint, port: int, protocol: str, policies: list[Doc] | None
) -> bool:
    if not isinstance(pod, Pod):
        return True
    applying = _applying(pod, direction, policies)
    if not applying:
        return True
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in applying:
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key)
            if peers and not any(_peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers):
                continue
            if _port_matches(rule.get("ports"), dst, port, protocol):
                return True
    return False


def allowed(
    src: Endpoint | str, dst: Endpoint | str, port: int, protocol: str = "TCP", policies: list[Doc] | None = None
) -> bool:
    """Whether a connection from src to dst:port/protocol passes (under `policies`, by default the manifests')."""
    src = ENDPOINTS[src] if isinstance(src, str) else src
    dst = ENDPOINTS[dst] if isinstance(dst, str) else dst
    return _side_allows(src, "Egress", dst, dst, port, protocol, policies) and _side_allows(
        dst, "Ingress", src, dst, port, protocol, policies
    )


# --- the evaluator itself --------------------------------------------------------------


def _labels(app: str) -> Doc:
    return {"matchLabels": {"app": app}}


def _policy(selector: Doc, **spec: Any) -> Doc:
    return {
        "kind": "NetworkPolicy",
        "metadata": {"name": "t", "namespace": "ns"},
        "spec": {"podSelector": selector, **spec},
    }


def test_evaluator_semantics() -> None:
    """The evaluator reads the spec the way Kubernetes does, on hand-written policies."""
    a = Pod("a", "ns", {"app": "a"}, "10.1.0.1", {"web": 8080})
    b = Pod("b", "ns", {"app": "b"}, "10.1.0.2", {"web": 8080})
    c = Pod("c", "other", {"app": "a"}, "10.1.0.3")
    out = Host("out", "8.8.8.8")
    meta = Host("meta", "169.254.169.254")

    def ok(src: Endpoint, dst: Endpoint, port: int, *policies: Doc, protocol: str = "TCP") -> bool:
        return allowed(src, dst, port, protocol, list(policies))

    assert ok(a, b, 1) and ok(c, a, 1), "nothing selects them: open"
    deny = _policy({}, policyTypes=["Ingress", "Egress"])
    assert not ok(a, b, 8080, deny) and not ok(c, a, 8080, deny) and not ok(a, out, 443, deny)
    assert ok(c, out, 443, deny), "other namespaces are not governed here"

    from_a = _policy(_labels("b"), ingress=[{"from": [{"podSelector": _labels("a")}], "ports": [{"port": "web"}]}])
    assert ok(a, b, 8080, from_a) and not ok(a, b, 8081, from_a) and not ok(a, b, 8080, from_a, protocol="UDP")
    assert not ok(c, b, 8080, from_a), "a bare podSelector means the policy's own namespace"
    assert ok(b, a, 1, from_a), "no policy with Egress: egress open (policyTypes defaults to Ingress)"

    any_namespace = _policy(_labels("b"), ingress=[{"from": [{"namespaceSelector": {}}]}])
    assert ok(c, b, 1, any_namespace) and ok(a, b, 2, any_namespace)
    other_x = {"namespaceSelector": {"matchLabels": _namespace_labels("other")}, "podSelector": _labels("x")}
    assert not ok(c, b, 1, _policy(_labels("b"), ingress=[{"from": [other_x]}])), "one peer: both selectors apply"
    assert ok(c, b, 5, _policy(_labels("b"), ingress=[{}])), "a rule without from and ports allows everything"

    block = {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16", "10.0.0.0/8"]}}
    https = _policy(_labels("a"), egress=[{"to": [block], "ports": [{"port": 440, "endPort": 450}]}])
    assert ok(a, out, 443, https) and not ok(a, out, 451, https)
    assert not ok(a, meta, 443, https) and not ok(a, b, 443, https)

    isolate = _policy(_labels("a"), policyTypes=["Egress"])
    same_namespace = _policy(_labels("a"), egress=[{"to": [{"podSelector": {}}]}])
    assert ok(a, b, 9, isolate, same_namespace) and not ok(a, out, 9, isolate, same_namespace), "policies add up"


# --- the policies ------------------------------------------------------------------------


def test_the_namespace_denies_by_default() -> None:
    deny = [
        p
        for p in POLICIES
        if p["metadata"]["namespace"] == NAMESPACE
        and p["spec"]["podSelector"] in ({}, None)
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, "no default-deny (ingress and egress) NetworkPolicy for the namespace"
    for pod in IN_NAMESPACE:
        assert _applying(pod, "Ingress") and _applying(pod, "Egress"), pod.name


def test_policies_are_well_formed_and_select_pods() -> None:
    """Every policy lives in the namespace and every selector selects a pod of the model,
    so a label typo (or a Deployment relabelled) cannot quietly open or close a flow."""
    assert {p["metadata"]["name"] for p in POLICIES} and len({p["metadata"]["name"] for p in POLICIES}) == len(POLICIES)
    for policy in POLICIES:
        name, spec = policy["metadata"]["name"], policy["spec"]
        assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["metadata"]["namespace"] == NAMESPACE
        assert spec.get("policyTypes"), f"{name}: say policyTypes explicitly"
        assert any(_selects(spec["podSelector"], p.labels) for p in IN_NAMESPACE), f"{name} selects no pod"
        for key, peers_key in (("ingress", "from"), ("egress", "to")):
            for rule in spec.get(key) or []:
                assert rule.get(peers_key), f"{name}: a {key} rule without peers opens it to everyone"
                assert rule.get("ports"), f"{name}: a {key} rule without ports opens every port"
                for peer in rule[peers_key]:
                    if "ipBlock" in peer:
                        continue
                    matched = any(_peer_matches(peer, NAMESPACE, p) for p in PODS.values())
                    assert matched, f"{name}: {peer} matches no pod"


def _grpc(name: str) -> int:
    return OURS[name].ports["grpc"]


def _http() -> int:
    return OURS["gateway"].ports["http"]


def _callees_in_code(service: str) -> set[str]:
    """The gRPC services a service's code dials (settings.<service>_addr outside its config)."""
    found: set[str] = set()
    for path in (ROOT / "services" / service).rglob("*.py"):
        if path.name != "config.py":
            text = path.read_text(encoding="utf-8")
            found |= set(re.findall(r"settings\.(accounts|campaigns|dispatcher)_addr\b", text))
    return found


def test_grpc_flows_are_exactly_the_clients_in_the_code() -> None:
    expected = {(src, dst) for src in SERVICES for dst in _callees_in_code(src)}
    # What the design says, as a check on the code scan itself.
    assert {("gateway", "accounts"), ("gateway", "campaigns"), ("gateway", "dispatcher")} <= expected
    assert {("campaigns", "accounts"), ("campaigns", "dispatcher")} <= expected
    for dst in GRPC_SERVICES:
        for src in PODS:
            assert allowed(src, dst, _grpc(dst)) == ((src, dst) in expected), f"{src} → {dst}:{_grpc(dst)}"


def test_only_envoy_gateways_proxies_reach_the_gateway() -> None:
    for src in PODS:
        assert allowed(src, "gateway", _http()) == (src == "envoy"), src
    assert not allowed("envoy", "gateway", _http() + 1)
    for dst in [*GRPC_SERVICES, "nats-0", "pg-1"]:
        for port in (_http(), _grpc("accounts"), NATS_CLIENT_PORT, PG_PORT):
            assert not allowed("envoy", dst, port), f"the edge bypasses the gateway to {dst}:{port}"


def _reads_database_url(name: str) -> bool:
    (container,) = _one("Deployment", name)["spec"]["template"]["spec"]["containers"]
    return any(e["name"] == "DATABASE_URL" for e in container.get("env", []))


def test_services_reach_postgres_and_nats_and_nothing_else_of_them() -> None:
    assert PG_HOST == f"{PG_CLUSTER}-rw", "DATABASE_URL must point at the CNPG Cluster's rw Service"
    # The gateway keeps no data: no credentials, no flow (its /health asks the backends).
    assert [name for name in SERVICES if _reads_database_url(name)] == list(GRPC_SERVICES)
    for name in SERVICES:
        for dst in ("pg-1", "pg-2"):
            assert allowed(name, dst, PG_PORT) == (name in GRPC_SERVICES), f"{name} → postgres"
            assert not allowed(name, dst, CNPG_STATUS_PORT)
        for dst in ("nats-0", "nats-1"):
            assert allowed(name, dst, NATS_CLIENT_PORT), f"{name} → nats"
            assert not allowed(name, dst, NATS_CLUSTER_PORT) and not allowed(name, dst, NATS_MONITOR_PORT)
    for src in ("impostor", "debug", "envoy", "keda", "nack", "nats-box"):
        assert not allowed(src, "pg-1", PG_PORT), f"{src} → postgres"
    for src in ("impostor", "debug", "envoy", "fake-nack", "keda"):
        assert not allowed(src, "nats-0", NATS_CLIENT_PORT), f"{src} → nats"


def test_the_infrastructure_keeps_its_own_flows() -> None:
    # NATS: routes between servers, NACK and nats-box as clients, KEDA on the monitor port.
    assert allowed("nats-0", "nats-1", NATS_CLUSTER_PORT) and allowed("nats-1", "nats-0", NATS_CLUSTER_PORT)
    assert allowed("nack", "nats-0", NATS_CLIENT_PORT) and allowed("nats-box", "nats-1", NATS_CLIENT_PORT)
    assert allowed("keda", "nats-0", NATS_MONITOR_PORT) and allowed("keda", "nats-1", NATS_MONITOR_PORT)
    assert not allowed("fake-keda", "nats-0", NATS_MONITOR_PORT) and not allowed("keda", "nats-0", NATS_CLIENT_PORT)
    assert not allowed("debug", "nats-0", NATS_MONITOR_PORT) and not allowed("nats-0", "provider", 443)
    # CloudNativePG: the operator on 5432 and 8000, replication between instances, the API.
    for port in (PG_PORT, CNPG_STATUS_PORT):
        assert allowed("cnpg-operator", "pg-1", port) and allowed("pg-2", "pg-1", port)
    assert allowed("pg-1", "api-server", 6443) and allowed("pg-1", "api-server", 443)
    assert not allowed("pg-1", "provider", 443) and not allowed("pg-1", "metadata", 80)
    assert not allowed("pg-1", "gateway", _http()) and not allowed("pg-1", "nats-0", NATS_CLIENT_PORT)


def test_every_pod_resolves_names_through_kube_dns_only() -> None:
    for pod in IN_NAMESPACE:
        assert allowed(pod, "kube-dns", 53, "UDP") and allowed(pod, "kube-dns", 53, "TCP"), pod.name
        assert not allowed(pod, "other-public", 53, "UDP"), f"{pod.name} asks an outside resolver"
        assert not allowed(pod, "kube-dns", 8080), pod.name


def test_only_the_dispatcher_reaches_the_internet_and_only_over_https() -> None:
    for pod in IN_NAMESPACE:
        for host in ("provider", "other-public"):
            for port in (80, 443, 8080, 22):
                expected = pod.name == "dispatcher" and port == 443
                assert allowed(pod, host, port) == expected, f"{pod.name} → {host}:{port}"


@pytest.mark.parametrize("host", ["metadata", "vpc", "lan", "api-server"])
def test_the_dispatcher_cannot_turn_inwards(host: str) -> None:
    """The providers' egress is no path to the metadata endpoint, the nodes or the VPC."""
    for port in (80, 443, 8080):
        assert not allowed("dispatcher", host, port), f"dispatcher → {host}:{port}"


def test_no_pod_of_ours_reaches_the_metadata_endpoint() -> None:
    for pod in IN_NAMESPACE:
        for port in (80, 443, 8080):
            assert not allowed(pod, "metadata", port), f"{pod.name} → 169.254.169.254:{port}"


def _ip_blocks() -> Iterator[tuple[str, Doc]]:
    for policy in POLICIES:
        for rule in policy["spec"].get("egress") or []:
            for peer in rule.get("to") or []:
                if "ipBlock" in peer:
                    yield policy["metadata"]["name"], peer["ipBlock"]


def test_wide_ip_blocks_carve_out_the_private_ranges() -> None:
    """A block wider than a private range (0.0.0.0/0 for the providers) excepts it, and no
    block reaches the metadata endpoint. Blocks that name a private range itself (the API
    server for Postgres) are deliberate."""
    private = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")]
    metadata = ipaddress.ip_address("169.254.169.254")
    blocks = list(_ip_blocks())
    assert blocks, "no ipBlock at all: where do the providers' calls go?"
    for name, block in blocks:
        cidr = ipaddress.ip_network(block["cidr"])
        excepted = [ipaddress.ip_network(e) for e in block.get("except", [])]
        for net in private:
            if net != cidr and net.subnet_of(cidr):  # type: ignore[arg-type]
                assert any(net.subnet_of(e) for e in excepted), f"{name}: {cidr} does not except {net}"  # type: ignore[arg-type]
        assert metadata not in cidr or any(metadata in e for e in excepted), f"{name}: {cidr} reaches {metadata}"


def test_only_prometheus_scrapes_the_metrics_ports() -> None:
    for name in SERVICES:
        port = OURS[name].ports["metrics"]
        for src in PODS:
            assert allowed(src, name, port) == (src == "prometheus"), f"{src} → {name}:{port}"
    # Its way in is the metrics port alone.
    assert not allowed("prometheus", "accounts", _grpc("accounts")) and not allowed("prometheus", "gateway", _http())
    assert not allowed("prometheus", "pg-1", PG_PORT) and not allowed("prometheus", "nats-0", NATS_CLIENT_PORT)


@pytest.mark.parametrize("name", sorted(OURS))
def test_every_declared_port_has_a_caller(name: str) -> None:
    """A port a Deployment declares (a metrics port tomorrow) is reachable by someone, or the
    policies were not updated with it."""
    for port_name, port in OURS[name].ports.items():
        callers = [src for src in PODS if src != name and allowed(src, name, port)]
        assert callers, f"{name}: port {port_name} ({port}) is unreachable under the NetworkPolicies"
