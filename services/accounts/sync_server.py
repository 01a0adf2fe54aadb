"""gRPC servicer of offline operations: proto in, domain call, proto out."""

from __future__ import annotations

import grpc
from pregonero.accounts.v1 import sync_pb2, sync_pb2_grpc

from services.runtime.identity import current_caller

from .sync_operations import CLAIMED, CONFLICT, FINISHED, PENDING, SyncOperations

_STATES = {
    CLAIMED: sync_pb2.ClaimOperationResponse.CLAIMED,
    FINISHED: sync_pb2.ClaimOperationResponse.FINISHED,
    PENDING: sync_pb2.ClaimOperationResponse.PENDING,
    CONFLICT: sync_pb2.ClaimOperationResponse.CONFLICT,
}


class SyncServicer(sync_pb2_grpc.SyncServiceServicer):
    def __init__(self, operations: SyncOperations) -> None:
        self.operations = operations

    async def ClaimOperation(
        self, request: sync_pb2.ClaimOperationRequest, context: grpc.aio.ServicerContext
    ) -> sync_pb2.ClaimOperationResponse:
        claim = await self.operations.claim(
            current_caller(),
            client_op_id=request.client_op_id,
            method=request.method,
            path=request.path,
            digest=request.digest,
        )
        return sync_pb2.ClaimOperationResponse(state=_STATES[claim.state], status=claim.status, body_json=claim.body)

    async def FinishOperation(
        self, request: sync_pb2.FinishOperationRequest, context: grpc.aio.ServicerContext
    ) -> sync_pb2.FinishOperationResponse:
        await self.operations.finish(
            current_caller(), client_op_id=request.client_op_id, status=request.status, body=request.body_json
        )
        return sync_pb2.FinishOperationResponse()

    async def ReleaseOperation(
        self, request: sync_pb2.ReleaseOperationRequest, context: grpc.aio.ServicerContext
    ) -> sync_pb2.ReleaseOperationResponse:
        released = await self.operations.release(current_caller(), client_op_id=request.client_op_id)
        return sync_pb2.ReleaseOperationResponse(released=released)
