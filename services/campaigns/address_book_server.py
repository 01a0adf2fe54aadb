"""gRPC servicer of the address book: proto in, domain call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
from google.protobuf import empty_pb2
from pregonero.campaigns.v1 import address_book_pb2 as pb
from pregonero.campaigns.v1 import address_book_pb2_grpc

from services.runtime.errors import InvalidArgument
from services.runtime.identity import current_caller
from services.runtime.protos import to_timestamp

from .address_book import AddressBook, ContactPatch, ImportRequest

DEFAULT_LIMIT = 100


def contact_pb(row: asyncpg.Record) -> pb.Contact:
    return pb.Contact(
        id=str(row["contact_id"]),
        account_id=row["account_id"],
        name=row["name"],
        phone=row["phone"],
        email=row["email"],
        is_active=row["is_active"],
        group_ids=[str(g) for g in row["group_ids"]],
        created_at=to_timestamp(row["created_at"]),
        updated_at=to_timestamp(row["updated_at"]),
    )


def group_pb(row: asyncpg.Record) -> pb.Group:
    return pb.Group(
        id=str(row["group_id"]),
        account_id=row["account_id"],
        name=row["name"],
        description=row["description"],
        contact_count=row["contact_count"],
        created_at=to_timestamp(row["created_at"]),
        updated_at=to_timestamp(row["updated_at"]),
        created_by=row["created_by"],
    )


def opt_out_pb(row: asyncpg.Record) -> pb.OptOut:
    return pb.OptOut(
        account_id=row["account_id"],
        phone=row["phone"],
        source=row["source"],
        created_at=to_timestamp(row["created_at"]),
    )


def _optional_bool(message: object, name: str) -> bool | None:
    return getattr(message, name) if message.HasField(name) else None  # type: ignore[attr-defined]


class AddressBookServicer(address_book_pb2_grpc.AddressBookServiceServicer):
    def __init__(self, book: AddressBook) -> None:
        self.book = book

    # --- contacts ---

    async def ListContacts(
        self, request: pb.ListContactsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListContactsResponse:
        rows, total = await self.book.list_contacts(
            current_caller(),
            account_id=request.account_id,
            search=request.search,
            group_id=request.group_id,
            is_active=_optional_bool(request, "is_active"),
            limit=request.limit or DEFAULT_LIMIT,
            offset=request.offset,
        )
        return pb.ListContactsResponse(contacts=[contact_pb(r) for r in rows], total=total)

    async def GetContact(self, request: pb.ContactRef, context: grpc.aio.ServicerContext) -> pb.Contact:
        return contact_pb(await self.book.get_contact(current_caller(), request.contact_id))

    async def CreateContact(self, request: pb.CreateContactRequest, context: grpc.aio.ServicerContext) -> pb.Contact:
        row = await self.book.create_contact(
            current_caller(),
            account_id=request.account_id,
            name=request.name,
            phone=request.phone,
            email=request.email,
            is_active=request.is_active if request.HasField("is_active") else True,
            group_ids=list(request.group_ids),
            country=request.country,
        )
        return contact_pb(row)

    async def UpdateContact(self, request: pb.UpdateContactRequest, context: grpc.aio.ServicerContext) -> pb.Contact:
        patch = ContactPatch(
            name=request.name if request.HasField("name") else None,
            phone=request.phone if request.HasField("phone") else None,
            email=request.email if request.HasField("email") else None,
            is_active=_optional_bool(request, "is_active"),
        )
        row = await self.book.update_contact(current_caller(), request.contact_id, patch, country=request.country)
        return contact_pb(row)

    async def DeleteContact(self, request: pb.ContactRef, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self.book.delete_contact(current_caller(), request.contact_id)
        return empty_pb2.Empty()

    async def ImportContacts(
        self, request_iterator: AsyncIterator[pb.ImportContactsRequest], context: grpc.aio.ServicerContext
    ) -> pb.ImportResult:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("an import must start with its header")
        header = first.header

        async def chunks() -> AsyncIterator[bytes]:
            async for part in request_iterator:
                if part.HasField("chunk"):
                    yield part.chunk

        outcome = await self.book.import_contacts(
            current_caller(),
            ImportRequest(
                account_id=header.account_id,
                file_name=header.file_name,
                group_id=header.group_id,
                on_duplicate=header.on_duplicate,
                country=header.country,
            ),
            chunks(),
        )
        return pb.ImportResult(
            created=outcome.created,
            updated=outcome.updated,
            skipped=outcome.skipped,
            invalid=outcome.invalid,
            invalid_rows=[pb.InvalidRow(row=r.row, value=r.value, reason=r.reason) for r in outcome.invalid_rows],
            group_id=str(outcome.group_id) if outcome.group_id else "",
        )

    # --- groups ---

    async def ListGroups(
        self, request: pb.ListGroupsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListGroupsResponse:
        rows, total = await self.book.list_groups(
            current_caller(),
            account_id=request.account_id,
            search=request.search,
            limit=request.limit or DEFAULT_LIMIT,
            offset=request.offset,
        )
        return pb.ListGroupsResponse(groups=[group_pb(r) for r in rows], total=total)

    async def GetGroup(self, request: pb.GroupRef, context: grpc.aio.ServicerContext) -> pb.Group:
        return group_pb(await self.book.get_group(current_caller(), request.group_id))

    async def CreateGroup(self, request: pb.CreateGroupRequest, context: grpc.aio.ServicerContext) -> pb.Group:
        row = await self.book.create_group(
            current_caller(), account_id=request.account_id, name=request.name, description=request.description
        )
        return group_pb(row)

    async def UpdateGroup(self, request: pb.UpdateGroupRequest, context: grpc.aio.ServicerContext) -> pb.Group:
        row = await self.book.update_group(
            current_caller(),
            request.group_id,
            name=request.name if request.HasField("name") else None,
            description=request.description if request.HasField("description") else None,
        )
        return group_pb(row)

    async def DeleteGroup(self, request: pb.GroupRef, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self.book.delete_group(current_caller(), request.group_id)
        return empty_pb2.Empty()

    async def ListGroupContacts(
        self, request: pb.ListGroupContactsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListContactsResponse:
        rows, total = await self.book.group_contacts(
            current_caller(),
            request.group_id,
            search=request.search,
            is_active=_optional_bool(request, "is_active"),
            limit=request.limit or DEFAULT_LIMIT,
            offset=request.offset,
        )
        return pb.ListContactsResponse(contacts=[contact_pb(r) for r in rows], total=total)

    async def AddGroupContacts(
        self, request: pb.AddGroupContactsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AddGroupContactsResponse:
        added, group = await self.book.add_group_contacts(current_caller(), request.group_id, list(request.contact_ids))
        return pb.AddGroupContactsResponse(added=added, group=group_pb(group))

    async def RemoveGroupContact(
        self, request: pb.RemoveGroupContactRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        await self.book.remove_group_contact(current_caller(), request.group_id, request.contact_id)
        return empty_pb2.Empty()

    # --- opt-outs ---

    async def AddOptOut(self, request: pb.AddOptOutRequest, context: grpc.aio.ServicerContext) -> pb.AddOptOutResponse:
        row, created = await self.book.add_opt_out(
            current_caller(),
            account_id=request.account_id,
            phone=request.phone,
            source=request.source,
            country=request.country,
        )
        return pb.AddOptOutResponse(opt_out=opt_out_pb(row), created=created)

    async def ListOptOuts(
        self, request: pb.ListOptOutsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListOptOutsResponse:
        rows, total = await self.book.list_opt_outs(
            current_caller(), account_id=request.account_id, limit=request.limit or DEFAULT_LIMIT, offset=request.offset
        )
        return pb.ListOptOutsResponse(opt_outs=[opt_out_pb(r) for r in rows], total=total)

    async def DeleteOptOut(self, request: pb.DeleteOptOutRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self.book.delete_opt_out(
            current_caller(), account_id=request.account_id, phone=request.phone, country=request.country
        )
        return empty_pb2.Empty()
