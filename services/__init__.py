"""Pregonero services: accounts, campaigns, dispatcher, gateway, and their shared runtime."""
