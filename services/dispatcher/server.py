"""gRPC servicer: proto in, domain call, proto out."""

from __future__ import annotations

from pregonero.dispatcher.v1 import dispatcher_pb2_grpc

from .repo import DispatcherRepo


class DispatcherServicer(dispatcher_pb2_grpc.DispatcherServiceServicer):
    def __init__(self, repo: DispatcherRepo) -> None:
        self.repo = repo
