"""Wiring: settings → runtime → repository → domain → servicer."""

from __future__ import annotations

from pathlib import Path

import grpc
from pregonero.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc

from services.runtime.db import check_queries
from services.runtime.lifecycle import Runtime, serve_grpc

from .config import DispatcherSettings
from .repo import DispatcherRepo, Q
from .server import DispatcherServicer

MIGRATIONS = Path(__file__).parent / "migrations"


async def setup(rt: Runtime, server: grpc.aio.Server) -> list[str]:
    assert rt.pool is not None
    await check_queries(rt.pool, Q)
    dispatcher_pb2_grpc.add_DispatcherServiceServicer_to_server(DispatcherServicer(DispatcherRepo(rt.pool)), server)
    return [dispatcher_pb2.DESCRIPTOR.services_by_name["DispatcherService"].full_name]


async def main() -> None:
    await serve_grpc(DispatcherSettings(), schema="dispatcher", migrations=MIGRATIONS, setup=setup)
