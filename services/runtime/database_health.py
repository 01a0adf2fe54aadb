"""The database's state, told by the services that use it through their gRPC health service.

The gateway keeps no data and holds no database credentials; its /health reports the
database as the backends reach it, by asking their health service about DATABASE. That check
runs `SELECT 1` when asked (bounded by CHECK_TIMEOUT_S): the probes ask about the server
(service ""), never about DATABASE, so a database outage never makes a backend unready."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2

# Not a gRPC service: the name a health check asks about to hear of the database.
DATABASE = "pregonero.database"
CHECK_TIMEOUT_S = 2.0

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthWithDatabase(health.aio.HealthServicer):
    """grpc's health service, which also answers about DATABASE from this process's pool."""

    def __init__(self, pool: asyncpg.Pool | None) -> None:
        super().__init__()
        self._pool = pool

    async def Check(  # noqa: N802 - the gRPC method's name
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if request.service != DATABASE or self._pool is None:
            return await super().Check(request, context)
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await self._pool.fetchval("SELECT 1")
        except Exception:  # noqa: BLE001 - any failure is the answer
            return health_pb2.HealthCheckResponse(status=NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=SERVING)
