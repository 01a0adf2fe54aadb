"""The scheduler's address book as its client meets it, through Envoy: contacts, groups, the
import of a file, opt-outs, every refusal with its status and message (and nothing changed),
and another account's contacts, groups and opt-outs out of a member's reach."""

from __future__ import annotations

import io
import itertools
import random
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openpyxl
import pytest

from tests.conftest import ADMIN_TOKEN, MEMBER_TOKEN, new_member

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # works in account "default"
MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}  # account "acme"
CONTACT_KEYS = {"id", "account_id", "name", "phone", "email", "is_active", "groups", "created_at", "updated_at"}
GROUP_KEYS = {"id", "account_id", "name", "description", "contact_count", "created_at", "updated_at", "created_by"}

# Chilean mobiles +5698xxxxxxx, all valid for phonenumbers; a random start keeps reruns on one
# database apart.
_numbers = itertools.count(random.randrange(0, 9_000_000))


def phone() -> str:
    return f"+5698{next(_numbers) % 10_000_000:07d}"


def tag() -> str:
    """A word only this test's names contain, to count its own contacts with `search`."""
    return "t" + uuid.uuid4().hex[:10].translate(str.maketrans("0123456789", "ghijklmnop"))


def member_of_acme(base_url: str) -> dict[str, str]:
    """A user of "acme" of the test's own: the per-user limits (5 groups a minute) count each
    test apart, as they would count two people of one account."""
    r = httpx.post(f"{base_url}/api/v1/accounts", headers=ADMIN, json={"account_id": "acme", "account_name": "Acme"})
    assert r.status_code in (200, 201, 409), r.text
    return {"Authorization": f"Bearer {new_member(base_url, 'acme')['access_token']}"}


@pytest.fixture
def api(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers=member_of_acme(base_url), timeout=60) as client:
        yield client


def assert_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["message"] == body["detail"] and isinstance(body["code"], str)
    for word in words:
        assert word in body["message"], body


def contact(api: httpx.Client, **body: Any) -> dict[str, Any]:
    r = api.post("/api/contacts", json={"phone": phone(), **body})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def group(api: httpx.Client, name: str | None = None, **body: Any) -> dict[str, Any]:
    r = api.post("/api/groups", json={"name": name or tag(), **body})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def count(api: httpx.Client, search: str, **params: Any) -> int:
    r = api.get("/api/contacts", params={"search": search, **params})
    assert r.status_code == 200, r.text
    assert int(r.headers["X-Total-Count"]) >= len(r.json())
    return int(r.headers["X-Total-Count"])


def contact_count(api: httpx.Client, group_id: str) -> int:
    r = api.get(f"/api/groups/{group_id}")
    assert r.status_code == 200, r.text
    return int(r.json()["contact_count"])


def upload(
    api: httpx.Client, data: bytes, name: str = "contacts.csv", headers: dict[str, str] | None = None, **form: str
) -> httpx.Response:
    return api.post("/api/contacts/import", files={"file": (name, data)}, data=form, headers=headers)


