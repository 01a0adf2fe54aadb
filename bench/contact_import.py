"""How fast the address book imports a contact file through the API (issue 11: 100,000 rows in
10 s or less on this machine).

A CSV of `rows` contacts (name, phone, email and one of ten groups from the file's group
column), sent to `POST /api/contacts/import` with a target group, on the whole stack behind
Envoy: upload, streaming to campaigns, phone checks, COPY and the upserts in one transaction.
Then the same file again with `on_duplicate=update` and every name changed, which takes the
conflict path for every row.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.stack import H, start


def contacts_csv(rows: int, *, name: str = "Cliente") -> bytes:
    lines = ["nombre,telefono,correo,grupo"]
    # +5698 and seven digits: valid Chilean mobiles for phonenumbers.
    lines += [f"{name} {i},+5698{i:07d},cliente{i}@example.cl,Grupo {i % 10}" for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


def _import(base: str, data: bytes, **form: str) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    r = httpx.post(
        f"{base}/api/contacts/import",
        headers=H,
        files={"file": ("contacts.csv", data, "text/csv")},
        data=form,
        timeout=600,
    )
    seconds = time.perf_counter() - started
    r.raise_for_status()
    return r.json(), seconds


def measure(rows: int = 100_000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        stack = start(simulator=False, data_dir=Path(tmp))
        try:
            base = f"http://127.0.0.1:{stack.http_port}"
            r = httpx.post(f"{base}/api/groups", headers=H, json={"name": "Bench"}, timeout=30)
            r.raise_for_status()
            group_id = r.json()["id"]
            data = contacts_csv(rows)
            first, seconds = _import(base, data, group_id=group_id)
            assert (first["created"], first["invalid"]) == (rows, 0), first
            again, update_seconds = _import(base, contacts_csv(rows, name="Renombrado"), on_duplicate="update")
            assert (again["created"], again["updated"]) == (0, rows), again
            group = httpx.get(f"{base}/api/groups/{group_id}", headers=H, timeout=30).json()
            assert group["contact_count"] == rows, group
            return {
                "rows": rows,
                "file_mb": round(len(data) / 2**20, 1),
                "seconds": round(seconds, 2),
                "rows_per_s": round(rows / seconds),
                "update_seconds": round(update_seconds, 2),
                "update_rows_per_s": round(rows / update_seconds),
                "target_seconds": 10,
            }
        finally:
            stack.stop()
