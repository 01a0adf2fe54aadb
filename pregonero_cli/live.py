"""Follows one WhatsApp bulk job to its end: its socket (`/ws/job/{id}`) while one is open,
`GET /jobs/{id}` before, between and after sockets.

The job's row is the truth and the socket only news of it: the follower starts from the row
(a finished job needs no socket at all), asks it again whenever the socket has been silent a
while (a paused job sends nothing) or is gone, and takes the final counts from it, not from
the event that announced the end. So a dropped socket, a gateway restart or an end told to an
earlier socket of the same address (the gateway then sends a neutral `job_status`) can delay
what is shown, never end the follow early or leave it hanging."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import connect

from .api import Api
from .errors import ApiError, Unreachable

TERMINAL = frozenset({"completed", "cancelled", "failed"})
# Silence on the socket for this long: the row is asked instead.
SILENCE_S = 5.0
# Waits before reconnecting a socket that failed or closed before the end, in turn; the row is
# asked every POLL_S meanwhile, so the bar moves on without a socket too.
RECONNECT_S = (0.5, 1.0, 2.0, 5.0, 10.0)
POLL_S = 2.0
# The gateway's closes that no reconnect can fix, as the HTTP status they mean.
FINAL_CLOSES = {4401: 401, 4403: 403, 4404: 404}
STATE_EVENTS = {
    "job_started": "processing",
    "job_paused": "paused",
    "job_resumed": "processing",
    "job_suspended": "suspended",
    "job_cancelled": "cancelling",
}


@dataclass(frozen=True)
class Counts:
    status: str
    sent: int
    failed: int
    total: int


class Listener(Protocol):
    def update(self, counts: Counts) -> None: ...

    def note(self, text: str) -> None: ...


class JobFollower:
    def __init__(self, api: Api, job_id: str, listener: Listener) -> None:
        self.api = api
        self.job_id = job_id
        self.listener = listener
        self.status = ""
        self.sent = self.failed = self.total = 0
        self.refusal = ""  # the gateway's last `error` without a recipient: why it closes
        self.last_note = ""

    def run(self) -> dict[str, Any]:
        """The job's final row. Raises ApiError when the job cannot be followed (not found, the
        credential refused) and Unreachable only when the API cannot be reached at the start."""
        job = self.api.get(f"/jobs/{self.job_id}")
        self._show_row(job)
        failures = 0
        while job["status"] not in TERMINAL:
            heard = False
            try:
                heard = self._listen()
            except InvalidStatus as exc:
                status = exc.response.status_code
                if 400 <= status < 500 and status != 429:  # the gateway accepts before refusing: not it
                    raise ApiError(status, f"the job's socket was refused: {exc}") from exc
                self._note(f"live connection refused ({status}); asking the job instead")
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                self._note(f"live connection failed ({type(exc).__name__}); asking the job instead")
            failures = 0 if heard else failures + 1
            job = self._wait(RECONNECT_S[min(failures, len(RECONNECT_S) - 1)]) or job
        return job

    def _wait(self, seconds: float) -> dict[str, Any] | None:
        """The row, asked now and every POLL_S for `seconds` or until the job has ended."""
        deadline = time.monotonic() + seconds
        while True:
            job = self._poll()
            left = deadline - time.monotonic()
            if (job is not None and job["status"] in TERMINAL) or left <= 0:
                return job
            time.sleep(min(POLL_S, left))

    def _listen(self) -> bool:
        """One socket, until the job's end is announced or the socket is gone. True when it
        brought any news (the next reconnect need not wait long)."""
        offer: Any = ["bearer", self.api.token] if self.api.token else None
        heard = False
        url = f"{self.api.ws_url}/ws/job/{self.job_id}"
        # A short close_timeout: leaving (Ctrl-C above all) waits for the close handshake.
        with connect(url, subprotocols=offer, open_timeout=10, close_timeout=0.5, max_size=None) as ws:
            while True:
                try:
                    raw = ws.recv(timeout=SILENCE_S)
                except TimeoutError:
                    job = self._poll()
                    if job is not None and job["status"] in TERMINAL:
                        return heard
                    continue
                except ConnectionClosed as exc:
                    if exc.rcvd is not None and exc.rcvd.code in FINAL_CLOSES:
                        status = FINAL_CLOSES[exc.rcvd.code]
                        raise ApiError(status, self.refusal or exc.rcvd.reason or "refused") from exc
                    return heard
                heard = True
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(event, dict) and self._on_event(event):
                    return heard

    def _on_event(self, event: dict[str, Any]) -> bool:
        """Shows what the event says; True when it announces the job's end."""
        kind = event.get("type")
        progress = event.get("progress")
        if kind in ("progress", "error") and isinstance(progress, dict):
            status = "processing" if self.status in ("", "pending") else self.status
            # Events may be older than the row last asked: counters shown never go back.
            self._show(status, progress, rising=True)
        elif kind == "error":
            self.refusal = str(event.get("message") or event.get("error") or "")
        elif kind in STATE_EVENTS:
            self._show(STATE_EVENTS[kind], None)
            if event.get("message") and kind != "job_started":
                self._note(str(event["message"]))
        elif kind == "job_completed":
            self._show(str(event.get("status") or "completed"), event.get("results"))
            return True
        elif kind == "job_failed":
            self._note(str(event.get("message") or event.get("error") or "the job failed"))
            return True
        elif kind == "job_status":
            # A job whose end this address was already told: the socket stays open, silent.
            return str(event.get("status")) in TERMINAL
        return False

    def _poll(self) -> dict[str, Any] | None:
        """The row, or None when the API cannot answer right now (it is asked again later)."""
        try:
            job = self.api.get(f"/jobs/{self.job_id}")
        except Unreachable as exc:
            self._note(str(exc))
            return None
        except ApiError as exc:
            if exc.status < 500:
                raise
            self._note(exc.message)
            return None
        self._show_row(job)
        return dict(job)

    def _note(self, text: str) -> None:
        """A note, once while it stays the same (a socket failing again is no news)."""
        if text != self.last_note:
            self.last_note = text
            self.listener.note(text)

    def _show_row(self, job: dict[str, Any]) -> None:
        self._show(job.get("status", ""), job.get("progress"))

    def _show(self, status: str, progress: dict[str, Any] | None, *, rising: bool = False) -> None:
        self.status = status or self.status
        if progress:
            sent, failed = int(progress.get("sent", 0)), int(progress.get("failed", 0))
            self.sent, self.failed = (max(sent, self.sent), max(failed, self.failed)) if rising else (sent, failed)
            self.total = int(progress.get("total") or self.total)
        self.listener.update(Counts(self.status, self.sent, self.failed, self.total))
