"""The Kubernetes manifests keep their hardening and stay consistent with each other.

What is checked is what `kubectl apply -k deploy/k8s/overlays/<name>` would apply, rendered by
tests/deploy/kustomize_build.py; checks that hold in every environment run on each overlay,
the rest on production's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.kustomize_build import build

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = {p.name: p for p in sorted((K8S / "overlays").iterdir()) if (p / "kustomization.yaml").is_file()}
PRODUCTION = "prod"
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
    p.name: _load(p) for p in sorted(BASE.glob("*.yaml")) if p.name != "kustomization.yaml"
}
RENDERED: dict[str, list[Doc]] = {name: build(path) for name, path in OVERLAYS.items()}
DOCS: list[Doc] = RENDERED[PRODUCTION]


def _of_kind(kind: str, docs: list[Doc] = DOCS) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


DEPLOYMENTS = _of_kind("Deployment")
SERVICES = _of_kind("Service")
CONFIGMAPS = _of_kind("ConfigMap")
SECRETS = _of_kind("Secret")
# (overlay, Deployment) for the checks every environment must pass.
EVERY_DEPLOYMENT = [
    (overlay, name) for overlay, docs in RENDERED.items() for name in sorted(_of_kind("Deployment", docs))
]


def _pod(name: str, overlay: str = PRODUCTION) -> Doc:
    return _of_kind("Deployment", RENDERED[overlay])[name]["spec"]["template"]["spec"]


def _pod_labels(name: str) -> dict[str, str]:
    return DEPLOYMENTS[name]["spec"]["template"]["metadata"]["labels"]


def _containers(name: str, overlay: str = PRODUCTION) -> list[Doc]:
    return _pod(name, overlay)["containers"]


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


def _env_value(env: Doc, overlay: str = PRODUCTION) -> str | None:
    """Resolve a literal or ConfigMap-backed env value; None when it comes from a Secret."""
    if "value" in env:
        return str(env["value"])
    ref = env.get("valueFrom", {}).get("configMapKeyRef")
    if ref:
        return str(_of_kind("ConfigMap", RENDERED[overlay])[ref["name"]]["data"][ref["key"]])
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
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    for name in listed:
        assert (BASE / name).is_file(), f"kustomization.yaml lists missing {name}"
    on_disk = {p.name for p in BASE.iterdir() if p.suffix in (".yaml", ".yml")}
    assert on_disk - {"kustomization.yaml"} == set(listed)
    # Nothing but the base, the overlays and the NATS chart's values: a stray file is applied by no one.
    assert {p.name for p in K8S.iterdir() if p.is_dir()} == {"base", "overlays", "helm"}
    assert not [p.name for p in K8S.iterdir() if p.suffix in (".yaml", ".yml")]


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


@pytest.mark.parametrize(("overlay", "name"), EVERY_DEPLOYMENT)
def test_pods_are_hardened(overlay: str, name: str) -> None:
    pod = _pod(name, overlay)
    assert pod.get("automountServiceAccountToken") is False
    pod_ctx = pod.get("securityContext", {})
    assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    for container in _containers(name, overlay):
        ctx = container.get("securityContext", {})
        where = f"{overlay}: {name}/{container['name']}"
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) not in (None, 0), where
        assert ctx.get("readOnlyRootFilesystem") is True, where
        assert ctx.get("allowPrivilegeEscalation") is False, where
        assert not ctx.get("privileged", False), where
        assert "ALL" in ctx.get("capabilities", {}).get("drop", []), where
        assert not ctx.get("capabilities", {}).get("add"), where


@pytest.mark.parametrize(("overlay", "name"), EVERY_DEPLOYMENT)
def test_read_only_root_has_a_writable_tmp(overlay: str, name: str) -> None:
    volumes = {v["name"]: v for v in _pod(name, overlay).get("volumes", [])}
    for container in _containers(name, overlay):
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{name}/{container['name']} has no /tmp"
        assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize(("overlay", "name"), EVERY_DEPLOYMENT)
def test_containers_have_requests_and_limits(overlay: str, name: str) -> None:
    for container in _containers(name, overlay):
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                where = f"{overlay}: {name}/{container['name']}"
                assert resources.get(bound, {}).get(resource), f"{where} has no {resource} {bound}"


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
def test_http_services_probe_themselves_on_the_port_their_service_targets(name: str) -> None:
    target = _target_container_port(name)
    (container,) = _containers(name)
    readiness = container.get("readinessProbe", {})
    # Not /health, which asks the backends: one of them down would make every gateway unready.
    assert readiness.get("httpGet", {}).get("path") == "/ready"
    assert container["livenessProbe"].get("httpGet", {}).get("path") == "/live"
    assert _probe_port(container, readiness) == target
    assert _probe_port(container, container["livenessProbe"]) == target
    env = {e["name"]: _env_value(e) for e in container.get("env", [])}
    assert env.get("HTTP_PORT") == str(target)
    assert env.get("HTTP_HOST") in ("0.0.0.0", "[::]"), f"{name}: HTTP_HOST is not set"


@pytest.mark.parametrize(("overlay", "name"), EVERY_DEPLOYMENT)
def test_termination_grace_outlasts_the_drain(overlay: str, name: str) -> None:
    pod = _pod(name, overlay)
    grace = pod.get("terminationGracePeriodSeconds", 30)  # the Kubernetes default
    for container in _containers(name, overlay):
        env = {e["name"]: e for e in container.get("env", [])}
        drain = DEFAULT_SHUTDOWN_GRACE
        if "SHUTDOWN_GRACE_SECONDS" in env:
            value = _env_value(env["SHUTDOWN_GRACE_SECONDS"], overlay)
            assert value is not None, "SHUTDOWN_GRACE_SECONDS must not be a secret"
            drain = float(value)
        # The dispatcher also lets calls in progress end after the gRPC drain.
        if "CALL_DRAIN_SECONDS" in env:
            drain += float(_env_value(env["CALL_DRAIN_SECONDS"], overlay) or 0)
        needed = drain + _prestop_seconds(container)
        assert grace > needed, f"{overlay}: {name}: grace {grace}s does not outlast {needed}s of drain"


@pytest.mark.parametrize("overlay", sorted(RENDERED))
def test_env_references_resolve(overlay: str) -> None:
    configmaps, secrets = _of_kind("ConfigMap", RENDERED[overlay]), _of_kind("Secret", RENDERED[overlay])
    for name in _of_kind("Deployment", RENDERED[overlay]):
        for container in _containers(name, overlay):
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                if "configMapKeyRef" in source:
                    ref, objects, field = source["configMapKeyRef"], configmaps, "data"
                elif "secretKeyRef" in source:
                    ref, objects, field = source["secretKeyRef"], secrets, "stringData"
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


@pytest.mark.parametrize("overlay", sorted(RENDERED))
def test_grpc_callers_resolve_every_pod_of_a_headless_service(overlay: str) -> None:
    """A gRPC client keeps one connection: through a Service's virtual IP all its calls would
    go to one pod. Callers dial `dns:///` names of headless Services instead (runtime/rpc.py
    balances those over every address), straight to the pods' own port."""
    services = _of_kind("Service", RENDERED[overlay])
    addrs = {f"{name.upper()}_ADDR": name for name in GRPC_SERVICES}
    config = _of_kind("ConfigMap", RENDERED[overlay])["pregonero-config"]["data"]
    assert addrs.keys() <= config.keys()
    dialed: set[str] = set()
    for deployment in _of_kind("Deployment", RENDERED[overlay]):
        for container in _containers(deployment, overlay):
            for env in container.get("env", []):
                if env["name"] not in addrs:
                    continue
                value = _env_value(env, overlay) or ""
                assert value.startswith("dns:///"), f"{overlay}: {deployment}: {env['name']}={value!r}"
                host, _, port = value.removeprefix("dns:///").rpartition(":")
                name, _, domain = host.partition(".")
                assert name == addrs[env["name"]], f"{overlay}: {deployment}: {env['name']} names {host}"
                assert not domain or domain.split(".")[0] == NAMESPACE
                assert int(port) == _target_container_port(name), f"{env['name']}: not the pods' port"
                dialed.add(name)
    assert dialed == set(GRPC_SERVICES)
    for name in dialed:
        assert services[name]["spec"].get("clusterIP") == "None", f"{overlay}: Service {name} is not headless"


