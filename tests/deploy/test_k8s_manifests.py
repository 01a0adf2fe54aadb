"""The Kubernetes manifests keep their hardening and stay consistent with each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
NAMESPACE = "pregonero"
GRPC_SERVICES = ("accounts", "campaigns", "dispatcher")
HTTP_SERVICES = ("gateway",)
CLUSTER_SCOPED = {"Namespace", "GatewayClass"}
DEFAULT_SHUTDOWN_GRACE = 10.0

Doc = dict[str, Any]


def _load(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


DOCS_BY_FILE: dict[str, list[Doc]] = {
    p.name: _load(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"
}
DOCS: list[Doc] = [doc for docs in DOCS_BY_FILE.values() for doc in docs]


def _of_kind(kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in DOCS if d["kind"] == kind}


DEPLOYMENTS = _of_kind("Deployment")
SERVICES = _of_kind("Service")
CONFIGMAPS = _of_kind("ConfigMap")
SECRETS = _of_kind("Secret")


def _pod(name: str) -> Doc:
    return DEPLOYMENTS[name]["spec"]["template"]["spec"]


def _pod_labels(name: str) -> dict[str, str]:
    return DEPLOYMENTS[name]["spec"]["template"]["metadata"]["labels"]


def _containers(name: str) -> list[Doc]:
    return _pod(name)["containers"]


def _target_container_port(service: str) -> int:
    """The container port number the Service's (single) port forwards to."""
    (port,) = SERVICES[service]["spec"]["ports"]
    target = port.get("targetPort", port["port"])
    if isinstance(target, int):
        return target
    for container in _containers(service):
        for cport in container.get("ports", []):
            if cport.get("name") == target:
                return cport["containerPort"]
    raise AssertionError(f"{service}: targetPort {target!r} names no container port")


def _probe_port(container: Doc, probe: Doc) -> int | str:
    handler = probe.get("grpc") or probe.get("httpGet") or probe.get("tcpSocket")
    assert handler, f"probe without a grpc/httpGet/tcpSocket handler: {probe}"
    port = handler["port"]
    if isinstance(port, str):
        for cport in container.get("ports", []):
            if cport.get("name") == port:
                return cport["containerPort"]
    return port


def _env_value(env: Doc) -> str | None:
    """Resolve a literal or ConfigMap-backed env value; None when it comes from a Secret."""
    if "value" in env:
        return str(env["value"])
    ref = env.get("valueFrom", {}).get("configMapKeyRef")
    if ref:
        return str(CONFIGMAPS[ref["name"]]["data"][ref["key"]])
    return None


def _prestop_seconds(container: Doc) -> float:
    hook = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    if command[:1] == ["sleep"]:
        return float(command[1])
    return 0.0


def test_kustomization_lists_exactly_the_yaml_files() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists missing {name}"
    on_disk = {p.name for p in K8S.iterdir() if p.suffix in (".yaml", ".yml")}
    assert on_disk - {"kustomization.yaml"} == set(listed)


def test_every_document_has_kind_and_namespace() -> None:
    for name, docs in DOCS_BY_FILE.items():
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), f"{name}: {doc}"
            namespace = doc["metadata"].get("namespace")
            if doc["kind"] in CLUSTER_SCOPED:
                assert namespace is None, f"{name}: cluster-scoped {doc['kind']} has a namespace"
            else:
                assert namespace == NAMESPACE, f"{name}: {doc['kind']} outside {NAMESPACE}"


def test_one_file_per_service_with_deployment_service_and_account() -> None:
    for service in (*GRPC_SERVICES, *HTTP_SERVICES):
        kinds = {(d["kind"], d["metadata"]["name"]) for d in DOCS_BY_FILE[f"{service}.yaml"]}
        assert {("Deployment", service), ("Service", service), ("ServiceAccount", service)} <= kinds
        assert _pod(service)["serviceAccountName"] == service


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_pods_are_hardened(name: str) -> None:
    pod = _pod(name)
    assert pod.get("automountServiceAccountToken") is False
    pod_ctx = pod.get("securityContext", {})
    assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    for container in _containers(name):
        ctx = container.get("securityContext", {})
        where = f"{name}/{container['name']}"
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) not in (None, 0), where
        assert ctx.get("readOnlyRootFilesystem") is True, where
        assert ctx.get("allowPrivilegeEscalation") is False, where
        assert not ctx.get("privileged", False), where
        assert "ALL" in ctx.get("capabilities", {}).get("drop", []), where
        assert not ctx.get("capabilities", {}).get("add"), where


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_read_only_root_has_a_writable_tmp(name: str) -> None:
    volumes = {v["name"]: v for v in _pod(name).get("volumes", [])}
    for container in _containers(name):
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{name}/{container['name']} has no /tmp"
        assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_containers_have_requests_and_limits(name: str) -> None:
    for container in _containers(name):
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resources.get(bound, {}).get(resource), f"{name}/{container['name']} has no {resource} {bound}"


