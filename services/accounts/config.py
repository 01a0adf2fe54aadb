from services.runtime.settings import GrpcServiceSettings


class AccountsSettings(GrpcServiceSettings):
    service_name: str = "accounts"
    # The account that work from account-less clients (the WhatsApp bulk sender) belongs to.
    pregonero_default_account: str = "default"