# Consumers whose lag is the work a service has to do: its replicas follow it (KEDA). The
# request-driven services follow CPU (HPA): accounts' own consumers only write ledger rows.
SCALED_ON_LAG = {"dispatcher": ("DISPATCH", "dispatch-whatsapp"), "campaigns": ("EVENTS", "campaigns-results")}
SCALED_ON_CPU = ("gateway", "accounts")


@pytest.mark.parametrize("overlay", sorted(RENDERED))
@pytest.mark.parametrize("name", sorted(SCALED_ON_LAG))
def test_keda_scales_the_consumers_on_their_lag(overlay: str, name: str) -> None:
    from services.runtime.nats_auth import ROLES

    stream, durable = SCALED_ON_LAG[name]
    assert any((c.stream, c.durable) == (stream, durable) for c in ROLES[name].consumers), "no such consumer"
    (scaled,) = [
        s for s in _of_kind("ScaledObject", RENDERED[overlay]).values() if s["spec"]["scaleTargetRef"]["name"] == name
    ]
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert name in _of_kind("Deployment", RENDERED[overlay])
    triggers = [t["metadata"] for t in scaled["spec"]["triggers"] if t["type"] == "nats-jetstream"]
    ours = [t for t in triggers if t["consumer"] == durable]
    assert ours, f"no nats-jetstream trigger on the {durable} consumer"
    for meta in ours:
        assert meta["stream"] == stream and meta["account"] == "$G"
        assert int(meta["lagThreshold"]) > 0
        assert meta["natsServerMonitoringEndpoint"] == "nats-headless.pregonero.svc.cluster.local:8222"
    # Both serve gRPC calls as well: never scaled to zero.
    assert scaled["spec"].get("minReplicaCount", 0) >= 1
    assert scaled["spec"]["maxReplicaCount"] >= scaled["spec"]["minReplicaCount"]


