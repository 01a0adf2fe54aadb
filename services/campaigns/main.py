"""Wiring: settings → runtime → repository → domain → servicer."""

from __future__ import annotations

from pathlib import Path

import grpc
from pregonero.campaigns.v1 import campaigns_pb2, campaigns_pb2_grpc

from services.runtime.db import check_queries
from services.runtime.lifecycle import Runtime, serve_grpc

from .config import CampaignsSettings
from .repo import CampaignsRepo, Q
from .server import CampaignsServicer

MIGRATIONS = Path(__file__).parent / "migrations"


async def setup(rt: Runtime, server: grpc.aio.Server) -> list[str]:
    assert rt.pool is not None
    await check_queries(rt.pool, Q)
    campaigns_pb2_grpc.add_CampaignsServiceServicer_to_server(CampaignsServicer(CampaignsRepo(rt.pool)), server)
    return [campaigns_pb2.DESCRIPTOR.services_by_name["CampaignsService"].full_name]


async def main() -> None:
    await serve_grpc(CampaignsSettings(), schema="campaigns", migrations=MIGRATIONS, setup=setup)
