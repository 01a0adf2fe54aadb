"""gRPC plumbing shared by every service: the server interceptor (request id, the caller's
signed identity and what it may call, domain errors → status codes) and client channels that
carry the request on: its request id, the caller it acts for (signed, see service_auth.py) and
a default deadline, so that code calling a stub passes none of them unless it means another."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import grpc

from . import identity, metrics, tracing
from .errors import ERROR_REASON_KEY, DomainError, Unauthenticated
from .logs import REQUEST_ID_KEY, new_request_id, request_id_var
from .service_auth import CALLER_KEYS, TOKEN_KEY, Callers, Keyring

log = logging.getLogger("pregonero.rpc")

# Text PostgreSQL cannot store, whichever field of whichever request carried it: a NUL
# character (22021), or one a JSON column cannot hold (22P05, `\u0000`). The statement failed,
# so nothing was written; the client sent bad input, which is theirs to fix.
UNSTORABLE_TEXT = (asyncpg.exceptions.CharacterNotInRepertoireError, asyncpg.exceptions.UntranslatableCharacterError)


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext) -> None:
    """Turn an exception raised by a handler into the status the caller sees."""
    if isinstance(exc, DomainError):
        reason = getattr(exc, "detail", "")
        if reason:
            context.set_trailing_metadata(((ERROR_REASON_KEY, reason),))
        await context.abort(exc.code, exc.message)
    if isinstance(exc, UNSTORABLE_TEXT):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text may not contain NUL (\\u0000) characters")
    if isinstance(exc, grpc.aio.AioRpcError):
        # A downstream service's answer passes through unchanged (NOT_FOUND stays NOT_FOUND).
        await context.abort(exc.code(), exc.details() or "")
    log.exception("unhandled error in handler", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


# The service that made the call being served (the issuer of its token).
calling_service: contextvars.ContextVar[str] = contextvars.ContextVar("calling_service", default="")


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler: verifies who is calling and that it may call this RPC, binds the
    request context, and maps errors to status codes. A call that fails the check never
    reaches the handler."""

    def __init__(self, keyring: Keyring, callers: Callers | None = None) -> None:
        self.keyring = keyring
        self.callers = callers or Callers()

    def _bind_context(self, details: grpc.HandlerCallDetails) -> None:
        md = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        request_id_var.set(md.get(REQUEST_ID_KEY) or new_request_id())
        identity.caller_var.set(None)
        calling_service.set("")
        if not self.callers.needs_token(details.method):
            return
        token = md.get(TOKEN_KEY)
        if not token:
            raise Unauthenticated("call carries no service token")
        verified = self.keyring.verify(token)
        self.callers.check(details.method, verified.service)
        calling_service.set(verified.service)
        identity.caller_var.set(verified.caller)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        bind = self._bind_context
        service, method = metrics.split_method(details.method)

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def unary_reply(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                started, cancelled = time.perf_counter(), False
                try:
                    bind(details)
                    return await inner(request_or_iterator, context)
                except grpc.aio.AbortError:
                    raise
                except asyncio.CancelledError:
                    cancelled = True
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status below
                    await _abort_for(exc, context)
                finally:
                    _served(service, method, context, started, cancelled=cancelled)

            if handler.unary_unary:
                return handler._replace(unary_unary=unary_reply)
            return handler._replace(stream_unary=unary_reply)

        inner_stream = handler.unary_stream or handler.stream_stream

        async def stream_reply(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            started, cancelled = time.perf_counter(), False
            try:
                bind(details)
                result = inner_stream(request_or_iterator, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # handlers that stream with `await context.write(...)` (e.g. health Watch)
                    await result
            except grpc.aio.AbortError:
                raise
            except (asyncio.CancelledError, GeneratorExit):
                cancelled = True
                raise
            except Exception as exc:  # noqa: BLE001
                await _abort_for(exc, context)
            finally:
                _served(service, method, context, started, cancelled=cancelled)

        if handler.unary_stream:
            return handler._replace(unary_stream=stream_reply)
        return handler._replace(stream_stream=stream_reply)


def _served(service: str, method: str, context: grpc.aio.ServicerContext, started: float, *, cancelled: bool) -> None:
    code = grpc.StatusCode.CANCELLED.name if cancelled else metrics.code_name(context.code())
    metrics.GRPC_SERVER_HANDLED.labels(service, method, code).inc()
    metrics.GRPC_SERVER_SECONDS.labels(service, method).observe(time.perf_counter() - started)


# A unary call that sets no deadline of its own gets this one, so a backend that hangs fails
# the request instead of holding it open. Streams (uploads, exports, watches) last as long as
# their callers say, so they get none: the long ones pass their own.
DEFAULT_DEADLINE_S = 10.0


def _in_context(metadata: Any) -> list[tuple[str, Any]]:
    """A call's metadata with what it carries while serving a request: the request's id, and
    the caller the request acts for (identity.caller_var). What the call names itself wins:
    a call that acts for another caller keeps that caller, never a second one beside it."""
    pairs = list(metadata or ())
    named = {key for key, _ in pairs}
    if REQUEST_ID_KEY not in named:
        pairs.append((REQUEST_ID_KEY, request_id_var.get() or new_request_id()))
    if not named & CALLER_KEYS:
        who = identity.caller_var.get()
        if who is not None:
            pairs.extend(who.metadata())
    return pairs


def outgoing_metadata(caller: identity.Caller | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata for a call made while serving another: same request id, given caller. The
    channel adds both by itself; name a caller only to act for another than the request's."""
    return tuple(_in_context(caller.metadata() if caller is not None else ()))


# Large enough for upload chunks and big pages; keepalive so idle channels survive proxies.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
# A target of several addresses (replicas: `ipv4:a,b` in `make run` with PREGONERO_SCALE, or
# a `dns:///` name, which in Kubernetes is a headless Service: one address per ready pod) is
# balanced round robin, so calls spread over them instead of sticking to the first. Round
# robin reconnects a lost replica with back-off (calls meanwhile go to the others), so the
# back-off is kept short: a replica restarted in place is used again within a second or two.
# One address keeps pick_first, which reconnects on the next call at once: with a single
# backend, round robin's back-off would fail calls for seconds after it came back.
BALANCED_OPTIONS = [
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
# A client resolves a `dns:///` name again only when a connection closes, so without an end
# to each connection, replicas added by the autoscalers would get no calls. After about five
# minutes a connection is asked to close (GOAWAY): the client re-resolves and spreads over the
# pods there are now. Calls in flight keep the old connection for the grace, which outlasts the
# longest deadline a caller sets (uploads, 300 s), so none is cut by it.
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_connection_age_ms", 5 * 60_000),
    ("grpc.max_connection_age_grace_ms", 6 * 60_000),
]


class _Signing:
    """Completes a call with the request's context (see _in_context), then turns the caller
    described in its metadata into a token signed for the service at the other end of the
    channel."""

    def __init__(self, keyring: Keyring, audience: str) -> None:
        self.keyring, self.audience = keyring, audience

    def signed(
        self, details: grpc.aio.ClientCallDetails, *, deadline: float | None = None
    ) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*self.keyring.sign_metadata(self.audience, _in_context(details.metadata)))
        timeout = deadline if details.timeout is None else details.timeout
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )


async def _answered(call: Any, method: str | bytes, started: float) -> Any:
    """A unary call, counted once it has its answer; the caller's own await of it returns
    the same answer (or raises the same error)."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call
    service, name = metrics.split_method(method)
    metrics.GRPC_CLIENT_HANDLED.labels(service, name, metrics.code_name(await call.code())).inc()
    metrics.GRPC_CLIENT_SECONDS.labels(service, name).observe(time.perf_counter() - started)
    return call


# One class per call shape: grpc.aio files an interceptor under the first shape it is an
# instance of, so one object of all four would sign unary calls only.
class _SignUnaryUnary(_Signing, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        started = time.perf_counter()
        signed = self.signed(details, deadline=DEFAULT_DEADLINE_S)
        return await _answered(await continuation(signed, request), details.method, started)


class _SignUnaryStream(_Signing, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.signed(details), request)


class _SignStreamUnary(_Signing, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        started = time.perf_counter()
        call = await continuation(self.signed(details), request_iterator)
        # A call fed by `call.write()` (no iterator) answers only after its caller's writes.
        return call if request_iterator is None else await _answered(call, details.method, started)


class _SignStreamStream(_Signing, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self.signed(details), request_iterator)


def channel(target: str, *, audience: str, keyring: Keyring) -> grpc.aio.Channel:
    """A channel to the service named `audience`; every call on it carries the request id, a
    token signed by this process for that service alone (acting for the request's caller
    unless the call names another), and a unary call DEFAULT_DEADLINE_S unless it sets one."""
    shapes = (_SignUnaryUnary, _SignUnaryStream, _SignStreamUnary, _SignStreamStream)
    interceptors = [*tracing.grpc_client_interceptors(), *(shape(keyring, audience) for shape in shapes)]
    several = "," in target or target.startswith("dns:")
    options = CHANNEL_OPTIONS + (BALANCED_OPTIONS if several else [])
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
