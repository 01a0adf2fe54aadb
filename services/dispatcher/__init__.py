"""Dispatcher: senders, send attempts, provider adapters and the paced fan-out."""
