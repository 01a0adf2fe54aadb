"""A local server speaking the Retell-style voice API the `retell` adapter calls: create a
phone call, then get it as it rings, talks and ends. Each destination number can be given a
script (how the call ends, how long it takes to end, when its analysis arrives, or a refusal
of the create); everything received is kept for the test to inspect."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

API_KEY = "key_test_retell"


@dataclass
class Script:
    disconnection_reason: str = "user_hangup"
    duration_ms: int = 42_000
    # get-call answers before the call reads as ended (registered, then ongoing)
    polls_until_end: int = 2
    # get-call answers of the ended call that still lack call_analysis
    analysis_after: int = 0
    in_voicemail: bool = False
    sentiment: str = "Positive"
    refuse: tuple[int, str] | None = None  # (status, message) for create-phone-call
    custom: dict[str, Any] = field(default_factory=lambda: {"fecha_pago_cliente": "2026-12-01"})


@dataclass
class FakeCall:
    call_id: str
    body: dict[str, Any]
    script: Script
    created_ms: int
    gets: int = 0


@dataclass
class FakeRetell:
    scripts: dict[str, Script] = field(default_factory=dict)
    calls: dict[str, FakeCall] = field(default_factory=dict)
    # the next this many get-call requests fail with 500 (a provider blip)
    failing_gets: int = 0
    url: str = ""

    def placed_to(self, number: str) -> list[FakeCall]:
        return [c for c in self.calls.values() if c.body.get("to_number") == number]

    def view(self, call: FakeCall) -> dict[str, Any]:
        s = call.script
        call.gets += 1
        base = {
            "call_id": call.call_id,
            "call_type": "phone_call",
            "agent_id": call.body.get("override_agent_id"),
            "from_number": call.body.get("from_number"),
            "to_number": call.body.get("to_number"),
            "metadata": call.body.get("metadata"),
            "retell_llm_dynamic_variables": call.body.get("retell_llm_dynamic_variables"),
        }
        if call.gets <= s.polls_until_end:
            return {**base, "call_status": "registered" if call.gets == 1 else "ongoing"}
        answered = s.disconnection_reason not in ("dial_no_answer", "dial_busy", "dial_failed")
        start = call.created_ms + 3_000
        ended = {
            **base,
            "call_status": "ended",
            "disconnection_reason": s.disconnection_reason,
            "start_timestamp": start,
            "end_timestamp": start + (s.duration_ms if answered else 0),
            "duration_ms": s.duration_ms if answered else 0,
            "transcript": "Agent: Buenos días.\nUser: Pago el lunes." if answered else "",
            "recording_url": f"https://recordings.example/{call.call_id}.wav" if answered else None,
            "public_log_url": f"https://logs.example/{call.call_id}.txt",
            "collected_dynamic_variables": {"current_node": "cierre"} if answered else {},
        }
        if call.gets > s.polls_until_end + s.analysis_after:
            ended["call_analysis"] = {
                "call_summary": "El cliente promete pagar el lunes." if answered else "",
                "user_sentiment": s.sentiment if answered else "Unknown",
                "in_voicemail": s.in_voicemail,
                "call_successful": answered,
                "custom_analysis_data": s.custom if answered else {},
            }
        return ended

    def app(self) -> FastAPI:
        app = FastAPI()

        def authorised(request: Request) -> bool:
            return request.headers.get("authorization") == f"Bearer {API_KEY}"

        @app.post("/v2/create-phone-call")
        async def create(request: Request) -> JSONResponse:
            if not authorised(request):
                return JSONResponse({"message": "Invalid API key"}, status_code=401)
            body = await request.json()
            for key in ("from_number", "to_number"):
                if not str(body.get(key, "")).startswith("+"):
                    return JSONResponse({"message": f"{key} must be E.164"}, status_code=400)
            variables = body.get("retell_llm_dynamic_variables") or {}
            if any(not isinstance(v, str) for v in variables.values()):
                return JSONResponse({"message": "dynamic variables must be strings"}, status_code=422)
            script = self.scripts.get(body["to_number"], Script())
            if script.refuse:
                status, message = script.refuse
                return JSONResponse({"message": message}, status_code=status)
            call = FakeCall(secrets.token_hex(16), body, script, int(time.time() * 1000))
            self.calls[call.call_id] = call
            return JSONResponse({"call_id": call.call_id, "call_status": "registered", **body}, status_code=201)

        @app.get("/v2/get-call/{call_id}")
        async def get(call_id: str, request: Request) -> JSONResponse:
            if not authorised(request):
                return JSONResponse({"message": "Invalid API key"}, status_code=401)
            if self.failing_gets > 0:
                self.failing_gets -= 1
                return JSONResponse({"message": "internal error"}, status_code=500)
            call = self.calls.get(call_id)
            if call is None:
                return JSONResponse({"message": "Call not found"}, status_code=404)
            return JSONResponse(self.view(call))

        return app
