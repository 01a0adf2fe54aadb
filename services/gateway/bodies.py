"""Request bodies read with a cap: refused (413) once past it, before the rest is read or
anything is parsed. Webhooks check a signature over the raw body, so they read it here."""

from __future__ import annotations

from fastapi import Request

from .errors import ApiError


async def read_capped(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"the body is larger than {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"the body is larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
