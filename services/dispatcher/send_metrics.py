"""The dispatcher's metrics: what became of each message, how its provider answered, and the
calls up. Labels are the channel and the provider's name (a handful each), never a sender,
an account or a number."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.runtime.metrics import LATENCY_BUCKETS

MESSAGES_SENT = Counter("pregonero_messages_sent", "Messages a provider accepted.", ["channel", "provider"])
MESSAGES_FAILED = Counter(
    "pregonero_messages_failed",
    "Messages that ended failed (refused by the provider, or no device of the job active).",
    ["channel", "provider"],
)
MESSAGES_UNKNOWN = Counter(
    "pregonero_messages_unknown",
    "Messages whose outcome could not be known (a send cut off; never sent again).",
    ["channel", "provider"],
)
PROVIDER_SECONDS = Histogram(
    "pregonero_provider_request_seconds",
    "Time a provider took to answer one send request.",
    ["provider"],
    buckets=LATENCY_BUCKETS,
)
PROVIDER_THROTTLED = Counter(
    "pregonero_provider_throttled",
    "Send requests a provider refused for its rate limit (each retry counts).",
    ["provider"],
)
CALLS_PLACED = Counter("pregonero_calls_placed", "Voice calls placed with the provider.", ["provider"])
CALLS_IN_PROGRESS = Gauge("pregonero_calls_in_progress", "Voice calls up right now.", ["provider"])

# The provider label of an outcome no provider decided (no device of the job was active).
NO_PROVIDER = "none"
_BY_STATUS = {"sent": MESSAGES_SENT, "failed": MESSAGES_FAILED, "unknown": MESSAGES_UNKNOWN}


def count_outcome(status: str, *, channel: str, provider: str) -> None:
    """One message's final outcome; any other status (a hand-back) is not one."""
    counter = _BY_STATUS.get(status)
    if counter is not None:
        counter.labels(channel, provider or NO_PROVIDER).inc()