@pytest.mark.parametrize("name", GRPC_SERVICES)
def test_grpc_services_probe_the_port_their_service_targets(name: str) -> None:
    target = _target_container_port(name)
    (container,) = _containers(name)
    for kind in ("readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        assert probe and "grpc" in probe, f"{name}: {kind} is not a native gRPC probe"
        assert _probe_port(container, probe) == target, f"{name}: {kind} on another port"
    if "startupProbe" in container:
        assert _probe_port(container, container["startupProbe"]) == target
    env = {e["name"]: _env_value(e) for e in container.get("env", [])}
    assert env.get("GRPC_PORT") == str(target), f"{name}: GRPC_PORT is not the probed port"
    # The settings default binds loopback, which neither probes nor Services can reach.
    assert env.get("GRPC_HOST") in ("0.0.0.0", "[::]"), f"{name}: GRPC_HOST is not set"


@pytest.mark.parametrize("name", HTTP_SERVICES)
def test_http_services_probe_health_on_the_port_their_service_targets(name: str) -> None:
    target = _target_container_port(name)
    (container,) = _containers(name)
    readiness = container.get("readinessProbe", {})
    assert readiness.get("httpGet", {}).get("path") == "/health"
    assert _probe_port(container, readiness) == target
    assert _probe_port(container, container["livenessProbe"]) == target
    env = {e["name"]: _env_value(e) for e in container.get("env", [])}
    assert env.get("HTTP_PORT") == str(target)
    assert env.get("HTTP_HOST") in ("0.0.0.0", "[::]"), f"{name}: HTTP_HOST is not set"


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_termination_grace_outlasts_the_drain(name: str) -> None:
    pod = _pod(name)
    grace = pod.get("terminationGracePeriodSeconds", 30)  # the Kubernetes default
    for container in _containers(name):
        env = {e["name"]: e for e in container.get("env", [])}
        drain = DEFAULT_SHUTDOWN_GRACE
        if "SHUTDOWN_GRACE_SECONDS" in env:
            value = _env_value(env["SHUTDOWN_GRACE_SECONDS"])
            assert value is not None, "SHUTDOWN_GRACE_SECONDS must not be a secret"
            drain = float(value)
        # The dispatcher also lets calls in progress end after the gRPC drain.
        if "CALL_DRAIN_SECONDS" in env:
            drain += float(_env_value(env["CALL_DRAIN_SECONDS"]) or 0)
        needed = drain + _prestop_seconds(container)
        assert grace > needed, f"{name}: grace {grace}s does not outlast {needed}s of drain"


def test_env_references_resolve() -> None:
    for name in DEPLOYMENTS:
        for container in _containers(name):
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                if "configMapKeyRef" in source:
                    ref, objects, field = source["configMapKeyRef"], CONFIGMAPS, "data"
                elif "secretKeyRef" in source:
                    ref, objects, field = source["secretKeyRef"], SECRETS, "stringData"
                else:
                    continue
                if ref.get("optional"):
                    continue
                assert ref["name"] in objects, f"{name}: {env['name']} names {ref['name']}"
                assert ref["key"] in objects[ref["name"]].get(field, {}), (
                    f"{name}: {env['name']} reads missing key {ref['key']}"
                )


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_selects_its_deployment_pods(name: str) -> None:
    selector = SERVICES[name]["spec"].get("selector")
    assert selector, f"Service {name} has no selector"
    assert name in DEPLOYMENTS, f"Service {name} has no Deployment of the same name"
    labels = _pod_labels(name)
    assert selector.items() <= labels.items(), f"Service {name} selects no pod of its Deployment"
    assert DEPLOYMENTS[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    others = [other for other in DEPLOYMENTS if other != name and selector.items() <= _pod_labels(other).items()]
    assert not others, f"Service {name} also selects pods of {others}"


def test_keda_scales_the_dispatcher_on_its_consumer() -> None:
    (scaled,) = [s for s in _of_kind("ScaledObject").values() if s["spec"]["scaleTargetRef"]["name"] == "dispatcher"]
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert "dispatcher" in DEPLOYMENTS
    triggers = [t["metadata"] for t in scaled["spec"]["triggers"] if t["type"] == "nats-jetstream"]
    whatsapp = [t for t in triggers if t["consumer"] == "dispatch-whatsapp"]
    assert whatsapp, "no nats-jetstream trigger on the dispatch-whatsapp consumer"
    for meta in whatsapp:
        assert meta["stream"] == "DISPATCH" and meta["account"] == "$G"
        assert int(meta["lagThreshold"]) > 0
        assert meta["natsServerMonitoringEndpoint"].endswith(":8222")
    assert scaled["spec"].get("minReplicaCount", 0) >= 1, "the gRPC admin API must stay up"


def test_each_deployment_has_one_autoscaler_and_no_fixed_replicas() -> None:
    scalers = [*_of_kind("HorizontalPodAutoscaler").values(), *_of_kind("ScaledObject").values()]
    targets = [scaler["spec"]["scaleTargetRef"]["name"] for scaler in scalers]
    assert sorted(targets) == sorted(DEPLOYMENTS), "every Deployment needs exactly one autoscaler"
    for name, deployment in DEPLOYMENTS.items():
        # A fixed count would reset the autoscaler's choice on every apply.
        assert "replicas" not in deployment["spec"], f"{name} sets replicas"


def test_routes_point_at_existing_service_ports() -> None:
    for route in _of_kind("HTTPRoute").values():
        for rule in route["spec"]["rules"]:
            for backend in rule["backendRefs"]:
                service = SERVICES[backend["name"]]
                ports = {p["port"] for p in service["spec"]["ports"]}
                assert backend["port"] in ports, f"{route['metadata']['name']}: {backend}"


def test_jwks_uri_points_at_the_gateway_service() -> None:
    for policy in _of_kind("SecurityPolicy").values():
        for provider in policy["spec"]["jwt"]["providers"]:
            uri = urlsplit(provider["remoteJWKS"]["uri"])
            service, namespace, *_ = (uri.hostname or "").split(".")
            assert (service, namespace) == ("gateway", NAMESPACE), uri
            assert uri.port in {p["port"] for p in SERVICES[service]["spec"]["ports"]}


def test_envoy_requires_the_audience_accounts_signs_and_the_gateway_checks() -> None:
    from services.accounts.config import AccountsSettings
    from services.gateway.config import GatewaySettings

    audience = AccountsSettings(database_url="postgresql://x/y").pregonero_jwt_audience
    assert GatewaySettings(database_url="postgresql://x/y").pregonero_jwt_audience == audience
    for policy in _of_kind("SecurityPolicy").values():
        for provider in policy["spec"]["jwt"]["providers"]:
            assert provider["audiences"] == [audience]


def test_policies_target_existing_routes_or_gateways() -> None:
    targets = {kind: _of_kind(kind) for kind in ("HTTPRoute", "Gateway")}
    for kind in ("BackendTrafficPolicy", "SecurityPolicy"):
        for policy in _of_kind(kind).values():
            for ref in policy["spec"]["targetRefs"]:
                assert ref["name"] in targets.get(ref["kind"], {}), policy


def test_envoy_closes_idle_gateway_connections_before_the_gateway_does() -> None:
    """Each policy replaces the Gateway's for its route, so each names the idle timeout; it
    stays below the gateway's keep-alive, or a request sent as the gateway closes is lost."""
    from services.gateway.config import GatewaySettings

    keep_alive = GatewaySettings.model_fields["http_keep_alive_seconds"].default
    policies = _of_kind("BackendTrafficPolicy")
    assert any(t["kind"] == "Gateway" for p in policies.values() for t in p["spec"]["targetRefs"])
    for name, policy in policies.items():
        idle = policy["spec"]["timeout"]["http"]["connectionIdleTimeout"]
        assert idle.endswith("s") and int(idle[:-1]) < keep_alive, name


def _per_second(limit: Doc) -> float:
    return float(limit["requests"]) / {"Second": 1, "Minute": 60, "Hour": 3600}[limit["unit"]]


def test_every_rate_limit_is_per_client_with_a_backstop_for_all() -> None:
    """No limit is one bucket that every client shares (one client would use it up for all):
    each policy has a bucket per IPv4 and per IPv6 client, and above them one for all."""
    policies = _of_kind("BackendTrafficPolicy")
    limits = {name: p["spec"]["rateLimit"] for name, p in policies.items() if "rateLimit" in p["spec"]}
    assert {"upstream-connections", "login-rate-limit"} <= set(limits)
    for name, limit in limits.items():
        assert limit["type"] == "Local", name
        rules = limit["local"]["rules"]
        per_client = {
            (s["sourceCIDR"]["type"], s["sourceCIDR"]["value"]): rule["limit"]
            for rule in rules
            for s in rule.get("clientSelectors", [])
        }
        assert set(per_client) == {("Distinct", "0.0.0.0/0"), ("Distinct", "::/0")}, name
        (backstop,) = [rule["limit"] for rule in rules if not rule.get("clientSelectors")]
        assert all(_per_second(backstop) > _per_second(each) for each in per_client.values()), name


def test_the_gateway_trusts_the_proxies_pod_range_and_nothing_wider() -> None:
    from services.gateway.auth import parse_networks

    trusted = parse_networks(CONFIGMAPS["pregonero-config"]["data"]["PREGONERO_TRUSTED_PROXIES"])
    assert trusted and all(net.is_private and not net.is_loopback and net.prefixlen >= 16 for net in trusted)


def test_every_stream_the_services_use_is_declared_for_the_operator() -> None:
    """In production NACK owns the streams (a service leaves an existing one alone): each one
    the services create in development must be declared, with the same subjects and
    retention, or it would be made with one replica on first start."""
    from services.runtime.bus import STREAMS

    declared = {s["spec"]["name"]: s["spec"] for s in _of_kind("Stream").values()}
    for config in STREAMS:
        assert config.name in declared, f"stream {config.name} is not in deploy/k8s"
        spec = declared[config.name]
        assert spec["subjects"] == config.subjects
        assert spec["retention"] == {"workqueue": "workqueue", "limits": "limits"}[str(config.retention.value)]
        assert spec["replicas"] >= 3


def test_each_service_logs_in_to_nats_as_its_own_restricted_user() -> None:
    """The NATS users (services/runtime/nats_auth.py): the server's are the table's, with a
    password each from the Secret; each Deployment logs in as its own service's user."""
    import json

    from services.runtime import nats_auth

    conf = CONFIGMAPS["nats-authorization"]["data"]["authorization.conf"]
    assert conf == nats_auth.NatsUsers.from_env_vars().server_config(), "nats.yaml: render it from nats_auth.py"
    secret = SECRETS["pregonero-nats-users"]["stringData"]
    server_env = yaml.safe_load((K8S / "helm" / "nats-values.yaml").read_text(encoding="utf-8"))["container"]["env"]
    quoted = conf.removeprefix("authorization ")
    for user in (nats_auth.OPERATOR, *nats_auth.ROLES):
        key = nats_auth.password_env_var(user)
        assert key in secret
        assert server_env[key]["valueFrom"]["secretKeyRef"] == {"name": "pregonero-nats-users", "key": key}
        quoted = quoted.replace(f"${key}", json.dumps(f"${key}"))
    users = {u["user"]: u for u in json.loads(quoted)["users"]}
    config = CONFIGMAPS["pregonero-config"]["data"]
    assert config["NATS_URL"] == f"nats://{config['NATS_ADDR']}", "the same servers"
    assert set(users) == {nats_auth.OPERATOR, *nats_auth.ROLES}
    for service in nats_auth.ROLES:
        perms = users[service]["permissions"]
        publish, subscribe = perms["publish"]["allow"], perms["subscribe"]["allow"]
        assert publish and subscribe and "deny" not in perms["publish"]
        assert not {">", "$JS.API.>", "$JS.>", "events.>", "_INBOX.>"} & {*publish, *subscribe}, service
        assert subscribe[0] == f"{nats_auth.inbox_prefix(service)}.>"
        (container,) = [c for c in _containers(service) if any(e["name"] == "NATS_URL" for e in c.get("env", []))]
        names = [e["name"] for e in container["env"]]
        env = {e["name"]: e for e in container["env"]}
        # $(VAR) expands only variables defined earlier in the list.
        assert names.index("NATS_ADDR") < names.index("NATS_URL") > names.index("NATS_PASSWORD")
        assert env["NATS_URL"]["value"] == f"nats://{service}:$(NATS_PASSWORD)@$(NATS_ADDR)"
        ref = env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "pregonero-nats-users", "key": nats_auth.password_env_var(service)}


@pytest.mark.parametrize("name", GRPC_SERVICES + HTTP_SERVICES)
def test_each_service_signs_with_its_own_key_and_trusts_the_published_set(name: str) -> None:
    from services.runtime.service_auth import SIGNING_SERVICES

    env = {e["name"]: e for e in _containers(name)[0]["env"]}
    signing = env["SERVICE_SIGNING_KEY"]["valueFrom"]["secretKeyRef"]
    # Its own key, from a Secret only the service keys live in: no pod holds another's.
    assert signing == {"name": "pregonero-service-keys", "key": f"{name.upper()}_SIGNING_KEY"}
    assert set(SECRETS["pregonero-service-keys"]["stringData"]) == {
        f"{s.upper()}_SIGNING_KEY" for s in SIGNING_SERVICES
    }
    public = env["SERVICE_PUBLIC_KEYS"]["valueFrom"]["configMapKeyRef"]
    assert public["name"] == "pregonero-config"
    published = CONFIGMAPS["pregonero-config"]["data"][public["key"]]
    assert {entry.split(":")[0] for entry in published.split(",")} == set(SIGNING_SERVICES)
