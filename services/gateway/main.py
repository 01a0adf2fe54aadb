"""Process entry: settings → app → uvicorn, which handles SIGTERM with a graceful drain."""

from __future__ import annotations

import uvicorn

from services.runtime.logs import setup_logging

from .app import create_app
from .config import GatewaySettings


def main() -> None:
    settings = GatewaySettings()
    setup_logging(settings.service_name, settings.log_level)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        proxy_headers=True,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        ws_ping_interval=20,
        timeout_keep_alive=settings.http_keep_alive_seconds,
    )
    uvicorn.Server(config).run()
