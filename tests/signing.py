"""Signed calls for tests that serve a service in process: one key set for the session, a
server that verifies as a given service, and channels that sign as another."""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from services.runtime import rpc
from services.runtime.service_auth import Callers, Keyring, new_key_set

_KEYS = new_key_set()
_PUBLIC = ",".join(f"{name}:{public}" for name, (_, public) in _KEYS.items())
RINGS = {name: Keyring(name, signing_key=private, public_keys=_PUBLIC) for name, (private, _) in _KEYS.items()}


def server(service: str, callers: Mapping[str, frozenset[str]] | None = None) -> grpc.aio.Server:
    """A server that checks calls as `service` would (with its policy, if given)."""
    return grpc.aio.server(interceptors=[rpc.ServerInterceptor(RINGS[service], Callers(callers))])


def channel(target: str, service: str, *, caller: str = "gateway") -> grpc.aio.Channel:
    """A channel to `service` whose calls are signed by `caller`."""
    return rpc.channel(target, audience=service, keyring=RINGS[caller])
