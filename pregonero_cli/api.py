"""The public API over HTTP: every failure becomes an `ApiError` (the API's own message) or
`Unreachable`, so the commands only handle success, and exit codes are decided in one place."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from . import __version__
from .config import Target
from .errors import ApiError, CliError, Unreachable

# Reads answer at once; an upload is answered only once the server has read the whole file
# (the gateway gives campaigns 300 s for a million rows), and an export streams for as long
# as it has rows.
TIMEOUT = httpx.Timeout(30.0, connect=5.0)
UPLOAD_TIMEOUT = httpx.Timeout(330.0, connect=5.0)
DOWNLOAD_TIMEOUT = httpx.Timeout(120.0, connect=5.0)
DOWNLOAD_PART = 256 * 1024

Progress = Callable[[int], None]


def error_message(response: httpx.Response) -> str:
    """The gateway's envelope says `message` (and `detail`, the same); anything in front of it
    (Envoy, a proxy) may say something else, which is shown as it is."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, list) and value:  # FastAPI's bare 422
                return "; ".join(str(v.get("msg", v)) if isinstance(v, dict) else str(v) for v in value)
    text = response.text.strip()
    return text[:300] if text else response.reason_phrase or f"HTTP {response.status_code}"


class ReadCounter(io.FileIO):
    """A file whose reads report how far they got: httpx reads a multipart file part by part,
    so this is the upload's progress (as far as the socket has taken it)."""

    def __init__(self, path: Path, on_progress: Progress) -> None:
        super().__init__(path, "rb")
        self.on_progress = on_progress

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.on_progress(self.tell())
        return chunk


class Api:
    def __init__(self, target: Target) -> None:
        self.url = target.url
        self.token = target.token
        headers = {"User-Agent": f"pregonero-cli/{__version__}"}
        if target.token:
            headers["Authorization"] = f"Bearer {target.token}"
        self.http = httpx.Client(base_url=target.url, headers=headers, timeout=TIMEOUT)

    def close(self) -> None:
        self.http.close()

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http")

    @contextmanager
    def _transport(self) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException as exc:
            raise Unreachable(f"no answer from {self.url} in time ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot connect to {self.url}: {exc or type(exc).__name__}") from exc

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._transport():
            response = self.http.request(method, path, **kwargs)
        if response.is_error:
            raise ApiError(response.status_code, error_message(response))
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs).json()

    def upload(self, path: str, file: Path, form: dict[str, str], on_progress: Progress) -> Any:
        """A multipart POST of `file` (field `file`) and the form fields, streamed from disk."""
        with ReadCounter(file, on_progress) as body:
            files = {"file": (file.name, body, "application/octet-stream")}
            return self.request("POST", path, files=files, data=form, timeout=UPLOAD_TIMEOUT).json()

    def download(
        self,
        path: str,
        params: dict[str, str],
        *,
        destination: Callable[[httpx.Response], Path],
        on_progress: Progress,
    ) -> tuple[Path, int]:
        """Streams the answer to the file `destination` names once the headers are in (it may
        read Content-Disposition), through a temporary file beside it that is renamed only
        when the body is complete: a download cut short never leaves a file that looks whole.
        Returns the file and its size."""
        done = 0
        with self._transport(), self.http.stream("GET", path, params=params, timeout=DOWNLOAD_TIMEOUT) as response:
            if response.is_error:
                response.read()
                raise ApiError(response.status_code, error_message(response))
            dest = destination(response)
            part = dest.with_name(f".{dest.name}.part")
            try:
                with part.open("wb") as out:
                    try:
                        for chunk in response.iter_bytes(DOWNLOAD_PART):
                            out.write(chunk)
                            done += len(chunk)
                            on_progress(done)
                    except httpx.TransportError as exc:
                        # The server had started: it broke off (the gateway cuts a failed export).
                        raise CliError(
                            f"the download broke off after {done:,} bytes ({exc}); {dest} not written"
                        ) from exc
                os.replace(part, dest)
            finally:
                part.unlink(missing_ok=True)
        return dest, done