def csv(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


# --- contacts ------------------------------------------------------------------------------------


def test_contact_round_trip(api: httpx.Client) -> None:
    t = tag()
    r = api.post("/api/contacts", json={"name": f"Ana {t}", "phone": "9 8123 4567", "email": "ana@example.cl"})
    assert r.status_code == 201, r.text
    ana = r.json()
    # A national number is read in the account's country (acme names none: Chile).
    assert set(ana) == CONTACT_KEYS and isinstance(ana["id"], str)
    assert ana["phone"] == "+56981234567" and ana["email"] == "ana@example.cl" and ana["is_active"] is True
    assert ana["groups"] == [] and ana["account_id"] == "acme" and ana["created_at"].endswith("Z")
    bea = contact(api, name=f"Bea {t}", is_active=False)
    assert bea["email"] is None and bea["is_active"] is False

    r = api.get("/api/contacts", params={"search": t})
    assert r.status_code == 200 and r.headers["X-Total-Count"] == "2"
    assert [c["id"] for c in r.json()] == [ana["id"], bea["id"]]
    assert [c["id"] for c in api.get("/api/contacts", params={"search": t, "is_active": "false"}).json()] == [bea["id"]]
    assert [c["id"] for c in api.get("/api/contacts", params={"search": "81234567"}).json()] == [ana["id"]]
    # Digits inside words are part of a name, not a phone search.
    assert api.get("/api/contacts", params={"search": f"{t} 81234567"}).json() == []
    page = api.get("/api/contacts", params={"search": t, "limit": 1, "offset": 1})
    assert [c["id"] for c in page.json()] == [bea["id"]] and page.headers["X-Total-Count"] == "2"
    assert api.get(f"/api/contacts/{ana['id']}").json() == ana

    r = api.put(f"/api/contacts/{ana['id']}", json={"name": f"Ana María {t}", "email": "", "is_active": False})
    assert r.status_code == 200, r.text
    changed = r.json()
    assert changed["name"] == f"Ana María {t}" and changed["email"] is None and changed["is_active"] is False
    assert changed["phone"] == ana["phone"] and changed["updated_at"] >= ana["updated_at"]

    assert api.delete(f"/api/contacts/{ana['id']}").status_code == 204
    assert_error(api.get(f"/api/contacts/{ana['id']}"), 404, "not found")
    assert_error(api.delete(f"/api/contacts/{ana['id']}"), 404)
    assert count(api, t) == 1


def test_phones_are_e164_of_the_country_and_unique(api: httpx.Client) -> None:
    argentine = contact(api, phone="11 2345-6789", country="AR")
    assert argentine["phone"] == "+541123456789"
    api.delete(f"/api/contacts/{argentine['id']}")
    t = tag()
    first = contact(api, name=f"Primero {t}")
    national = first["phone"].removeprefix("+56")
    r = api.post("/api/contacts", json={"name": f"Segundo {t}", "phone": national})
    assert_error(r, 409, first["phone"], f"contact {first['id']}", f"Primero {t}")
    other = contact(api, name=f"Otro {t}")
    assert_error(api.put(f"/api/contacts/{other['id']}", json={"phone": first["phone"]}), 409, first["id"])
    assert api.get(f"/api/contacts/{other['id']}").json() == other
    assert count(api, t) == 2


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"phone": "12345"}, 400, ("invalid for CL: too short",)),
        ({"phone": "+56912000000"}, 400, ("invalid for CL", "not a valid number")),
        ({"phone": "no tengo"}, 400, ("invalid for CL: not a phone number",)),
        ({"phone": "+999 123"}, 400, ("unknown country code",)),
        ({"phone": "+56981111111", "country": "PE"}, 422, ("country",)),
        ({"phone": "+56981111111", "email": "ana@"}, 400, ("email 'ana@' is not an address",)),
        ({"phone": "+56981111111", "email": "a@" + "b" * 250 + ".cl"}, 422, ("email",)),
        ({"phone": "+56981111111", "name": "x" * 201}, 422, ("name",)),
        ({"phone": "+56981111111", "groups": ["999999999"]}, 404, ("group 999999999 not found",)),
        ({"phone": "+56981111111", "groups": ["abc"]}, 404, ("group abc not found",)),
        ({"phone": "+56981111111", "role": "admin"}, 422, ("role",)),
        ({"phone": ""}, 422, ("phone",)),
        ({"name": "sin teléfono"}, 422, ("phone",)),
    ],
)
def test_invalid_contacts_are_refused_and_change_nothing(
    api: httpx.Client, body: dict[str, Any], status: int, words: tuple[str, ...]
) -> None:
    t = tag()
    r = api.post("/api/contacts", json={"name": f"Nadie {t}", **body} if "name" not in body else body)
    assert_error(r, status, *words)
    assert count(api, t) == 0
    assert count(api, "81111111") == 0


