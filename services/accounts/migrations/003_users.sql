-- Authentication: users, sessions (refresh-token families), API keys, login attempts.
CREATE TABLE users (
    user_id       text PRIMARY KEY,
    email         text NOT NULL,
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('admin', 'member')),
    -- A member belongs to one account; an admin to none, since it reaches all of them.
    account_id    text REFERENCES accounts (account_id),
    is_active     boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((role = 'member') = (account_id IS NOT NULL))
);
-- One user per address however it is capitalised.
CREATE UNIQUE INDEX users_email_key ON users (lower(email));
CREATE INDEX users_account_idx ON users (account_id);

-- One login. Its refresh tokens form a family: revoking the session ends all of them and
-- every access token that carries its id (`sid`).
CREATE TABLE sessions (
    session_id    text PRIMARY KEY,
    user_id       text NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    client_ip     text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- Moves forward on each refresh; a session idle for the refresh lifetime ends.
    expires_at    timestamptz NOT NULL,
    revoked_at    timestamptz,
    revoke_reason text NOT NULL DEFAULT ''
);
CREATE INDEX sessions_user_idx ON sessions (user_id);
CREATE INDEX sessions_expires_idx ON sessions (expires_at);

-- Refresh tokens by their SHA-256 (the token is 256 random bits); each works once. Spent
-- tokens are kept until they expire, so a replay is recognised as one.
CREATE TABLE refresh_tokens (
    token_hash bytea PRIMARY KEY,
    session_id text NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX refresh_tokens_session_idx ON refresh_tokens (session_id);

-- Per-account API keys, by the SHA-256 of the secret; the secret itself is shown once.
CREATE TABLE api_keys (
    key_id       text PRIMARY KEY,
    account_id   text NOT NULL REFERENCES accounts (account_id),
    name         text NOT NULL,
    key_hash     bytea NOT NULL UNIQUE,
    prefix       text NOT NULL,
    last4        text NOT NULL,
    created_by   text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_account_idx ON api_keys (account_id, created_at);

-- Login attempts per client address, in the database so every gateway replica sees one
-- limit. An attempt counts as failed until its password has been verified.
CREATE TABLE login_attempts (
    attempt_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client_ip    text NOT NULL,
    email        text NOT NULL DEFAULT '',
    attempted_at timestamptz NOT NULL DEFAULT now(),
    succeeded    boolean NOT NULL DEFAULT false
);
CREATE INDEX login_attempts_ip_idx ON login_attempts (client_ip, attempted_at);
