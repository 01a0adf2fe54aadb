# One image for every service; each Deployment picks the module to run
# (`python -m services.<name>`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# uid/gid 10001 match runAsUser/runAsGroup in deploy/k8s.
RUN groupadd --system --gid 10001 pregonero \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin pregonero

WORKDIR /app

# Dependencies before the source, so code edits do not reinstall them.
RUN pip install --no-cache-dir \
        grpcio grpcio-tools grpcio-health-checking grpcio-reflection protobuf \
        nats-py asyncpg fastapi uvicorn pydantic-settings python-multipart \
        openpyxl websockets httpx

COPY . /app

# Same command as `make protos`, into the same `gen/` the code expects on PYTHONPATH.
RUN rm -rf gen && mkdir -p gen \
    && python -m grpc_tools.protoc -I protos \
       --python_out=gen --grpc_python_out=gen --pyi_out=gen \
       $(find protos -name '*.proto')

ENV PYTHONPATH=/app/gen:/app

USER 10001

ENTRYPOINT ["python"]
