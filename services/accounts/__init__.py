"""Accounts: tenants, users, API keys, sessions, the credit ledger and notifications."""
