-- Tenants. Balances and the ledger arrive with the ledger migration.
CREATE TABLE accounts (
    account_id        text PRIMARY KEY,
    -- The dashboards expect a 24-hex `_id` beside the readable id.
    object_id         text NOT NULL UNIQUE DEFAULT substr(md5(random()::text || clock_timestamp()::text), 1, 24),
    account_name      text NOT NULL,
    status            text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended', 'inactive')),
    plan_type         text NOT NULL DEFAULT 'credit_based'
                      CHECK (plan_type IN ('credit_based', 'minutes_based', 'unlimited')),
    country           text NOT NULL DEFAULT 'CL' CHECK (country IN ('CL', 'AR')),
    timezone          text NOT NULL DEFAULT 'America/Santiago',
    contact_name      text NOT NULL DEFAULT '',
    contact_email     text NOT NULL DEFAULT '',
    contact_phone     text NOT NULL DEFAULT '',
    features          jsonb NOT NULL DEFAULT '{}'::jsonb,
    settings          jsonb NOT NULL DEFAULT '{}'::jsonb,
    suspension_reason text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
