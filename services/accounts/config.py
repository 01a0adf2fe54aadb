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
    # A second key the JWKS publishes and tokens verify with, never signs with: the key
    # before the last rotation (its PEM, private or public). To rotate: generate a new key;
    # set this to the value PREGONERO_JWT_PRIVATE_KEY has now and that one to the new key;
    # roll out. New tokens carry the new kid; tokens signed before stay valid, as the key set
    # still holds their key. Once the longest access token has expired (the TTL below) and
    # the key set caches have renewed (5 minutes: the gateway's and Envoy's), unset this and
    # roll out again: tokens of the old key stop verifying. With several replicas, first
    # publish the new key here alone, then swap: a token is never signed with a key that the
    # replica the gateway fetched the key set from does not publish yet.
    pregonero_jwt_previous_key: str = ""
    pregonero_jwt_issuer: str = "pregonero"
    # Whom access tokens are for; the gateway requires the same value (its own setting of this
    # name). Refresh tokens are opaque secrets, not JWTs, and can never pass for one.
    pregonero_jwt_audience: str = "pregonero-api"
    pregonero_access_token_ttl_seconds: int = Field(900, ge=30, le=3600)
    # A session idle for this long must log in again; each refresh moves it forward.
    pregonero_refresh_token_ttl_seconds: int = Field(14 * 24 * 3600, ge=300)
    pregonero_data_dir: str = ".data"
    # Both set: this admin user is made on start when it does not exist (its password is
    # never changed afterwards).
    pregonero_admin_email: str = ""
    pregonero_admin_password: str = ""
    # Failed logins per client address, and per e-mail from any address, within the window;
    # then 429 until the oldest leaves it. A successful login resets its e-mail's count.
    pregonero_login_max_failures: int = Field(5, ge=1)
    pregonero_login_max_email_failures: int = Field(10, ge=1)
    pregonero_login_window_seconds: int = Field(900, ge=1)
    # argon2id cost: the OWASP minimum profile (19 MiB, 2 passes, 1 lane); raise it where
    # the CPU allows. Existing hashes are upgraded at their next login.
    pregonero_argon2_memory_kib: int = Field(19456, ge=8)
    pregonero_argon2_time_cost: int = Field(2, ge=1)
    pregonero_argon2_parallelism: int = Field(1, ge=1)
