"""Campaigns' metrics: rows taken in from files and jobs released to the dispatchers. Labels
are the channel, the kind of file and the row's fate (a handful each), never a batch."""

from __future__ import annotations

from prometheus_client import Counter

MESSAGES_RELEASED = Counter(
    "pregonero_messages_released",
    "Jobs the feeder published to DISPATCH (paid for and sent on to the dispatchers).",
    ["channel"],
)
INGEST_ROWS = Counter(
    "pregonero_ingest_rows",
    "Rows read from uploaded files: `valid` became jobs or contacts, `invalid` were reported.",
    ["kind", "outcome"],
)


def count_ingest(kind: str, *, valid: int, invalid: int) -> None:
    INGEST_ROWS.labels(kind, "valid").inc(valid)
    INGEST_ROWS.labels(kind, "invalid").inc(invalid)
