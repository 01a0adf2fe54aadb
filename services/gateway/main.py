"""Process entry: settings → app → uvicorn, which handles SIGTERM with a graceful drain."""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn

from services.runtime.logs import setup_logging
from services.runtime.tracing import setup_tracing

from .app import create_app
from .config import GatewaySettings
from .socket_auth import hide_tokens_from_logs


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """uvicorn drains on SIGTERM, then raises the signal again for the handler it found: this
    one, so a clean stop ends with status 0 as the other services' do (the default handler
    would end it "killed by SIGTERM"). Before uvicorn takes over, it simply ends the process."""
    raise SystemExit(0)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_cleanly)
    settings = GatewaySettings()
    setup_logging(settings.service_name, settings.log_level)
    setup_tracing(settings.service_name)
    hide_tokens_from_logs()
    config = uvicorn.Config(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        # The client address is read in one place, Authenticator.client_address, against
        # PREGONERO_TRUSTED_PROXIES. uvicorn's own X-Forwarded-For handling would replace the
        # peer for any loopback caller (its default FORWARDED_ALLOW_IPS), whoever that is.
        proxy_headers=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        ws_ping_interval=20,
        timeout_keep_alive=settings.http_keep_alive_seconds,
    )
    uvicorn.Server(config).run()
