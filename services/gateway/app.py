"""The FastAPI application: routes, error bodies, CORS, request ids, lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from pregonero.accounts.v1 import auth_pb2_grpc

from services.runtime import bus, tracing
from services.runtime.lifecycle import Runtime
from services.runtime.logs import REQUEST_ID_KEY, new_request_id, request_id_var

from . import docs, errors
from .auth import Authenticator, GrpcDirectory
from .body_limits import BodyLimits
from .clients import Backends
from .config import GatewaySettings
from .job_socket import LiveHub
from .request_metrics import RequestMetrics
from .routes import (
    accounts,
    admin,
    auth,
    batches,
    bulk,
    dashboard,
    devices,
    exports,
    jobs,
    notifications,
    reports,
    system,
    wablas_webhook,
    waha_webhook,
    webhooks,
    ws,
)
from .routes import address_book as address_book_routes
from .routes import health as health_routes
from .routes import scheduled_messages as scheduled_messages_routes
from .routes import sync as sync_routes
from .socket_auth import SocketWatch
from .socket_limit import SocketLimit
from .stream_metrics import sample_streams_forever
from .user_socket import NotificationHub

log = logging.getLogger("pregonero.gateway.access")


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = Runtime(settings)
        rt.serve_metrics()
        # No pool: the gateway keeps no data; /health hears of the database from the backends.
        await rt.open(schema=None, migrations=None, database=False)
        app.state.runtime = rt
        # The streams' backlog and dead letters, read here: the gateway may list every consumer.
        assert rt.js is not None
        streams = (bus.DISPATCH_STREAM, bus.EVENTS_STREAM)
        rt.spawn(sample_streams_forever(rt.js, streams, dead_letters=bus.DEADLETTER_STREAM), name="streams")
        app.state.backends = Backends(settings, rt.keyring)
        app.state.auth_rpc = auth_pb2_grpc.AuthServiceStub(app.state.backends.channels["accounts"])
        app.state.auth.attach(GrpcDirectory(app.state.auth_rpc, app.state.backends.accounts))
        app.state.live = LiveHub()
        await app.state.live.start(rt.nc)
        app.state.notifications = NotificationHub()
        await app.state.notifications.start(rt.nc)
        try:
            yield
        finally:
            await app.state.notifications.stop()
            await app.state.live.stop()
            await app.state.backends.close()
            await rt.close()

    app = FastAPI(
        title="Pregonero API",
        version="1.0.0",
        description="Outbound campaigns: AI voice calls and bulk WhatsApp, with prepaid credits.",
        lifespan=lifespan,
        responses=errors.ERROR_RESPONSES,
        docs_url=None,  # served from the suite's own files (docs.py)
        redoc_url=None,
    )
    docs.install(app)
    app.state.settings = settings
    # Built here, not in lifespan, so a malformed token list fails the start at once.
    app.state.auth = Authenticator(settings)
    app.state.socket_watch = SocketWatch(app.state.auth, recheck_seconds=settings.pregonero_socket_recheck_seconds)
    app.state.socket_limit = SocketLimit(
        per_second=settings.pregonero_ws_connects_per_second, burst=settings.pregonero_ws_connect_burst
    )
    errors.install(app)
    # Inside CORS, so a refusal before the body still carries its headers.
    app.add_middleware(BodyLimits)
    origins = settings.cors_origin_list()
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        # A wildcard origin cannot be combined with credentials in browsers.
        allow_credentials="*" not in origins,
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["X-Total-Count", "X-Request-Id"],
    )
    # Outermost: every answer is counted, refusals and preflights included.
    app.add_middleware(RequestMetrics)

    @app.middleware("http")
    async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        rid = request.headers.get(REQUEST_ID_KEY) or new_request_id()
        request_id_var.set(rid)
        started = time.perf_counter()
        response = await call_next(request)
        response.headers[REQUEST_ID_KEY] = rid
        log.info(
            "%s %s %d",
            request.method,
            request.url.path,
            response.status_code,
            extra={"fields": {"ms": round((time.perf_counter() - started) * 1000, 1)}},
        )
        return response

    app.include_router(system.router)
    app.include_router(health_routes.router)
    app.include_router(sync_routes.router)
    app.include_router(auth.router)
    app.include_router(devices.router)
    app.include_router(bulk.router)
    app.include_router(exports.router)
    app.include_router(reports.router)
    app.include_router(accounts.router)
    app.include_router(ws.router)
    app.include_router(notifications.router)
    app.include_router(batches.router)
    app.include_router(jobs.router)
    app.include_router(dashboard.router)
    app.include_router(webhooks.router)
    app.include_router(wablas_webhook.router)
    app.include_router(waha_webhook.router)
    app.include_router(admin.router)
    app.include_router(scheduled_messages_routes.router)
    app.include_router(address_book_routes.router)
    tracing.instrument_app(app)
    return app
