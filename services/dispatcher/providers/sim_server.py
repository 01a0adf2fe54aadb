"""The simulated provider as its own HTTP server, so its record of accepted sends outlives a
dispatcher that is killed mid-send.

    python -m services.dispatcher.providers.sim_server --port 9100 [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from services.dispatcher.providers.base import SenderConfig, SendRequest
from services.dispatcher.providers.simulated import NAME, SimulatedProvider, SimulationRecord

MAX_PAGE = 10_000


def _bad_request(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=400)


def _parse_message(body: Any) -> SendRequest | str:
    """The send request in a POST body, or what is wrong with it."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    attempt_id, sender_id, to, text = (body.get(k) for k in ("attempt_id", "sender_id", "to", "text"))
    if not isinstance(attempt_id, str) or not attempt_id:
        return "attempt_id must be a non-empty string"
    if isinstance(sender_id, bool) or not isinstance(sender_id, int):
        return "sender_id must be an integer"
    if not isinstance(to, str) or not to:
        return "to must be a non-empty string"
    if not isinstance(text, str):
        return "text must be a string"
    behaviour = body.get("behaviour")
    if behaviour is None:
        behaviour = {}
    if not isinstance(behaviour, dict):
        return "behaviour must be an object"
    sender = SenderConfig(id=sender_id, account_id="", provider=NAME, config=behaviour)
    return SendRequest(attempt_id=attempt_id, sender=sender, to=to, text=text)


def create_app(record: SimulationRecord | None = None) -> FastAPI:
    record = record if record is not None else SimulationRecord()
    provider = SimulatedProvider(record)
    app = FastAPI(title="pregonero simulated provider", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.record = record

    @app.post("/v1/messages")
    async def send(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _bad_request("body is not valid JSON")
        parsed = _parse_message(body)
        if isinstance(parsed, str):
            return _bad_request(parsed)
        try:
            provider.behaviour_for(parsed.sender)
        except ValueError as exc:
            return _bad_request(str(exc))
        result = await provider.send(parsed)
        if result.status == "sent":
            return JSONResponse({"message_id": result.provider_message_id})
        if result.status == "rate_limited":
            # Retry-After is whole seconds on the wire; never round a wait down to zero.
            seconds = max(1, round(result.retry_after))
            return JSONResponse({"error": "rate_limited"}, status_code=429, headers={"Retry-After": str(seconds)})
        return JSONResponse({"error": result.error}, status_code=502)

    @app.get("/v1/messages/{attempt_id:path}")
    async def lookup(attempt_id: str) -> Response:
        found = record.lookup(attempt_id)
        if found is None:
            return JSONResponse({"error": "not_found"}, status_code=404)
        entry = found.entry
        return JSONResponse(
            {
                "message_id": found.message_id,
                "to": entry.to,
                "text": entry.text,
                "sender_id": entry.sender_id,
                "accepted_at": entry.accepted_at,
            }
        )

    @app.get("/v1/record")
    async def read_record(request: Request) -> Response:
        try:
            since = int(request.query_params.get("since", 0))
            limit = int(request.query_params.get("limit", MAX_PAGE))
        except ValueError:
            since = limit = -1
        if since < 0 or limit < 1:
            return _bad_request("since must be an integer >= 0 and limit an integer >= 1")
        page = record.entries(since, min(limit, MAX_PAGE))
        return JSONResponse(
            {
                "count": record.count(),
                "duplicate_attempts": record.duplicate_attempts,
                "rejected": record.rejected,
                "since": since,
                "next": since + len(page),
                "entries": [[e.attempt_id, e.sender_id, e.to, e.accepted_at] for e in page],
            }
        )

    @app.post("/v1/reset")
    async def reset() -> Response:
        nonlocal provider
        record.reset()
        # Seeded senders start their streams again, so a reset run repeats exactly.
        provider = SimulatedProvider(record)
        return JSONResponse({"count": 0})

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
