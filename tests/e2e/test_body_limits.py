"""Bodies before authentication, through Envoy (issue 13): an unauthenticated upload is
answered 401 without being taken in, a JSON body over 1 MiB is refused at the edge when
its length is declared and by the gateway when it is chunked."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
CHUNK = 64 * 1024
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BOUNDARY = "b0undary"
FORM = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


class Body:
    """`total` bytes of a multipart upload handed to the client in parts, counted as it takes them."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.taken = 0

    def __iter__(self) -> Iterator[bytes]:
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n'
            "Content-Type: text/csv\r\n\r\n"
        ).encode()
        filler = b"+56911111111|x\n" * (CHUNK // 15)
        yield head
        self.taken = len(head)
        while self.taken < self.total:
            part = filler[: self.total - self.taken]
            self.taken += len(part)
            yield part


def error_of(r: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code and body["message"] and body["detail"] == body["message"], body
    return dict(body)


def test_an_unauthenticated_40_mib_upload_is_answered_401_without_being_taken_in(base_url: str) -> None:
    body = Body(40 * MiB)
    started = time.monotonic()
    with httpx.Client(base_url=base_url, timeout=20) as client:
        r = client.post(
            "/messages/send-bulk-file",
            content=iter(body),
            headers={**FORM, "Content-Length": str(body.total)},
        )
    elapsed = time.monotonic() - started
    error_of(r, 401, "unauthorized")
    assert elapsed < 5, elapsed
    # What the socket buffers on the way held, not the file.
    assert body.taken < 20 * MiB, body.taken


def test_json_over_1_mib_is_413_at_the_edge_when_declared_and_at_the_gateway_when_chunked(base_url: str) -> None:
    big = b'{"name": "' + b"x" * MiB + b'"}'
    with httpx.Client(base_url=base_url, timeout=20) as client:
        declared = client.post("/api/v1/batches", content=big, headers={**ADMIN, "Content-Type": "application/json"})
        assert "1 MiB" in error_of(declared, 413, "payload_too_large")["message"]
        # Envoy's own answer: the gateway marks each of its replies with a request id.
        assert "x-request-id" not in declared.headers

        def chunked() -> Iterator[bytes]:
            for i in range(0, len(big), CHUNK):
                yield big[i : i + CHUNK]

        streamed = client.post(
            "/api/v1/batches", content=chunked(), headers={**ADMIN, "Content-Type": "application/json"}
        )
        error_of(streamed, 413, "payload_too_large")
        assert "x-request-id" in streamed.headers
        # Within the cap, the same route goes on as before.
        fine = client.post("/api/v1/batches", json={"name": ""}, headers=ADMIN)
        error_of(fine, 422, "validation_error")
