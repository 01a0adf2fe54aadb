"""Accounts: tenants, their credit ledger, users and sign-in, notifications and the audit log.

Files, by what they hold:
- main.py (wiring), config.py (settings), server.py, auth_server.py, notify_server.py,
  sync_server.py (gRPC servicers: proto in, domain call, proto out).
- domain.py (account rules), ledger.py (the credit ledger), charges.py (results become
  captures), ledger_drift.py (the drift watch), ledger_export.py (the ledger as a file).
- auth.py (users, passwords, tokens, sessions, API keys), sync_operations.py (offline
  operations applied once), notifications.py (notifications made from events), audit.py.
- repo.py, auth_repo.py, notify_repo.py, sync_repo.py (the SQL); migrations/ (the schema).
"""