def test_malformed_ids_are_not_found(api: httpx.Client) -> None:
    for bad in ("abc", "0", "-1", "99999999999999999999", "1e3"):
        assert_error(api.get(f"/api/contacts/{bad}"), 404, "contact")
        assert_error(api.put(f"/api/contacts/{bad}", json={"name": "x"}), 404, "contact")
        assert_error(api.get(f"/api/groups/{bad}"), 404, "group")
        assert_error(api.get("/api/contacts", params={"group_id": bad}), 404, "group")


# --- groups --------------------------------------------------------------------------------------


def test_groups_and_their_exact_contact_count(api: httpx.Client) -> None:
    t = tag()
    g = group(api, f"Clientes {t}", description="Los de siempre")
    assert set(g) == GROUP_KEYS and g["contact_count"] == 0 and g["created_by"].startswith("usr-")
    assert g["description"] == "Los de siempre" and g["account_id"] == "acme"
    people = [contact(api, name=f"P{i} {t}") for i in range(3)]
    ids = [p["id"] for p in people]

    r = api.post(f"/api/groups/{g['id']}/contacts", json={"contact_ids": ids})
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 3 and r.json()["group"]["contact_count"] == 3
    # Adding again is idempotent.
    r = api.post(f"/api/groups/{g['id']}/contacts", json={"contact_ids": [ids[0], ids[0]]})
    assert r.json()["added"] == 0 and r.json()["group"]["contact_count"] == 3
    assert api.get(f"/api/contacts/{ids[0]}").json()["groups"] == [g["id"]]
    listed = api.get(f"/api/groups/{g['id']}/contacts")
    assert listed.headers["X-Total-Count"] == "3" and [c["id"] for c in listed.json()] == ids
    assert count(api, t, group_id=g["id"]) == 3

    assert api.delete(f"/api/groups/{g['id']}/contacts/{ids[0]}").status_code == 204
    assert contact_count(api, g["id"]) == 2
    assert_error(api.delete(f"/api/groups/{g['id']}/contacts/{ids[0]}"), 404, "not in group")
    assert api.delete(f"/api/contacts/{ids[1]}").status_code == 204
    assert contact_count(api, g["id"]) == 1

    # A contact of no one here, or a malformed id: 404 and none of the list is added.
    assert_error(api.post(f"/api/groups/{g['id']}/contacts", json={"contact_ids": [ids[0], "999999999"]}), 404)
    assert_error(api.post(f"/api/groups/{g['id']}/contacts", json={"contact_ids": [ids[0], "x"]}), 404, "contact x")
    assert_error(api.post(f"/api/groups/{g['id']}/contacts", json={"contact_ids": []}), 422, "contact_ids")
    assert contact_count(api, g["id"]) == 1

    joined = contact(api, name=f"P3 {t}", groups=[g["id"]])
    assert joined["groups"] == [g["id"]] and contact_count(api, g["id"]) == 2

    r = api.put(f"/api/groups/{g['id']}", json={"name": f"VIP {t}"})
    assert r.status_code == 200 and r.json()["name"] == f"VIP {t}" and r.json()["description"] == "Los de siempre"
    assert [x["id"] for x in api.get("/api/groups", params={"search": f"VIP {t}"}).json()] == [g["id"]]

    # Deleting the group keeps its contacts.
    assert api.delete(f"/api/groups/{g['id']}").status_code == 204
    assert_error(api.get(f"/api/groups/{g['id']}"), 404)
    assert count(api, t) == 3
    assert api.get(f"/api/contacts/{joined['id']}").json()["groups"] == []


