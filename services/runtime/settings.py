"""Settings base: environment only, built once at start and passed in."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values that must never reach production: they are the development defaults.
PLACEHOLDER_SECRETS = frozenset({"", "changeme", "dev-secret-change-me"})


class BaseServiceSettings(BaseSettings):
    """What every process reads; each service subclasses it with its own fields."""

    # hide_input_in_errors: a settings error would otherwise print every value given, keys included.
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True, hide_input_in_errors=True)

    service_name: str = "pregonero"
    environment: str = "development"  # development | test | production
    log_level: str = "INFO"
    database_url: str
    nats_url: str = "nats://127.0.0.1:4222"
    # Seconds in-flight RPCs get to finish after SIGTERM; the k8s grace period is longer.
    shutdown_grace_seconds: float = 10.0
    db_pool_min: int = 1
    db_pool_max: int = 10
    # This service's Ed25519 key, which signs its calls to the others, and every service's
    # public key (`gateway:<key>,accounts:<key>,...`; a service twice while its key rotates).
    # See runtime/service_auth.py; `make run` and the tests generate a set per stack.
    service_signing_key: SecretStr = SecretStr("")
    service_public_keys: str = ""
    # Where this process serves its Prometheus metrics (/metrics): 0 takes a free port (logged).
    # Its own port, never behind the public edge; deploy/k8s sets 9464 on 0.0.0.0.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"

    @property
    def is_development(self) -> bool:
        return self.environment in ("development", "test")

    @model_validator(mode="after")
    def _nats_user_outside_development(self) -> BaseServiceSettings:
        # Each service logs in to NATS as its own user, allowed only its subjects
        # (runtime/nats_auth.py): without one, or with the example password, any pod could
        # publish results that charge credit, or read every tenant's queued messages.
        if not self.is_development:
            url = urlsplit(self.nats_url.split(",")[0])
            reject_placeholders(self, **{"the NATS user and password in NATS_URL": url.password or ""})
        return self


class GrpcServiceSettings(BaseServiceSettings):
    grpc_port: int = 50051
    grpc_host: str = "127.0.0.1"

    @property
    def grpc_listen(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"


def reject_placeholders(settings: BaseServiceSettings, **secrets: str) -> None:
    """Outside development a placeholder secret is a configuration error, not a default."""
    if settings.is_development:
        return
    bad = [name for name, value in secrets.items() if value in PLACEHOLDER_SECRETS]
    if bad:
        raise ValueError(f"set real values for {', '.join(bad)} outside development")
