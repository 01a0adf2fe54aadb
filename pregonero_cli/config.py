"""Where the CLI finds the API: a flag wins over the environment, which wins over the config
file (`$XDG_CONFIG_HOME/pregonero/config.toml`, else `~/.config/pregonero/config.toml`):

    url = "https://pregonero.example.com"
    token = "pk_..."

The token is sent as it is (a static token, an API key or a session JWT); none at all is
allowed, and the API then says what it refuses."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

DEFAULT_URL = "http://localhost:8000"  # what `make run` serves


@dataclass(frozen=True)
class Target:
    url: str
    token: str | None


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "pregonero" / "config.toml"


def read_config(path: Path) -> dict[str, str]:
    """The file's `url` and `token`; an absent file is no error, a malformed one is."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    return {key: str(raw[key]) for key in ("url", "token") if raw.get(key)}


def resolve(url: str | None, token: str | None) -> Target:
    """Flags (url, token) first, then PREGONERO_URL / PREGONERO_TOKEN, then the file."""
    from_file = read_config(config_path())
    chosen_url = url or os.environ.get("PREGONERO_URL") or from_file.get("url") or DEFAULT_URL
    chosen_token = token or os.environ.get("PREGONERO_TOKEN") or from_file.get("token")
    if not chosen_url.startswith(("http://", "https://")):
        raise UsageError(f"the API address must start with http:// or https://, not {chosen_url!r}")
    return Target(chosen_url.rstrip("/"), chosen_token or None)
