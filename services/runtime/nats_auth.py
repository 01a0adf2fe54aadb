"""Who may do what on NATS: one user per service, allowed only the subjects it uses (DESIGN.md,
NATS), and an `operator` with every permission (tests' own clients, bench, admin tooling, NACK).

The table below is the one place that says it; `make run`, the tests and deploy/k8s all render
their nats-server `authorization` block from it. A client without a user is refused outright.

What each line keeps:
- Only the dispatcher publishes results (`events.job.*`) and device states, and only it reads
  DISPATCH (the tenants' phones and texts); only campaigns publishes work (`dispatch.*`) and
  writes the batch run states (the KV bucket).
- A consumer is named in full (stream, durable, filter): a service can create, read and ack
  only its own durables, filtered on its own subjects.
- Each service gets replies on an inbox of its own (`_INBOX_<user>`, see `inbox_prefix`) and
  may subscribe to nothing else of the kind, so none can read another's fetched messages.
- Every service may look up and create the streams and the bucket (`bus.ensure_topology`,
  run by whichever replica starts first); none may update, purge or delete them.
- A dead letter is published again only by the service that publishes its subject (`owner_of`):
  the gateway's admin route asks it on `replay.<service>` (dead_letter_replays.py), which only
  the gateway may publish on. So the internet-facing gateway publishes no results, work or
  account events, even to replay them. Every service subscribes to its own `replay.<user>`,
  may read and delete dead letters by sequence (the one removal any service may make), and may
  answer what it receives (nats-server's `allow_responses`: once per message, on its reply
  subject; the replayer answers only when that is an inbox)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

OPERATOR = "operator"
JS_API = "$JS.API"
DEFAULT_INBOX = "_INBOX"

# Names as in bus.py (this module must not import the NATS client).
DISPATCH, EVENTS, DEADLETTER = "DISPATCH", "EVENTS", "DEADLETTER"
KV_STREAM = "KV_batch_state"
KV_SUBJECTS = "$KV.batch_state.>"
TOPOLOGY = (DISPATCH, EVENTS, DEADLETTER, KV_STREAM)
REPLAY = "replay"  # replay.<service>: requests to publish a dead letter again


@dataclass(frozen=True)
class Consumer:
    """A durable pull consumer (bus.consume, the dispatcher's engines)."""

    stream: str
    durable: str
    filter: str


@dataclass(frozen=True)
class Role:
    publish: tuple[str, ...] = ()  # core or JetStream publishes
    subscribe: tuple[str, ...] = ()  # core subscriptions
    consumers: tuple[Consumer, ...] = ()
    writes_run_states: bool = False  # KV put/delete
    watches_run_states: bool = False  # KV watch: an ordered push consumer of its own
    api: tuple[str, ...] = ()  # further JetStream API requests
    requests_replays: bool = False  # asks the other services to replay dead letters


ROLES: dict[str, Role] = {
    "accounts": Role(
        # account events through JetStream; live notifications on core NATS.
        publish=("events.account.>", "events.notification.>"),
        consumers=(
            Consumer(EVENTS, "accounts-charges", "events.job.>"),
            Consumer(EVENTS, "accounts-notifications", "events.batch.>"),
        ),
    ),
    "campaigns": Role(
        # work (feeder, dialer); batch progress (JetStream and core); message status (core).
        publish=("dispatch.>", "events.batch.>", "events.message.>"),
        consumers=(
            Consumer(EVENTS, "campaigns-results", "events.job.>"),
            Consumer(EVENTS, "campaigns-accounts", "events.account.>"),
            Consumer(EVENTS, "campaigns-delivery", "events.delivery.>"),
            Consumer(EVENTS, "campaigns-devices", "events.device.>"),
        ),
        writes_run_states=True,
    ),
    "dispatcher": Role(
        publish=("events.job.>", "events.device.>"),
        # device states other replicas heard (connections.py)
        subscribe=("events.device.*",),
        consumers=(
            Consumer(DISPATCH, "dispatch-whatsapp", "dispatch.whatsapp.>"),
            Consumer(DISPATCH, "dispatch-voice", "dispatch.voice.>"),
        ),
        watches_run_states=True,
    ),
    "gateway": Role(
        # provider webhooks
        publish=("events.delivery.>",),
        # live sockets: batch progress, notifications, message and device events
        subscribe=("events.batch.>", "events.notification.>", "events.message.>", "events.device.>"),
        # /health: stream and consumer state
        api=tuple(f"{JS_API}.CONSUMER.LIST.{s}" for s in (DISPATCH, EVENTS)),
        # /api/v1/admin/dead-letters/{id}/replay
        requests_replays=True,
    ),
}


def inbox_prefix(user: str | None) -> str:
    """Where a service's replies arrive: its own prefix, the only inboxes it may subscribe to."""
    return f"{DEFAULT_INBOX}_{user}" if user in ROLES else DEFAULT_INBOX


def replay_subject(user: str) -> str:
    """Where `user` takes requests to replay dead letters of its own subjects."""
    return f"{REPLAY}.{user}"


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether `pattern` (NATS wildcards: `*` one token, `>` one or more at the end) covers `subject`."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or token not in ("*", have[i]):
            return False
    return len(have) == len(want)


def owner_of(subject: str) -> str | None:
    """The one service that publishes `subject`, and so may publish it again as a replay; None
    when no service (or, a mistake in the table, more than one) does, or `subject` is not one
    subject (a wildcard, an empty token, a space that would end it on the wire)."""
    tokens = subject.split(".")
    if any(not t or t in ("*", ">") or not t.isprintable() or any(c.isspace() for c in t) for t in tokens):
        return None
    owners = [user for user, role in ROLES.items() if any(subject_matches(p, subject) for p in role.publish)]
    return owners[0] if len(owners) == 1 else None


def permissions(user: str) -> dict[str, list[str]]:
    """The subjects `user` may publish to and subscribe to, JetStream API included."""
    role = ROLES[user]
    pub = list(role.publish)
    for stream in TOPOLOGY:  # bus.ensure_topology
        pub += [f"{JS_API}.STREAM.INFO.{stream}", f"{JS_API}.STREAM.CREATE.{stream}"]
    for c in role.consumers:
        pub += [
            f"{JS_API}.CONSUMER.INFO.{c.stream}.{c.durable}",
            # nats-py names the filter in the subject; the server checks it against the config.
            f"{JS_API}.CONSUMER.CREATE.{c.stream}.{c.durable}.{c.filter}",
            f"{JS_API}.CONSUMER.MSG.NEXT.{c.stream}.{c.durable}",
            f"$JS.ACK.{c.stream}.{c.durable}.>",  # ack, nak, term, in progress
            f"deadletter.{c.durable}",
        ]
    if role.writes_run_states:
        pub.append(KV_SUBJECTS)
    if role.watches_run_states:
        pub += [
            f"{JS_API}.CONSUMER.CREATE.{KV_STREAM}",  # an ephemeral ordered consumer
            f"{JS_API}.CONSUMER.INFO.{KV_STREAM}.*",
            f"$JS.FC.{KV_STREAM}.>",  # its flow control replies
        ]
    # dead_letter_replays.py: read a dead letter by sequence, delete it once published again.
    pub += [f"{JS_API}.STREAM.MSG.GET.{DEADLETTER}", f"{JS_API}.STREAM.MSG.DELETE.{DEADLETTER}"]
    pub += role.api
    if role.requests_replays:
        pub.append(f"{REPLAY}.>")
    sub = [f"{inbox_prefix(user)}.>", *role.subscribe, replay_subject(user)]
    return {"publish": list(dict.fromkeys(pub)), "subscribe": sub}


@dataclass(frozen=True)
class NatsUsers:
    """The users of one NATS server and their passwords (or, for deploy/k8s, the names of the
    environment variables nats-server reads them from)."""

    passwords: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def generate(cls) -> NatsUsers:
        return cls({user: secrets.token_hex(24) for user in (OPERATOR, *ROLES)})

    @classmethod
    def from_env_vars(cls) -> NatsUsers:
        return cls({user: "$" + password_env_var(user) for user in (OPERATOR, *ROLES)})

    def url(self, base_url: str, user: str) -> str:
        """`base_url` logged in as `user`."""
        parts = urlsplit(base_url)
        host = parts.netloc.rpartition("@")[2]
        auth = f"{quote(user, safe='')}:{quote(self.passwords[user], safe='')}"
        return urlunsplit(parts._replace(netloc=f"{auth}@{host}"))

    def server_config(self) -> str:
        """The nats-server `authorization` block (NATS config syntax; JSON values in it)."""
        users = []
        for user, password in self.passwords.items():
            entry: dict[str, object] = {"user": user, "password": password}
            if user != OPERATOR:
                p = permissions(user)
                entry["permissions"] = {
                    "publish": {"allow": p["publish"]},
                    "subscribe": {"allow": p["subscribe"]},
                    # An answer to each replay request received (dead_letter_replays.py answers
                    # inboxes only: any other reply subject is a forgery and is dropped).
                    "allow_responses": True,
                }
            users.append(entry)
        text = json.dumps({"users": users}, indent=2)
        # A `$VAR` password is a variable reference only unquoted (NATS config syntax).
        for password in self.passwords.values():
            if password.startswith("$"):
                text = text.replace(json.dumps(password), password)
        return f"authorization {text}\n"


def password_env_var(user: str) -> str:
    """Where deploy/k8s keeps `user`'s password: a key of the Secret, an env var of nats-server."""
    return f"{user.upper()}_NATS_PASSWORD"


def without_password(url: str) -> str:
    """A URL fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def user_of(url: str) -> str | None:
    """The user a NATS URL logs in as (the first server's, when it names several)."""
    return urlsplit(url.split(",")[0].strip()).username
