"""Gateway: FastAPI REST + WebSocket in front of the services; owns nothing durable."""
