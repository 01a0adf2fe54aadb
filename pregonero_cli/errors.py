"""What can go wrong, each with the exit code a script can branch on."""

from __future__ import annotations

OK = 0
API_ERROR = 1  # the API answered 4xx or 5xx
USAGE = 2  # the command line itself is wrong (Click uses 2 for its own usage errors too)
UNREACHABLE = 3  # nothing answered at the API's address
INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class CliError(Exception):
    exit_code = API_ERROR


class ApiError(CliError):
    """The API refused: `message` is its own words (the error envelope's message or detail)."""

    exit_code = API_ERROR

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.message = message


class Unreachable(CliError):
    exit_code = UNREACHABLE


class UsageError(CliError):
    exit_code = USAGE
