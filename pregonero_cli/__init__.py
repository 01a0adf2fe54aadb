"""`pregonero`, the operator's command line: a client of the public REST and WebSocket API
only (never gRPC, never the database), so it works against any deployment an operator can
reach with a token, and needs nothing of services/ (the image does not ship it).

- config.py: where the API's address and the token come from (flags, environment, file).
- errors.py: what can go wrong, each with its exit code.
- api.py: the HTTP client; API errors and unreachable servers as exceptions with exit codes.
- live.py: follows a bulk job to its end over its socket, polling when the socket is gone.
- views.py: Rich tables for lists, and the live job progress bar.
- main.py: the commands (Typer) and the exit codes."""

__version__ = "0.1.0"