def test_group_names_are_unique_and_bounded(api: httpx.Client) -> None:
    t = tag()
    first = group(api, f"Equipo {t}")
    assert_error(api.post("/api/groups", json={"name": f"Equipo {t}"}), 409, f"Equipo {t}", first["id"])
    second = group(api, f"Otro {t}")
    assert_error(api.put(f"/api/groups/{second['id']}", json={"name": f"Equipo {t}"}), 409, "already exists")
    assert_error(api.post("/api/groups", json={"name": ""}), 422, "name")
    assert_error(api.post("/api/groups", json={"name": "x" * 201}), 422, "name")
    assert_error(api.post("/api/groups", json={"name": "x", "description": "d" * 2001}), 422, "description")
    assert_error(api.post("/api/groups", json={"name": f"Z {t}", "color": "red"}), 422, "color")
    r = api.get("/api/groups", params={"search": t})
    assert r.headers["X-Total-Count"] == "2"
    assert sorted(x["name"] for x in r.json()) == [f"Equipo {t}", f"Otro {t}"]


# --- import --------------------------------------------------------------------------------------


def test_csv_import_skip_then_update(api: httpx.Client) -> None:
    t = tag()
    numbers = [phone() for _ in range(4)]
    g = group(api)
    existing = contact(api, name=f"Antes {t}", phone=numbers[0])
    data = csv(
        "Nombre;Teléfono;Correo;Grupo",
        f"Uno {t};{numbers[0]};uno@example.cl;",
        f"Dos {t};{numbers[1].removeprefix('+56')};;Amigos {t}",
        f"Tres {t};{numbers[2]};tres@example.cl;Amigos {t}",
        f"Tres otra vez {t};{numbers[2]};;",
        "",
        f"Malo {t};12345;;",
        f"Correo {t};{numbers[3]};no-es-correo;",
        f"Sin número {t};;;",
    )
    r = upload(api, data, group_id=g["id"])
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["created"] == 2 and result["updated"] == 0 and result["skipped"] == 2  # numbers[0], repeated [2]
    assert result["invalid"] == 3 and result["group_id"] == g["id"]
    assert result["invalid_rows"] == [
        {"row": 7, "value": "12345", "reason": "invalid for CL: too short"},
        {"row": 8, "value": "no-es-correo", "reason": "email 'no-es-correo' is not an address"},
        {"row": 9, "value": "", "reason": "no phone"},
    ]
    assert api.get(f"/api/contacts/{existing['id']}").json()["name"] == f"Antes {t}"  # skipped: unchanged
    # Every valid phone joined the group, the existing contact too; the group column made "Amigos".
    assert contact_count(api, g["id"]) == 3
    amigos = api.get("/api/groups", params={"search": f"Amigos {t}"}).json()
    assert len(amigos) == 1 and amigos[0]["contact_count"] == 2
    three = api.get("/api/contacts", params={"search": numbers[2].removeprefix("+")}).json()
    assert [c["name"] for c in three] == [f"Tres {t}"]
    assert sorted(three[0]["groups"]) == sorted([g["id"], amigos[0]["id"]])

    r = upload(api, data, on_duplicate="update", group_id=g["id"])
    assert r.status_code == 200, r.text
    again = r.json()
    # Only the contact whose name or email differs from the file is updated.
    assert (again["created"], again["updated"], again["skipped"], again["invalid"]) == (0, 1, 3, 3)
    updated = api.get(f"/api/contacts/{existing['id']}").json()
    assert updated["name"] == f"Uno {t}" and updated["email"] == "uno@example.cl"
    assert contact_count(api, g["id"]) == 3 and count(api, t) == 3


