"""Campaigns: batches, their jobs (one per recipient), file ingestion and the feeder."""
