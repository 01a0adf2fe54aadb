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
    db_pool_max: int = 2

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
