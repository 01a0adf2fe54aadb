from pydantic import Field

from services.runtime.settings import GrpcServiceSettings


class AccountsSettings(GrpcServiceSettings):
    service_name: str = "accounts"
    # The account that work from account-less clients (the WhatsApp bulk sender) belongs to.
    pregonero_default_account: str = "default"

    # Authentication. The key that signs access tokens: an Ed25519, RSA or P-256 private key
    # in PEM (literal "\n" allowed). Outside development it is required; in development one is
    # generated once into the data folder.
    pregonero_jwt_private_key: str = ""
    pregonero_jwt_issuer: str = "pregonero"
    pregonero_access_token_ttl_seconds: int = Field(900, ge=30, le=3600)
    # A session idle for this long must log in again; each refresh moves it forward.
    pregonero_refresh_token_ttl_seconds: int = Field(14 * 24 * 3600, ge=300)
    pregonero_data_dir: str = ".data"
    # Both set: this admin user is made on start when it does not exist (its password is
    # never changed afterwards).
    pregonero_admin_email: str = ""
    pregonero_admin_password: str = ""
    pregonero_login_max_failures: int = Field(5, ge=1)
    pregonero_login_window_seconds: int = Field(900, ge=1)
    # argon2id cost: the OWASP minimum profile (19 MiB, 2 passes, 1 lane); raise it where
    # the CPU allows. Existing hashes are upgraded at their next login.
    pregonero_argon2_memory_kib: int = Field(19456, ge=8)
    pregonero_argon2_time_cost: int = Field(2, ge=1)
    pregonero_argon2_parallelism: int = Field(1, ge=1)
