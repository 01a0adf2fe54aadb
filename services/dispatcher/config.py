import json
import re
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import GrpcServiceSettings, reject_placeholders

from .crypto import KEY_ID_PATTERN
from .providers.voice import SimulatedVoiceBehaviour

_SecretKeys = TypeAdapter(dict[str, str])

# Also what a device of the simulated provider answers to every send where it is refused.
SIMULATED_DEVICES_REFUSED = (
    "the simulated provider sends nothing (it invents deliveries) and is refused outside development "
    "unless PREGONERO_DEMO=true: choose a real provider (whatsapp_cloud, wablas or waha)"
)


class DispatcherSettings(GrpcServiceSettings):
    # A refused setting must not print the others: they include keys (merged with the base's).
    model_config = SettingsConfigDict(hide_input_in_errors=True)

    service_name: str = "dispatcher"
    accounts_addr: str = "127.0.0.1:50051"
    campaigns_addr: str = "127.0.0.1:50052"
    # Encrypts sender secrets at rest: the master key (any string; the encryption key is
    # derived from it with scrypt, see crypto.py) and the id stored beside every secret it
    # seals. A secret opens only with the key its id names.
    pregonero_secret_key: SecretStr = SecretStr("dev-secret-change-me")
    pregonero_secret_key_id: str = Field("1", pattern=KEY_ID_PATTERN)
    # Keys that open the secrets they sealed but seal nothing: a JSON object {"<id>": "<key>"}.
    # To rotate: add the current key here under its id, set PREGONERO_SECRET_KEY to a new key
    # and PREGONERO_SECRET_KEY_ID to a new id, and roll out; new secrets are sealed under the
    # new key and the old ones still open. Then `python -m services.dispatcher.reseal` seals
    # every stored secret again under the current key (secrets from before key ids too), and
    # the old entry may go. With several replicas, first roll out the new key here alone, so
    # that every replica opens what the first to switch seals.
    pregonero_previous_secret_keys: SecretStr = SecretStr("")
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
    # Outside development the simulated voice line and simulated WhatsApp devices would
    # invent calls and deliveries that tenants are billed for: they are refused there, except
    # on a deployment that says it is a demo.
    pregonero_demo: bool = False
    # The provider of a WhatsApp device created without one: the bulk sender's device form
    # names none (its token and secret are a device gateway's credentials).
    default_device_provider: Literal["simulated", "whatsapp_cloud", "wablas", "waha"] = "simulated"
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
    # Where the WhatsApp providers are reached: the operator's choice, never a tenant's (a
    # device's provider_config cannot name an endpoint). Wablas runs regional servers (such
    # as https://texas.wablas.com); the deployment names the one its customers' devices are
    # on. A provider whose endpoint is unset refuses new devices with a 400.
    whatsapp_graph_url: str = "https://graph.facebook.com"
    wablas_base_url: str = ""
    # The public URL of the gateway's /webhooks/wablas and its WABLAS_WEBHOOK_SECRET: each
    # wablas device's Tracking URL is set to it, with the device's id and a key derived for it
    # (wablas_tracking.py). Unset: devices keep the Tracking URL their owner gave them.
    wablas_webhook_url: str = ""
    wablas_webhook_secret: SecretStr = SecretStr("")
    # A WAHA-style WhatsApp HTTP API: its key (X-Api-Key), the key its webhooks are signed
    # with (HMAC), and the public URL of our /webhooks/waha it is told to call.
    waha_base_url: str = ""
    waha_api_key: SecretStr = SecretStr("")
    waha_webhook_hmac_key: SecretStr = SecretStr("")
    waha_webhook_url: str = ""
    # How often each device's connection is asked about (device gateways rate-limit status
    # calls too: modest); the asks are spread over the period, each bounded by the timeout.
    device_poll_seconds: float = 30.0
    device_poll_timeout_seconds: float = 10.0

    @field_validator("whatsapp_graph_url", "wablas_base_url", "wablas_webhook_url", "waha_base_url", "waha_webhook_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @field_validator("device_poll_seconds", "device_poll_timeout_seconds")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be more than 0 seconds")
        return value

    @property
    def simulation_allowed(self) -> bool:
        """Whether the simulated voice line and WhatsApp devices may run here."""
        return self.is_development or self.pregonero_demo

    def unconfigured_providers(self) -> dict[str, str]:
        """Providers this deployment cannot reach, with the reason a new device of theirs gets."""
        missing: dict[str, str] = {}
        if not self.simulation_allowed:
            missing["simulated"] = SIMULATED_DEVICES_REFUSED
        if not self.wablas_base_url:
            missing["wablas"] = "wablas is not configured on this deployment"
        if not (self.waha_base_url and self.waha_webhook_url):
            missing["waha"] = "waha is not configured on this deployment"
        return missing

    @model_validator(mode="after")
    def _voice_config_is_json(self) -> Self:
        try:
            config = json.loads(self.simulated_voice_config or "{}")
        except ValueError as exc:
            raise ValueError(f"SIMULATED_VOICE_CONFIG is not JSON: {exc}") from exc
        try:
            SimulatedVoiceBehaviour.from_config(config)
        except ValueError as exc:  # it says which key is wrong, as a device's provider_config
            raise ValueError(f"SIMULATED_VOICE_CONFIG: {exc}") from None
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
    def _wablas_webhook_is_keyed(self) -> Self:
        if self.wablas_webhook_url and not self.wablas_webhook_secret.get_secret_value():
            raise ValueError("WABLAS_WEBHOOK_URL needs WABLAS_WEBHOOK_SECRET (the gateway's)")
        return self

    def previous_secret_keys(self) -> dict[str, str]:
        spec = self.pregonero_previous_secret_keys.get_secret_value().strip()
        return _SecretKeys.validate_json(spec) if spec else {}

    @model_validator(mode="after")
    def _previous_secret_keys_are_an_object(self) -> Self:
        try:
            keys = self.previous_secret_keys()
        except ValidationError as exc:
            # Not the pydantic message: that would quote the keys.
            raise ValueError('PREGONERO_PREVIOUS_SECRET_KEYS is not a JSON object {"<id>": "<key>"}') from exc
        bad = [kid for kid in keys if not re.match(KEY_ID_PATTERN, kid)]
        if bad:
            raise ValueError(
                f"PREGONERO_PREVIOUS_SECRET_KEYS: {bad[0][:40]!r} is not a key id (1 to 32 of A-Za-z0-9_.-)"
            )
        return self

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Self:
        reject_placeholders(self, PREGONERO_SECRET_KEY=self.pregonero_secret_key.get_secret_value())
        for kid, key in self.previous_secret_keys().items():
            reject_placeholders(self, **{f"PREGONERO_PREVIOUS_SECRET_KEYS[{kid}]": key})
        if self.waha_base_url:
            # Unsigned session webhooks would let anyone mark a device connected or not.
            reject_placeholders(self, WAHA_WEBHOOK_HMAC_KEY=self.waha_webhook_hmac_key.get_secret_value())
        if self.wablas_webhook_url:
            # The key of every device's Tracking URL is derived from it.
            reject_placeholders(self, WABLAS_WEBHOOK_SECRET=self.wablas_webhook_secret.get_secret_value())
        if self.voice_provider == "retell":
            # deploy/k8s ships `changeme` for these: a forgotten one stops the rollout.
            reject_placeholders(
                self,
                RETELL_API_KEY=self.retell_api_key.get_secret_value(),
                RETELL_AGENT_ID=self.retell_agent_id,
                RETELL_FROM_NUMBER=self.retell_from_number,
            )
        return self

    @model_validator(mode="after")
    def _no_simulated_calls_outside_development(self) -> Self:
        # Last: a missing secret is the first thing to hear about.
        if self.voice_provider == "simulated" and not self.simulation_allowed:
            raise ValueError(
                f"VOICE_PROVIDER=simulated places no calls (it invents their outcomes) and is refused with "
                f"ENVIRONMENT={self.environment}: set VOICE_PROVIDER=retell and its RETELL_* settings, "
                "or PREGONERO_DEMO=true on a demo deployment"
            )
        return self
