"""Notifications (`/api/notifications`, the seed's shapes), their live push on
`ws /ws/{user_id}`, and the audit log for admins (`/api/v1/audit`). The accounts service
decides what a caller may see; this module only maps. How a socket authenticates, and when it
is closed for its credential: ../socket_auth.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response, WebSocket
from pregonero.accounts.v1 import notifications_pb2, notifications_pb2_grpc

from services.runtime.identity import Caller
from services.runtime.logs import REQUEST_ID_KEY, new_request_id, request_id_var
from services.runtime.protos import from_timestamp, iso

from ..auth import require_caller
from ..socket_auth import SocketWatch, client_messages, open_socket, refuse
from ..user_socket import WATCH_TYPES, NotificationHub, NotificationSocket, notification_json

log = logging.getLogger("pregonero.gateway.notifications")

router = APIRouter(tags=["notifications"])

CallerDep = Annotated[Caller, Depends(require_caller)]
NotificationId = Annotated[str, Path(min_length=1, max_length=20)]
AccountFilter = Annotated[str | None, Query(max_length=64, description="admins: one account's only")]


def stub(request: Request | WebSocket) -> notifications_pb2_grpc.NotificationsServiceStub:
    return notifications_pb2_grpc.NotificationsServiceStub(request.app.state.backends.channels["accounts"])


@router.get("/api/notifications", summary="Notifications, newest first (the total in X-Total-Count)")
async def list_notifications(
    request: Request,
    response: Response,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=100_000, description="how many of the newest to skip")] = 0,
    unread_only: bool = False,
    account_id: AccountFilter = None,
) -> list[dict[str, Any]]:
    reply = await stub(request).ListNotifications(
        notifications_pb2.ListNotificationsRequest(
            account_id=account_id or "", unread_only=unread_only, limit=limit, offset=offset
        ),
    )
    response.headers["X-Total-Count"] = str(reply.total)
    return [notification_json(n) for n in reply.notifications]


@router.get("/api/notifications/unread-count", summary="How many are unread")
async def unread_count(request: Request, caller: CallerDep, account_id: AccountFilter = None) -> dict[str, int]:
    reply = await stub(request).UnreadCount(
        notifications_pb2.UnreadCountRequest(account_id=account_id or ""),
    )
    return {"count": reply.count}


@router.put("/api/notifications/read-all", summary="Mark every notification read")
async def mark_all_read(request: Request, caller: CallerDep, account_id: AccountFilter = None) -> dict[str, Any]:
    reply = await stub(request).MarkAllRead(
        notifications_pb2.MarkAllReadRequest(account_id=account_id or ""),
    )
    return {"success": True, "updated": reply.updated}


async def _mark_read(request: Request, notification_id: str) -> dict[str, Any]:
    reply = await stub(request).MarkRead(
        notifications_pb2.NotificationRef(id=notification_id),
    )
    return {"success": True, "notification": notification_json(reply)}


@router.put("/api/notifications/{notification_id}/read", summary="Mark one read")
async def mark_read(request: Request, caller: CallerDep, notification_id: NotificationId) -> dict[str, Any]:
    return await _mark_read(request, notification_id)


@router.post("/api/notifications/mark-read/{notification_id}", summary="Mark one read (seed form)")
async def mark_read_seed(request: Request, caller: CallerDep, notification_id: NotificationId) -> dict[str, Any]:
    return await _mark_read(request, notification_id)


@router.delete("/api/notifications/{notification_id}", status_code=204, response_class=Response, summary="Delete one")
async def delete_notification(request: Request, caller: CallerDep, notification_id: NotificationId) -> Response:
    await stub(request).DeleteNotification(
        notifications_pb2.NotificationRef(id=notification_id),
    )
    # The guide's 204: no deployed client reads a body here (API_COMPAT.md names none).
    return Response(status_code=204)


@router.get("/api/v1/audit", tags=["audit"], summary="Audit log of critical actions (admin)")
async def list_audit(
    request: Request,
    response: Response,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    skip: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    action: Annotated[str | None, Query(max_length=64)] = None,
    account_id: AccountFilter = None,
) -> list[dict[str, Any]]:
    reply = await stub(request).ListAudit(
        notifications_pb2.ListAuditRequest(action=action or "", account_id=account_id or "", limit=limit, skip=skip),
    )
    response.headers["X-Total-Count"] = str(reply.total)
    return [
        {
            "id": e.id,
            "action": e.action,
            "target": e.target,
            "account_id": e.account_id or None,
            "actor": {"user_id": e.actor_user_id, "role": e.actor_role, "account_id": e.actor_account or None},
            "details": json.loads(e.details_json) if e.details_json else {},
            "at": iso(from_timestamp(e.at)),
        }
        for e in reply.entries
    ]


async def _read(websocket: WebSocket, hub: NotificationHub, sock: NotificationSocket) -> None:
    """Client messages: ping → pong, watch requests to the hub; anything else is ignored."""
    async for data in client_messages(websocket):
        if data.get("type") == "ping":
            sock.offer({"type": "pong", "timestamp": data.get("timestamp")})
        elif data.get("type") in WATCH_TYPES:
            hub.client_request(sock, data)


@router.websocket("/ws/{user_id}")
async def user_notifications(websocket: WebSocket, user_id: str) -> None:
    request_id_var.set(websocket.headers.get(REQUEST_ID_KEY) or new_request_id())
    opened = await open_socket(websocket)
    if opened is None:
        return
    caller = opened.principal.caller
    # A user's socket is its own; operator tokens and API keys name no user of the path.
    if not caller.is_admin and caller.user_id.startswith("usr-") and caller.user_id != user_id:
        await refuse(websocket, 4403, "forbidden", "not your notifications")
        return

    hub: NotificationHub = websocket.app.state.notifications
    sock = hub.subscribe(caller, websocket)
    sock.offer({"type": "authenticated", "user_id": user_id, "account_id": caller.account_id or None})
    sock.start()
    reader = asyncio.create_task(_read(websocket, hub, sock), name="notification-reader")
    try:
        watch: SocketWatch = websocket.app.state.socket_watch
        await watch.hold(websocket, opened, reader, stop=sock.stop)
    finally:
        hub.unsubscribe(sock)
        await sock.stop()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
