from pydantic import Field, SecretStr

from services.runtime.settings import BaseServiceSettings


class GatewaySettings(BaseServiceSettings):
    service_name: str = "gateway"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    accounts_addr: str = "127.0.0.1:50051"
    campaigns_addr: str = "127.0.0.1:50052"
    dispatcher_addr: str = "127.0.0.1:50053"
    # Comma-separated origins; "*" (the development default) allows any.
    cors_origins: str = "*"
    # `token=admin` or `token=account:<id>`, comma-separated: operator tokens for the
    # deployed dashboards, which store a static string.
    pregonero_static_tokens: str = ""
    pregonero_default_account: str = "default"
    # Off by default; set on private-network deployments whose clients send no token.
    pregonero_anonymous_account: str = ""
    # Not used: the gateway keeps no data and opens no pool (a DATABASE_URL given is ignored).
    database_url: str = ""
    # How long an idle keep-alive connection stays open. Longer than the proxy's idle timeout
    # for its upstream connections (Envoy: 60 s, deploy/envoy and deploy/k8s), so it is always
    # the proxy that closes one: were it the gateway, a request the proxy sends on the
    # connection as it closes would be lost (a 503 "upstream reset" at the client; uvicorn's
    # default of 5 s met the dashboard's 5-second poll exactly).
    http_keep_alive_seconds: int = Field(75, ge=1)
    # JWTs are checked against the accounts service's public key (fetched from it) and issuer.
    pregonero_jwt_issuer: str = "pregonero"
    # The audience access tokens must name: accounts' PREGONERO_JWT_AUDIENCE, the same value.
    pregonero_jwt_audience: str = "pregonero-api"
    # How long a session or API key check is reused. This bounds how late a logout, a
    # replayed refresh token or a revoked key takes effect on another gateway replica.
    pregonero_auth_cache_seconds: float = Field(5.0, ge=0, le=5)
    # How often an open WebSocket's session or API key is checked again (from that cache):
    # a socket outlives a revocation made through another replica by at most the two summed.
    pregonero_socket_recheck_seconds: float = Field(5.0, gt=0, le=30)
    # Envoy's own addresses (addresses or CIDRs), the only peers whose X-Forwarded-For is
    # believed; any other peer is the client itself, whatever it writes there. The login
    # and WebSocket limits count per client address. Empty (the default): nobody is trusted,
    # so the deployment names its proxy (devstack: loopback; deploy/k8s: Envoy's pods).
    pregonero_trusted_proxies: str = ""
    # WebSockets one client (address) may open: a burst, then this many a second. The bulk
    # sender opens one or two per job; a client reconnecting in a loop is refused (4429).
    pregonero_ws_connect_burst: int = Field(20, ge=1)
    pregonero_ws_connects_per_second: float = Field(2.0, gt=0)

    # The WhatsApp Cloud API webhook (/webhooks/whatsapp): the Meta app's secret, which signs
    # every delivery, and the token the operator typed when subscribing. Unset: no webhook.
    whatsapp_app_secret: SecretStr = SecretStr("")
    whatsapp_verify_token: SecretStr = SecretStr("")
    # The Wablas status webhook (/webhooks/wablas): Wablas signs nothing, so each device's
    # Tracking URL carries a key derived from this secret for that device alone (see
    # routes/wablas_webhook.py; the dispatcher must know the same secret). Unset: no webhook.
    wablas_webhook_secret: SecretStr = SecretStr("")
    # The WAHA webhook (/webhooks/waha): the key WAHA signs each post with (X-Webhook-Hmac),
    # the same WAHA_WEBHOOK_HMAC_KEY the dispatcher configures the sessions with. Unset: no webhook.
    waha_webhook_hmac_key: SecretStr = SecretStr("")

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
