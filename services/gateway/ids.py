"""Ids in paths, checked once, before any backend is asked. An id that cannot name anything
here (the wrong shape, beyond the store's 64-bit keys, far too long) is answered 404 like an
unknown one: a client holding an id of the original backend, or a typo, learns "not found",
never a 422 about the id's syntax nor an overflow deeper down (issue 10).

Each route declares its id as one of the `Annotated` types below; the dependency reads the
path parameter of that name, so the OpenAPI document still shows it."""

from __future__ import annotations

import re
import uuid
from typing import Annotated

from fastapi import Depends, Path

from .errors import ApiError

INT64_MAX = 2**63 - 1
# Longer than any form below; a longer string is not parsed at all.
MAX_ID_CHARS = 64
_HEX24 = re.compile(r"[0-9a-f]{24}")
_JOB_ID = re.compile(r"(?:job-)?([0-9]{1,19})")


def voice_job_key(text: str) -> int | None:
    """The key a voice job's id names: `job-<n>`, `<n>`, or the 24-hex `_id` (the key in hex),
    or None when no job can have it."""
    text = text.strip().lower()
    if len(text) > MAX_ID_CHARS:
        return None
    if m := _JOB_ID.fullmatch(text):
        key = int(m.group(1))
    elif _HEX24.fullmatch(text):
        key = int(text, 16)
    else:
        return None
    return key if 0 < key <= INT64_MAX else None


def is_batch_id(text: str) -> bool:
    """A batch's `batch_id` (a UUID) or its 24-hex `_id`."""
    text = text.strip().lower()
    if len(text) > MAX_ID_CHARS:
        return False
    if _HEX24.fullmatch(text):
        return True
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _voice_job_id(job_id: Annotated[str, Path(description="`job_id` or `_id`")]) -> str:
    if voice_job_key(job_id) is None:
        raise ApiError(404, f"job {job_id[:MAX_ID_CHARS]} not found")
    return job_id.strip()


def _batch_id(batch_id: Annotated[str, Path(description="`batch_id` or `_id`")]) -> str:
    if not is_batch_id(batch_id):
        raise ApiError(404, f"batch {batch_id[:MAX_ID_CHARS]} not found")
    return batch_id.strip()


VoiceJobId = Annotated[str, Depends(_voice_job_id)]
BatchId = Annotated[str, Depends(_batch_id)]
