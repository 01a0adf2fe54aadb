"""Dispatcher: WhatsApp devices and voice lines (senders), and the high-throughput fan-out of
the work campaigns releases to the providers, with backpressure and pacing.

Files, by what they hold:
- main.py (wiring), config.py (settings), server.py (gRPC servicer).
- engine.py (the WhatsApp fan-out: DISPATCH chunks, send slots, pacing, results),
  call_engine.py (places voice calls and reports their ends), runstate.py (batch run states
  from KV), send_metrics.py (Prometheus).
- senders.py (devices: validation, scoping, secrets), crypto.py (secrets at rest), reseal.py
  (secrets moved onto a new key), connections.py and device_states.py (what providers say of
  each device), waha_sessions.py, wablas_tracking.py, wablas_messages.py (provider specifics).
- providers/: one adapter per provider (simulated, sim_server, whatsapp_cloud, wablas, waha,
  voice, retell) behind providers/base.py.
- repo.py (the SQL); migrations/ (the schema).
"""
