import json
from typing import Literal, Self

from pydantic import SecretStr, model_validator

from services.runtime.settings import GrpcServiceSettings, reject_placeholders

from .providers.voice import SimulatedVoiceBehaviour


class DispatcherSettings(GrpcServiceSettings):
    service_name: str = "dispatcher"
    accounts_addr: str = "127.0.0.1:50051"
    campaigns_addr: str = "127.0.0.1:50052"
    # Encrypts sender secrets at rest. Any string works (a Fernet key is derived from it);
    # changing it makes the stored secrets unreadable, so it is set once per deployment.
    pregonero_secret_key: SecretStr = SecretStr("dev-secret-change-me")
    # Where the `simulated` provider runs: empty = in this process; a URL = its own server
    # (`python -m services.dispatcher.providers.sim_server`), whose record outlives us.
    simulated_provider_url: str = ""
    # Sends held at once (queued in lanes or at a provider): the free-slot count for fetching.
    max_in_flight: int = 20_000
    # How the `simulated` voice line behaves (JSON; see providers/voice.py): outcome ratios,
    # durations, and `time_scale` (0.01 makes a 60-s call take 0.6 s).
    simulated_voice_config: str = "{}"
    # Who places the calls: `simulated` (the line above) or `retell` (a Retell-style API at
    # RETELL_API_URL; the agent and the caller id a call uses unless its line says otherwise).
    voice_provider: Literal["simulated", "retell"] = "simulated"
    retell_api_url: str = "https://api.retellai.com"
    retell_api_key: SecretStr = SecretStr("")
    retell_agent_id: str = ""
    retell_from_number: str = ""
    # How often a call in progress is asked about (calls last minutes; the result waits for it).
    retell_poll_seconds: float = 2.0
    # Calls this dispatcher keeps up at once (campaigns bounds each account's by its lines).
    max_calls: int = 2_000
    # On shutdown, calls in progress may go on this long (the pod's termination grace period
    # must be longer); a call still up then is cut, and reported failed after the restart.
    call_drain_seconds: float = 60.0
    dispatch_ack_wait_seconds: float = 15.0
    # On shutdown, messages at a provider get this long to answer before their outcome is
    # left to the redelivery (providers time out within 15 s).
    send_drain_seconds: float = 20.0
    # A claimed send whose outcome was lost is looked up at the provider once it is this old
    # (longer than any send can be under way), and sent again only if the provider never got it.
    send_grace_seconds: float = 30.0

    @model_validator(mode="after")
    def _voice_config_is_json(self) -> Self:
        try:
            config = json.loads(self.simulated_voice_config or "{}")
        except ValueError as exc:
            raise ValueError(f"SIMULATED_VOICE_CONFIG is not JSON: {exc}") from exc
        SimulatedVoiceBehaviour.from_config(config)  # says which key is wrong
        return self

    @model_validator(mode="after")
    def _retell_is_complete(self) -> Self:
        if self.voice_provider == "retell":
            missing = [
                name
                for name, value in (
                    ("RETELL_API_KEY", self.retell_api_key.get_secret_value()),
                    ("RETELL_AGENT_ID", self.retell_agent_id),
                    ("RETELL_FROM_NUMBER", self.retell_from_number),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"VOICE_PROVIDER=retell needs {', '.join(missing)}")
        return self

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Self:
        reject_placeholders(self, PREGONERO_SECRET_KEY=self.pregonero_secret_key.get_secret_value())
        return self