def test_xlsx_import_with_headers_in_any_case(api: httpx.Client) -> None:
    t = tag()
    numbers = [phone() for _ in range(3)]
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["NOMBRE", "Celular", "E-mail", "Notas"])
    sheet.append([f"Uno {t}", int(numbers[0].removeprefix("+")), "uno@example.cl", "x"])  # a number cell
    sheet.append([f"Dos {t}", numbers[1], None, None])
    sheet.append([None, None, None, "solo notas"])
    sheet.append([f"Tres {t}", numbers[2].removeprefix("+56"), None, None])
    buffer = io.BytesIO()
    book.save(buffer)
    r = upload(api, buffer.getvalue(), name="Contactos.xlsx")
    assert r.status_code == 200, r.text
    assert r.json() == {"created": 3, "updated": 0, "skipped": 0, "invalid": 0, "invalid_rows": [], "group_id": None}
    assert sorted(c["phone"] for c in api.get("/api/contacts", params={"search": t}).json()) == sorted(numbers)


@pytest.mark.parametrize(
    ("data", "name", "status", "words"),
    [
        (b"", "c.csv", 400, ("empty",)),
        (csv("nombre,correo", "Ana,ana@example.cl"), "c.csv", 400, ("no phone column",)),
        (csv("nombre,telefono"), "c.csv", 400, ("no contacts",)),
        (b"%PDF-1.4\x00\x01\x02 binary", "c.pdf", 400, (".csv, .xlsx or .xls",)),
        (b"\x00\x01\x02\x03 binary" * 10, "c.csv", 400, ("binary",)),
        (b"PK\x03\x04 not really a workbook", "c.xlsx", 400, ("not a readable Excel workbook",)),
        (csv("nombre,telefono", "Ana,+56981111111").replace(b"Ana", b"An\xe1"), "c.csv", 400, ("UTF-8",)),
        (b"telefono\n" + b"+56981111111\n" * (21 * 2**20 // 13), "c.csv", 413, ("larger than 20 MiB",)),
    ],
)
def test_bad_files_are_refused_and_write_nothing(
    api: httpx.Client, data: bytes, name: str, status: int, words: tuple[str, ...]
) -> None:
    assert_error(upload(api, data, name=name), status, *words)
    assert count(api, "81111111") == 0


def test_a_file_bad_after_good_rows_writes_nothing(api: httpx.Client) -> None:
    t = tag()
    g = group(api)
    good = "".join(f"Bien {t},{phone()}\n" for _ in range(50))
    data = f"nombre,telefono,grupo\n{good}".encode() + b"Mal\xff,+56981111111\n"
    assert_error(upload(api, data, group_id=g["id"]), 400, "not UTF-8", "line 52")
    assert count(api, t) == 0 and contact_count(api, g["id"]) == 0


def test_import_options_are_checked(api: httpx.Client, base_url: str) -> None:
    data = csv("telefono", "+56981111111")
    assert_error(upload(api, data, on_duplicate="merge"), 422, "on_duplicate")
    assert_error(upload(api, data, group_id="999999999"), 404, "group 999999999 not found")
    assert_error(upload(api, data, group_id="nope"), 404, "group nope not found")
    theirs = httpx.post(f"{base_url}/api/groups", headers=ADMIN, json={"name": tag()}).json()
    assert_error(upload(api, data, group_id=theirs["id"]), 404, f"group {theirs['id']} not found")
    assert_error(upload(api, data, account_id="default"), 404, "account default not found")
    assert count(api, "81111111") == 0


# --- opt-outs ------------------------------------------------------------------------------------


def test_opt_outs(api: httpx.Client) -> None:
    number = phone()
    r = api.post("/api/opt-outs", json={"phone": number.removeprefix("+56")})
    assert r.status_code == 201, r.text
    assert r.json()["phone"] == number and r.json()["source"] == "user" and r.json()["created"] is True
    again = api.post("/api/opt-outs", json={"phone": number})
    assert again.status_code == 201 and again.json()["created"] is False
    assert again.json()["created_at"] == r.json()["created_at"]
    listed = api.get("/api/opt-outs", params={"limit": 1000})
    assert listed.status_code == 200 and int(listed.headers["X-Total-Count"]) >= 1
    assert [o["phone"] for o in listed.json()].count(number) == 1
    assert_error(api.post("/api/opt-outs", json={"phone": "12"}), 400, "invalid for CL: too short")
    assert_error(api.post("/api/opt-outs", json={"phone": number, "source": "inbound"}), 422, "source")
    assert api.delete(f"/api/opt-outs/{number}").status_code == 204
    assert_error(api.delete(f"/api/opt-outs/{number}"), 404, "not on the opt-out list")
    assert number not in [o["phone"] for o in api.get("/api/opt-outs", params={"limit": 1000}).json()]


# --- another account ----------------------------------------------------------------------------


def test_a_member_reaches_nothing_of_another_account(api: httpx.Client, base_url: str) -> None:
    admin = httpx.Client(base_url=base_url, headers=ADMIN, timeout=30)
    t = tag()
    theirs = admin.post("/api/contacts", json={"name": f"Ajeno {t}", "phone": phone()}).json()
    their_group = admin.post("/api/groups", json={"name": f"Ajeno {t}"}).json()
    assert theirs["account_id"] == "default" and their_group["account_id"] == "default"
    admin.post(f"/api/groups/{their_group['id']}/contacts", json={"contact_ids": [theirs["id"]]})
    their_number = phone()
    assert admin.post("/api/opt-outs", json={"phone": their_number}).status_code == 201
    mine = contact(api, name=f"Propio {t}")
    my_group = group(api)

    c, g = theirs["id"], their_group["id"]
    for r in (
        api.get(f"/api/contacts/{c}"),
        api.put(f"/api/contacts/{c}", json={"name": "mío"}),
        api.delete(f"/api/contacts/{c}"),
        api.get(f"/api/groups/{g}"),
        api.put(f"/api/groups/{g}", json={"name": "mío"}),
        api.get(f"/api/groups/{g}/contacts"),
        api.post(f"/api/groups/{g}/contacts", json={"contact_ids": [mine["id"]]}),
        api.delete(f"/api/groups/{g}/contacts/{c}"),
        api.delete(f"/api/groups/{g}"),
        api.get("/api/contacts", params={"group_id": g}),
        api.post("/api/contacts", json={"phone": phone(), "groups": [g]}),
        api.delete(f"/api/opt-outs/{their_number}"),
        api.get("/api/contacts", params={"account_id": "default"}),
        api.get("/api/groups", params={"account_id": "default"}),
        api.get("/api/opt-outs", params={"account_id": "default"}),
        api.post("/api/groups", json={"name": "x", "account_id": "default"}),
    ):
        assert_error(r, 404)
        assert "Ajeno" not in r.text and theirs["phone"] not in r.text
    # Their contact in my group: not found, and it names nothing of theirs.
    r = api.post(f"/api/groups/{my_group['id']}/contacts", json={"contact_ids": [c]})
    assert_error(r, 404, f"contact {c} not found")
    assert contact_count(api, my_group["id"]) == 0
    assert count(api, f"Ajeno {t}") == 0 and api.get("/api/groups", params={"search": f"Ajeno {t}"}).json() == []
    assert their_number not in [o["phone"] for o in api.get("/api/opt-outs", params={"limit": 1000}).json()]
    # The same phone is another contact in each account.
    assert contact(api, phone=theirs["phone"])["account_id"] == "acme"
    # An admin sees every account's, or one account's with account_id.
    assert [x["id"] for x in admin.get("/api/contacts", params={"search": f"Propio {t}"}).json()] == [mine["id"]]
    only_acme = admin.get("/api/contacts", params={"search": t, "account_id": "acme"}).json()
    assert [x["id"] for x in only_acme] == [mine["id"]]
    # Nothing of theirs changed.
    assert admin.get(f"/api/contacts/{c}").json()["name"] == f"Ajeno {t}"
    assert admin.get(f"/api/groups/{g}").json()["contact_count"] == 1
    assert their_number in [o["phone"] for o in admin.get("/api/opt-outs", params={"limit": 1000}).json()]
    admin.close()
