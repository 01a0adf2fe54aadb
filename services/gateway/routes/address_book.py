"""The WhatsApp scheduler's address book (`/api/contacts`, `/api/groups`, `/api/opt-outs`), in
the guide's shapes: lists are plain arrays with X-Total-Count, ids are strings, creates answer
201 and deletes 204. The campaigns service owns the data, checks phones and scopes by
account; this module bounds the input, streams the import file and maps."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, Response, UploadFile
from pregonero.campaigns.v1 import address_book_pb2 as pb
from pregonero.campaigns.v1 import address_book_pb2_grpc as pb_grpc
from pydantic import BaseModel, ConfigDict, Field

from services.runtime.identity import Caller

from ..auth import require_caller
from ..errors import ApiError
from ..ids import INT64_MAX, MAX_ID_CHARS
from ..user_limits import per_user
from ..values import when
from .bulk import UPLOAD_PART
from .jobs import AccountFilter, scoped_account

router = APIRouter(tags=["address book"])

# An import of 200,000 rows takes campaigns a few seconds; the connection stays open meanwhile.
IMPORT_TIMEOUT_S = 300.0
# Checked here on the spooled upload so an oversized file never crosses to campaigns, which
# applies the same limit (and its row limit) as the bytes arrive.
MAX_IMPORT_BYTES = 20 * 1024 * 1024
IMPORT_SUFFIXES = (".csv", ".txt", ".xlsx", ".xlsm", ".xls")

CallerDep = Annotated[Caller, Depends(require_caller)]
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1)]  # the proto's int32
Search = Annotated[str | None, Query(max_length=200, description="in the name, or digits of the phone")]
Country = Literal["CL", "AR"]
IdText = Annotated[str, Field(max_length=MAX_ID_CHARS)]


def _key(text: str, what: str) -> str:
    """An id that cannot name a row (not a positive 64-bit number) is "not found" here."""
    text = text.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and 0 < int(text) <= INT64_MAX):
        raise ApiError(404, f"{what} {text[:MAX_ID_CHARS]} not found")
    return text


def _contact_id(contact_id: Annotated[str, Path(description="Contact id")]) -> str:
    return _key(contact_id, "contact")


def _group_id(group_id: Annotated[str, Path(description="Group id")]) -> str:
    return _key(group_id, "group")


ContactId = Annotated[str, Depends(_contact_id)]
GroupId = Annotated[str, Depends(_group_id)]


def stub(request: Request) -> pb_grpc.AddressBookServiceStub:
    return cast(pb_grpc.AddressBookServiceStub, request.app.state.backends.address_book)


# --- shapes ------------------------------------------------------------------------------------


def contact_json(c: pb.Contact) -> dict[str, Any]:
    return {
        "id": c.id,
        "account_id": c.account_id,
        "name": c.name,
        "phone": c.phone,
        "email": c.email or None,
        "is_active": c.is_active,
        "groups": list(c.group_ids),
        "created_at": when(c.created_at),
        "updated_at": when(c.updated_at),
    }


def group_json(g: pb.Group) -> dict[str, Any]:
    return {
        "id": g.id,
        "account_id": g.account_id,
        "name": g.name,
        "description": g.description,
        "contact_count": g.contact_count,
        "created_at": when(g.created_at),
        "updated_at": when(g.updated_at),
        "created_by": g.created_by,
    }


def opt_out_json(o: pb.OptOut) -> dict[str, Any]:
    return {"account_id": o.account_id, "phone": o.phone, "source": o.source, "created_at": when(o.created_at)}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A name goes into messages ({{name}}), listings and logs: no control characters (C0, DEL, C1).
NAME_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"


class ContactCreate(Strict):
    account_id: str | None = Field(None, max_length=64, description="admins; members get their own")
    name: str = Field("", max_length=200, pattern=NAME_PATTERN)
    phone: str = Field(..., min_length=1, max_length=64, description="E.164, or national in the account's country")
    email: str | None = Field(None, max_length=254)
    is_active: bool = True
    groups: list[IdText] = Field(default_factory=list, max_length=1000, description="group ids to join")
    country: Country | None = Field(None, description="how to read a national phone; default: the account's")


class ContactUpdate(Strict):
    """Any subset of the fields; "" clears the name or the email."""

    name: str | None = Field(None, max_length=200, pattern=NAME_PATTERN)
    phone: str | None = Field(None, min_length=1, max_length=64)
    email: str | None = Field(None, max_length=254)
    is_active: bool | None = None
    country: Country | None = None


class GroupCreate(Strict):
    account_id: str | None = Field(None, max_length=64, description="admins; members get their own")
    name: str = Field(..., min_length=1, max_length=200, pattern=NAME_PATTERN)
    description: str = Field("", max_length=2000)


class GroupUpdate(Strict):
    name: str | None = Field(None, min_length=1, max_length=200, pattern=NAME_PATTERN)
    description: str | None = Field(None, max_length=2000)


class GroupContactsAdd(Strict):
    contact_ids: list[IdText] = Field(..., min_length=1, max_length=1000)


class OptOutCreate(Strict):
    account_id: str | None = Field(None, max_length=64, description="admins; members get their own")
    phone: str = Field(..., min_length=1, max_length=64)
    country: Country | None = None


# --- contacts ----------------------------------------------------------------------------------


@router.get("/api/contacts", summary="Contacts, in creation order")
async def list_contacts(
    request: Request,
    response: Response,
    caller: CallerDep,
    search: Search = None,
    group_id: Annotated[str | None, Query(max_length=MAX_ID_CHARS)] = None,
    is_active: bool | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
    account_id: AccountFilter = None,
) -> list[dict[str, Any]]:
    message = pb.ListContactsRequest(
        account_id=scoped_account(caller, account_id),
        search=search or "",
        group_id=_key(group_id, "group") if group_id else "",
        limit=limit,
        offset=offset,
    )
    if is_active is not None:
        message.is_active = is_active
    reply = await stub(request).ListContacts(message)
    response.headers["X-Total-Count"] = str(reply.total)
    return [contact_json(c) for c in reply.contacts]


@router.post("/api/contacts", status_code=201, summary="Add a contact")
async def create_contact(request: Request, caller: CallerDep, body: ContactCreate) -> dict[str, Any]:
    message = pb.CreateContactRequest(
        account_id=scoped_account(caller, body.account_id),
        name=body.name,
        phone=body.phone,
        email=body.email or "",
        is_active=body.is_active,
        group_ids=[_key(g, "group") for g in body.groups],
        country=body.country or "",
    )
    return contact_json(await stub(request).CreateContact(message))


@router.post("/api/contacts/import", summary="Add or update contacts from a CSV, XLSX or XLS file")
async def import_contacts(
    request: Request,
    caller: CallerDep,
    file: Annotated[UploadFile, File(description="A header row (name, phone, email, group) and a contact per row")],
    group_id: Annotated[str | None, Form(max_length=MAX_ID_CHARS, description="every contact joins it")] = None,
    on_duplicate: Annotated[Literal["skip", "update"], Form(description="a phone the account has")] = "skip",
    country: Annotated[Country | None, Form(description="how to read national phones")] = None,
    account_id: Annotated[str | None, Form(max_length=64, description="admins; members get their own")] = None,
) -> dict[str, Any]:
    name = (file.filename or "contacts.csv")[:255]
    if not name.lower().endswith(IMPORT_SUFFIXES):
        raise ApiError(400, "upload a .csv, .xlsx or .xls file")
    if file.size is not None and file.size > MAX_IMPORT_BYTES:
        raise ApiError(413, f"the file is larger than {MAX_IMPORT_BYTES // 2**20} MiB")
    header = pb.ImportHeader(
        account_id=scoped_account(caller, account_id),
        file_name=name,
        group_id=_key(group_id, "group") if group_id else "",
        on_duplicate=on_duplicate,
        country=country or "",
    )

    async def parts() -> AsyncIterator[pb.ImportContactsRequest]:
        yield pb.ImportContactsRequest(header=header)
        # The form parser spooled the upload to disk; it crosses to campaigns in parts.
        while chunk := await file.read(UPLOAD_PART):
            yield pb.ImportContactsRequest(chunk=chunk)

    result = await stub(request).ImportContacts(parts(), timeout=IMPORT_TIMEOUT_S)
    return {
        "created": result.created,
        "updated": result.updated,
        "skipped": result.skipped,
        "invalid": result.invalid,
        "invalid_rows": [{"row": r.row, "value": r.value, "reason": r.reason} for r in result.invalid_rows],
        "group_id": result.group_id or None,
    }


@router.get("/api/contacts/{contact_id}", summary="One contact")
async def get_contact(request: Request, caller: CallerDep, contact_id: ContactId) -> dict[str, Any]:
    return contact_json(await stub(request).GetContact(pb.ContactRef(contact_id=contact_id)))


@router.put("/api/contacts/{contact_id}", summary="Change some fields of a contact")
async def update_contact(
    request: Request, caller: CallerDep, contact_id: ContactId, body: ContactUpdate
) -> dict[str, Any]:
    message = pb.UpdateContactRequest(contact_id=contact_id, country=body.country or "")
    for field in ("name", "phone", "email", "is_active"):
        if (value := getattr(body, field)) is not None:
            setattr(message, field, value)
    return contact_json(await stub(request).UpdateContact(message))


@router.delete("/api/contacts/{contact_id}", status_code=204, summary="Delete a contact (it leaves its groups)")
async def delete_contact(request: Request, caller: CallerDep, contact_id: ContactId) -> Response:
    await stub(request).DeleteContact(pb.ContactRef(contact_id=contact_id))
    return Response(status_code=204)


# --- groups ------------------------------------------------------------------------------------


@router.get("/api/groups", summary="Groups, by name")
async def list_groups(
    request: Request,
    response: Response,
    caller: CallerDep,
    search: Annotated[str | None, Query(max_length=200, description="in the name")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
    account_id: AccountFilter = None,
) -> list[dict[str, Any]]:
    message = pb.ListGroupsRequest(
        account_id=scoped_account(caller, account_id), search=search or "", limit=limit, offset=offset
    )
    reply = await stub(request).ListGroups(message)
    response.headers["X-Total-Count"] = str(reply.total)
    return [group_json(g) for g in reply.groups]


@router.post(
    "/api/groups",
    status_code=201,
    summary="Create a group (5 a minute per user)",
    dependencies=[Depends(per_user("groups.create", 5))],
)
async def create_group(request: Request, caller: CallerDep, body: GroupCreate) -> dict[str, Any]:
    message = pb.CreateGroupRequest(
        account_id=scoped_account(caller, body.account_id), name=body.name, description=body.description
    )
    return group_json(await stub(request).CreateGroup(message))


@router.get("/api/groups/{group_id}", summary="One group")
async def get_group(request: Request, caller: CallerDep, group_id: GroupId) -> dict[str, Any]:
    return group_json(await stub(request).GetGroup(pb.GroupRef(group_id=group_id)))


@router.put("/api/groups/{group_id}", summary="Rename a group or change its description")
async def update_group(request: Request, caller: CallerDep, group_id: GroupId, body: GroupUpdate) -> dict[str, Any]:
    message = pb.UpdateGroupRequest(group_id=group_id)
    if body.name is not None:
        message.name = body.name
    if body.description is not None:
        message.description = body.description
    return group_json(await stub(request).UpdateGroup(message))


@router.delete("/api/groups/{group_id}", status_code=204, summary="Delete a group (its contacts stay)")
async def delete_group(request: Request, caller: CallerDep, group_id: GroupId) -> Response:
    await stub(request).DeleteGroup(pb.GroupRef(group_id=group_id))
    return Response(status_code=204)


@router.get("/api/groups/{group_id}/contacts", summary="The group's contacts")
async def group_contacts(
    request: Request,
    response: Response,
    caller: CallerDep,
    group_id: GroupId,
    search: Search = None,
    is_active: bool | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[dict[str, Any]]:
    message = pb.ListGroupContactsRequest(group_id=group_id, search=search or "", limit=limit, offset=offset)
    if is_active is not None:
        message.is_active = is_active
    reply = await stub(request).ListGroupContacts(message)
    response.headers["X-Total-Count"] = str(reply.total)
    return [contact_json(c) for c in reply.contacts]


@router.post("/api/groups/{group_id}/contacts", summary="Add contacts to the group (those in it stay)")
async def add_group_contacts(
    request: Request, caller: CallerDep, group_id: GroupId, body: GroupContactsAdd
) -> dict[str, Any]:
    message = pb.AddGroupContactsRequest(group_id=group_id, contact_ids=[_key(c, "contact") for c in body.contact_ids])
    reply = await stub(request).AddGroupContacts(message)
    return {"added": reply.added, "group": group_json(reply.group)}


@router.delete(
    "/api/groups/{group_id}/contacts/{contact_id}", status_code=204, summary="Take a contact out of the group"
)
async def remove_group_contact(
    request: Request, caller: CallerDep, group_id: GroupId, contact_id: ContactId
) -> Response:
    await stub(request).RemoveGroupContact(pb.RemoveGroupContactRequest(group_id=group_id, contact_id=contact_id))
    return Response(status_code=204)


# --- opt-outs ----------------------------------------------------------------------------------


@router.post("/api/opt-outs", status_code=201, summary="Never send to this number again")
async def add_opt_out(request: Request, caller: CallerDep, body: OptOutCreate) -> dict[str, Any]:
    message = pb.AddOptOutRequest(
        account_id=scoped_account(caller, body.account_id), phone=body.phone, source="user", country=body.country or ""
    )
    reply = await stub(request).AddOptOut(message)
    return {**opt_out_json(reply.opt_out), "created": reply.created}


@router.get("/api/opt-outs", summary="Numbers that opted out, newest first")
async def list_opt_outs(
    request: Request,
    response: Response,
    caller: CallerDep,
    limit: Limit = 100,
    offset: Offset = 0,
    account_id: AccountFilter = None,
) -> list[dict[str, Any]]:
    message = pb.ListOptOutsRequest(account_id=scoped_account(caller, account_id), limit=limit, offset=offset)
    reply = await stub(request).ListOptOuts(message)
    response.headers["X-Total-Count"] = str(reply.total)
    return [opt_out_json(o) for o in reply.opt_outs]


@router.delete("/api/opt-outs/{phone}", status_code=204, summary="Let sends reach this number again")
async def delete_opt_out(
    request: Request,
    caller: CallerDep,
    phone: Annotated[str, Path(max_length=64, description="E.164 (+ as %2B) or national")],
    account_id: AccountFilter = None,
) -> Response:
    message = pb.DeleteOptOutRequest(account_id=scoped_account(caller, account_id), phone=phone)
    await stub(request).DeleteOptOut(message)
    return Response(status_code=204)
