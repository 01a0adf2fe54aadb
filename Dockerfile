# One image for every service; each Deployment picks the module to run
# (`python -m services.<name>`). It holds exactly requirements.lock, the runtime set that
# `make lock` derives from pyproject.toml; tests/deploy/test_image_lock.py installs that set the
# way this file does and starts every service from it.
#
# Both stages use one base, Debian 12 (glibc 2.36, what the locks are pinned for), so the venv
# built in the first runs unchanged in the second.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1

WORKDIR /src

# The build tools (uv, grpcio-tools), hash-checked, in a venv the final stage leaves behind.
COPY requirements-build.lock requirements.lock ./
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes --no-deps -r requirements-build.lock

# The runtime set, exactly: every file hash-checked, wheels only (--no-build: no compiler in
# either stage), byte-compiled here because the root filesystem is read-only at run time.
RUN python -m venv --without-pip /opt/venv \
    && /opt/build/bin/uv pip sync --python /opt/venv/bin/python --require-hashes --strict --no-build \
       --compile-bytecode requirements.lock

# Same command as `make protos`, into the gen/ the code expects on PYTHONPATH.
COPY protos ./protos
RUN mkdir gen \
    && /opt/build/bin/python -m grpc_tools.protoc -I protos \
       --python_out=gen --grpc_python_out=gen --pyi_out=gen \
       $(find protos -name '*.proto')


FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app/gen:/app

# uid/gid 10001 match runAsUser/runAsGroup in deploy/k8s.
RUN groupadd --system --gid 10001 pregonero \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin pregonero

WORKDIR /app

COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/gen /app/gen
COPY services /app/services
RUN python -m compileall -q /app/services /app/gen

USER 10001:10001

ENTRYPOINT ["python"]