@pytest.mark.parametrize("overlay", sorted(RENDERED))
def test_each_deployment_has_one_autoscaler_and_no_fixed_replicas(overlay: str) -> None:
    docs = RENDERED[overlay]
    hpas = {h["spec"]["scaleTargetRef"]["name"] for h in _of_kind("HorizontalPodAutoscaler", docs).values()}
    scaled = {s["spec"]["scaleTargetRef"]["name"] for s in _of_kind("ScaledObject", docs).values()}
    # KEDA makes an HPA of its own for a ScaledObject: a second one on the same target fights it.
    assert not hpas & scaled, f"{hpas & scaled} have both an HPA and a ScaledObject"
    assert hpas == set(SCALED_ON_CPU) and scaled == set(SCALED_ON_LAG)
    deployments = _of_kind("Deployment", docs)
    assert hpas | scaled == set(deployments), "every Deployment needs exactly one autoscaler"
    for name, hpa in _of_kind("HorizontalPodAutoscaler", docs).items():
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], name
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu", name
    for name, deployment in deployments.items():
        # A fixed count would reset the autoscaler's choice on every apply.
        assert "replicas" not in deployment["spec"], f"{overlay}: {name} sets replicas"


@pytest.mark.parametrize("overlay", sorted(RENDERED))
def test_every_deployment_has_a_disruption_budget_for_its_pods(overlay: str) -> None:
    """A drain evicts one pod of a service at a time, and never blocks on a single replica."""
    budgets = _of_kind("PodDisruptionBudget", RENDERED[overlay])
    for name, deployment in _of_kind("Deployment", RENDERED[overlay]).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selecting = [b for b in budgets.values() if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(selecting) == 1, f"{overlay}: {name} is selected by {len(selecting)} PodDisruptionBudgets"
        (budget,) = selecting
        assert set(budget["spec"]["selector"]) == {"matchLabels"}
        assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        # maxUnavailable 1 (not minAvailable 1, which forbids every eviction of a lone replica).
        assert budget["spec"].get("maxUnavailable") == 1 and "minAvailable" not in budget["spec"], name
        assert budget["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    for budget in budgets.values():
        selector = budget["spec"]["selector"]["matchLabels"]
        assert any(
            selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in _of_kind("Deployment", RENDERED[overlay]).values()
        ), f"PodDisruptionBudget {budget['metadata']['name']} selects no pod"


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


def _resolved_env(name: str, overlay: str = PRODUCTION) -> dict[str, str]:
    """The container's environment as the overlay's example ConfigMap and Secrets give it."""
    secrets = _of_kind("Secret", RENDERED[overlay])
    out: dict[str, str] = {}
    for env in _containers(name, overlay)[0].get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        value = _env_value(env, overlay) if ref is None else secrets[ref["name"]]["stringData"][ref["key"]]
        if value is not None:
            out[env["name"]] = value
    return out


def test_production_names_real_providers_and_takes_the_voice_key_from_a_secret() -> None:
    from services.dispatcher.config import DispatcherSettings

    env = {e["name"]: e for e in _containers("dispatcher")[0]["env"]}
    resolved = _resolved_env("dispatcher")
    assert resolved["ENVIRONMENT"] not in ("development", "test") and resolved["PREGONERO_DEMO"] == "false"
    assert resolved["VOICE_PROVIDER"] != "simulated" and resolved["DEFAULT_DEVICE_PROVIDER"] != "simulated"
    assert env["RETELL_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] in SECRETS
    for name in ("RETELL_AGENT_ID", "RETELL_FROM_NUMBER"):
        assert "configMapKeyRef" in env[name]["valueFrom"], f"{name} is the operator's to set in the ConfigMap"
    # The shipped placeholders stop the rollout (as every `changeme` does) instead of calling with them.
    real = {"NATS_URL": "nats://dispatcher:s3cret@nats:4222", "PREGONERO_SECRET_KEY": "k" * 40}
    as_shipped = {k.lower(): v for k, v in {**resolved, **real}.items()}
    with pytest.raises(ValueError, match="RETELL_API_KEY, RETELL_AGENT_ID, RETELL_FROM_NUMBER outside development"):
        DispatcherSettings(**as_shipped)
    retell = {"retell_api_key": "key", "retell_agent_id": "agent_1", "retell_from_number": "+56221234567"}
    assert DispatcherSettings(**{**as_shipped, **retell}).voice_provider == "retell"


def test_dev_runs_the_simulated_providers_and_still_refuses_placeholder_secrets() -> None:
    from services.dispatcher.config import DispatcherSettings

    resolved = _resolved_env("dispatcher", "dev")
    assert resolved["ENVIRONMENT"] not in ("development", "test") and resolved["PREGONERO_DEMO"] == "true"
    as_shipped = {k.lower(): v for k, v in resolved.items()}
    with pytest.raises(ValueError, match="outside development"):
        DispatcherSettings(**as_shipped)
    real = {"nats_url": "nats://dispatcher:s3cret@nats:4222", "pregonero_secret_key": "k" * 40}
    settings = DispatcherSettings(**{**as_shipped, **real})
    assert settings.voice_provider == "simulated" and settings.simulation_allowed


@pytest.mark.parametrize("overlay", sorted(RENDERED))
def test_the_gateway_holds_no_database_credentials(overlay: str) -> None:
    assert "DATABASE_URL" not in {e["name"] for e in _containers("gateway", overlay)[0]["env"]}
