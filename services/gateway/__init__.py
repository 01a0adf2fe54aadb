"""Gateway: the public REST and WebSocket API (FastAPI behind Envoy), in the shapes the
deployed frontends read; it authenticates callers and calls the services over gRPC.

Files, by what they hold:
- main.py (process entry), app.py (the application), config.py (settings), clients.py (the
  backends' stubs), auth.py and socket_auth.py (who is calling), errors.py, ids.py,
  values.py (shaping replies), bodies.py and body_limits.py (bounded bodies), user_limits.py
  and socket_limit.py (rate limits), docs.py (/docs and /redoc served locally).
- job_socket.py (a bulk job's live progress on /ws/job/{id}), user_socket.py (a user's live
  pushes on /ws/{user_id}: notifications, scheduled messages, devices).
- request_metrics.py, stream_metrics.py (Prometheus).
- routes/: one module per area (bulk, devices, batches, jobs, dashboard, reports, exports,
  scheduled_messages, address_book, notifications, accounts, auth, admin, webhooks...).
"""
