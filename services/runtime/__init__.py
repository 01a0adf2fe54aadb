"""The runtime every service shares: settings, logs, Postgres, NATS, gRPC lifecycle, dev stack."""
