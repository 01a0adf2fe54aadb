"""Campaigns: batches and their jobs (one per recipient or debtor), file ingestion, the feeder
and the dialer that release work to the dispatchers, results, scheduled messages, the address
book, exports and analytics.

Files, by what they hold:
- main.py (wiring), config.py (settings), server.py, messages_server.py,
  address_book_server.py (gRPC servicers).
- WhatsApp bulk: bulkfile.py (the pipe-separated file), template.py (@valorN), batches.py
  (ingest, pause, resume, cancel, retry), feeder.py (releases chunks to DISPATCH), credit.py
  (holds asked of accounts), results_applier.py (the dispatchers' results applied),
  delivery.py (providers' delivery reports), device_events.py and account_events.py (what the
  other services say, applied to batches), batch_publisher.py (what campaigns tells the others:
  run state and progress events).
- Voice: voice_batches.py (contact files in, call jobs out, the dashboard's edits),
  contacts/ (the customer files' readers), calling_rules.py (call settings, windows, retries,
  Chile's limits), dialer.py (releases due calls), call_outcomes.py (an ended call booked).
- Scheduler: scheduled_messages.py, address_book.py, contact_import.py.
- Reports: exports.py (what each export reads), analytics.py (chart-ready figures),
  campaign_metrics.py (Prometheus).
- repo.py, voice_repo.py, messages_repo.py, address_book_repo.py, analytics_repo.py (the SQL);
  migrations/ (the schema).
"""
