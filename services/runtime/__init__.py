"""The runtime every service shares: settings, logs, Postgres, NATS (and its users, nats_auth.py;
dead letters replayed by their subject's publisher, dead_letter_replays.py), gRPC lifecycle,
Prometheus metrics (metrics.py), OpenTelemetry traces across HTTP, gRPC, SQL and NATS
(tracing.py), the streaming CSV and XLSX writers of every export (exports.py), phone numbers as
libphonenumber reads and validates them at ingest speed (phones.py), dev stack."""
