"""Forged identities inside the cluster: a client that reaches the services' gRPC ports but
holds no service key gets nothing, whatever metadata it writes.

Every RPC of every service is called directly, as a pod in the cluster could, with the plain
metadata of an admin (what the services believed before calls were signed), then with a token
signed by a key of its own that claims to be the gateway. Each is refused before its handler
runs. The RPCs that move money are tried as an operator would want them refused: the gateway
itself may not hold or capture credit, and no service but the gateway may act for an admin.
Afterwards the account the forged calls named does not exist and holds no ledger entry."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import asyncpg
import grpc
from google.protobuf import message_factory
from pregonero.accounts.v1 import accounts_pb2, accounts_pb2_grpc, auth_pb2, notifications_pb2, sync_pb2
from pregonero.campaigns.v1 import address_book_pb2, campaigns_pb2, messages_pb2
from pregonero.dispatcher.v1 import dispatcher_pb2

from services.runtime.devstack import Stack
from services.runtime.identity import ADMIN, MEMBER, Caller
from services.runtime.service_auth import TOKEN_KEY, Keyring, new_signing_key

FORGED_ACCOUNT = f"forged-{uuid.uuid4().hex[:8]}"
ADMIN_MD = Caller(role=ADMIN, account_id=FORGED_ACCOUNT, user_id="attacker").metadata()

SERVICES = {
    "accounts": [
        accounts_pb2.DESCRIPTOR.services_by_name["AccountsService"],
        auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
        notifications_pb2.DESCRIPTOR.services_by_name["NotificationsService"],
        sync_pb2.DESCRIPTOR.services_by_name["SyncService"],
    ],
    "campaigns": [
        campaigns_pb2.DESCRIPTOR.services_by_name["CampaignsService"],
        messages_pb2.DESCRIPTOR.services_by_name["ScheduledMessagesService"],
        address_book_pb2.DESCRIPTOR.services_by_name["AddressBookService"],
    ],
    "dispatcher": [dispatcher_pb2.DESCRIPTOR.services_by_name["DispatcherService"]],
}
# Requests that would change something if served, naming the forged account.
BODIES = {
    "CreateAccount": {"account_id": FORGED_ACCOUNT, "initial_credits": "1000000"},
    "EnsureAccount": {"account_id": FORGED_ACCOUNT, "initial_credits": "1000000"},
    "TopUp": {"account_id": FORGED_ACCOUNT, "credits": "1000", "idempotency_key": "forged"},
    "Hold": {"account_id": FORGED_ACCOUNT, "hold_id": "forged", "amount": "1"},
    "CreateUser": {"email": "attacker@example.com", "password": "a long enough password", "role": "admin"},
}


def rpcs() -> Iterator[tuple[str, str, object]]:
    for service, descriptors in SERVICES.items():
        for descriptor in descriptors:
            for method in descriptor.methods:
                yield service, f"/{descriptor.full_name}/{method.name}", method


def _call(channel: grpc.Channel, path: str, method: object, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    request_class = message_factory.GetMessageClass(method.input_type)  # type: ignore[attr-defined]
    request = request_class(**BODIES.get(method.name, {}))  # type: ignore[attr-defined]
    kw = {"request_serializer": request_class.SerializeToString, "response_deserializer": lambda b: b}
    try:
        if method.client_streaming and method.server_streaming:  # type: ignore[attr-defined]
            list(channel.stream_stream(path, **kw)(iter([request]), metadata=metadata, timeout=10))
        elif method.client_streaming:  # type: ignore[attr-defined]
            channel.stream_unary(path, **kw)(iter([request]), metadata=metadata, timeout=10)
        elif method.server_streaming:  # type: ignore[attr-defined]
            list(channel.unary_stream(path, **kw)(request, metadata=metadata, timeout=10))
        else:
            channel.unary_unary(path, **kw)(request, metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return,attr-defined]
    return grpc.StatusCode.OK


def test_every_rpc_refuses_plain_admin_metadata_and_foreign_keys(suite: Stack) -> None:
    private, public = new_signing_key()
    impostors = {
        service: Keyring("gateway", signing_key=private, public_keys=f"gateway:{public}") for service in SERVICES
    }
    served: list[str] = []
    total = 0
    for service, path, method in rpcs():
        forged_token = impostors[service].token(service, Caller(role=ADMIN, account_id=FORGED_ACCOUNT))
        with grpc.insecure_channel(suite.addrs[service]) as channel:
            for md in (ADMIN_MD, ((TOKEN_KEY, forged_token),)):
                total += 1
                code = _call(channel, path, method, md)
                if code != grpc.StatusCode.UNAUTHENTICATED:
                    served.append(f"{path}: {code.name}")
    assert total > 150 and not served, served


def test_money_moves_only_on_the_flows_that_own_it(suite: Stack) -> None:
    hold = accounts_pb2.HoldRequest(account_id="default", hold_id=f"forged-{uuid.uuid4().hex[:6]}", amount="1")
    topup = accounts_pb2.TopUpRequest(account_id=FORGED_ACCOUNT, credits="1000", idempotency_key="forged")
    admin = Caller(role=ADMIN, account_id="default", user_id="op").metadata()
    member = Caller(role=MEMBER, account_id="default", user_id="op").metadata()
    with grpc.insecure_channel(suite.addrs["accounts"]) as channel:
        stub = accounts_pb2_grpc.AccountsServiceStub(channel)

        def code(call: object, request: object, keyring: Keyring, md: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
            try:
                call(request, metadata=keyring.sign_metadata("accounts", md), timeout=10)  # type: ignore[operator]
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return,attr-defined]
            return grpc.StatusCode.OK

        gateway, campaigns, dispatcher = (suite.keyring(s) for s in ("gateway", "campaigns", "dispatcher"))
        # Not even an operator, through the gateway, holds credit: only campaigns' feeder does.
        assert code(stub.Hold, hold, gateway, admin) == grpc.StatusCode.PERMISSION_DENIED
        assert code(stub.Hold, hold, dispatcher, member) == grpc.StatusCode.PERMISSION_DENIED
        # Campaigns acts for one account, never for an admin, and does not top up.
        assert code(stub.TopUp, topup, campaigns, admin) == grpc.StatusCode.PERMISSION_DENIED
        assert code(stub.TopUp, topup, campaigns, member) == grpc.StatusCode.PERMISSION_DENIED


async def test_nothing_the_forged_calls_named_exists(suite: Stack) -> None:
    conn = await asyncpg.connect(suite.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM accounts.accounts WHERE account_id = $1", FORGED_ACCOUNT) == 0
        assert (
            await conn.fetchval("SELECT count(*) FROM accounts.ledger_entries WHERE account_id = $1", FORGED_ACCOUNT)
            == 0
        )
        assert await conn.fetchval("SELECT count(*) FROM accounts.users WHERE email ILIKE 'attacker@%'") == 0
        assert await conn.fetchval("SELECT count(*) FROM accounts.holds WHERE hold_id LIKE 'forged%'") == 0
    finally:
        await conn.close()
