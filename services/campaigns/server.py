"""gRPC servicer: proto in, domain call, proto out."""

from __future__ import annotations

from pregonero.campaigns.v1 import campaigns_pb2_grpc

from .repo import CampaignsRepo


class CampaignsServicer(campaigns_pb2_grpc.CampaignsServiceServicer):
    def __init__(self, repo: CampaignsRepo) -> None:
        self.repo = repo
