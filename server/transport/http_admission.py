"""Admission and error answers of the HTTP/REST listener: the HTTP twin of ``interceptors``.

One aiohttp middleware, outermost, does for every request what the two gRPC interceptors do
for every RPC: the bearer token, the client certificate's names and the draining gate, from
the headers and the connection, before the body is read; the limit on requests in flight; the
drain's count of running requests; the HTTP metrics; and the one mapping from domain
exceptions to HTTP statuses, with ``{"error": ...}`` bodies. Health (``/v2/health/...``) is
exempt from the token, the names, the gate and the limit, so probes keep working, as
``grpc.health.v1`` is on the gRPC port.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from server.errors import (
    DeadlineExceeded,
    InvalidInput,
    MessageTooLarge,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    ServerError,
    ShuttingDown,
    Unauthenticated,
)
from server.lifecycle import ServerState
from server.metrics import ServerMetrics
from server.transport.access import Access, names_from_peercert

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Google's mapping of the gRPC codes the interceptors use (google.rpc.Code) to HTTP.
STATUS_BY_ERROR: dict[type[ServerError], int] = {
    InvalidInput: 400,
    Unauthenticated: 401,
    ModelNotFound: 404,
    MessageTooLarge: 413,
    Overloaded: 429,
    ModelNotReady: 503,
    DeadlineExceeded: 504,
}
INTERNAL_MESSAGE = "internal server error"
HEALTH_PREFIX = "/v2/health/"
# A 503 asks the client to come back after this long (a replica still loading or draining).
UNAVAILABLE_RETRY_AFTER_S = 1.0


def status_for(error: BaseException) -> tuple[int, str]:
    """The HTTP status and client-facing message for an exception."""
    if isinstance(error, ServerError):
        for kind in type(error).__mro__:
            if kind in STATUS_BY_ERROR:
                return STATUS_BY_ERROR[kind], str(error)
    return 500, INTERNAL_MESSAGE


def error_response(status: int, message: str, retry_after_s: float | None = None) -> web.Response:
    """``{"error": message}`` with ``status``; ``Retry-After`` in whole seconds when given."""
    response = web.json_response({"error": message}, status=status)
    if retry_after_s is not None:
        response.headers[hdrs.RETRY_AFTER] = str(max(1, math.ceil(retry_after_s)))
    return response


def _retry_after(error: ServerError) -> float | None:
    if isinstance(error, Overloaded):
        return error.retry_after_s
    if isinstance(error, ModelNotReady):
        return UNAVAILABLE_RETRY_AFTER_S
    return None


def _route_label(request: web.Request) -> str:
    """The matched route's pattern (bounded label values), or ``unmatched``."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


class Admission:
    """The middleware; ``in_flight`` counts requests being handled (health excluded)."""

    def __init__(
        self,
        state: ServerState,
        access: Access | None,
        max_in_flight: int,
        metrics: ServerMetrics,
    ) -> None:
        """
        Args:
            access: the bearer tokens and client names every request but health must match
                (None: anyone).
            max_in_flight: requests handled at once; beyond it 429 (``max_concurrent_rpcs``).
        """
        self.state = state
        self.access = access or Access()
        self.max_in_flight = max_in_flight
        self.metrics = metrics
        self.in_flight = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        response = await self._answer(request, handler)
        route = _route_label(request)
        self.metrics.http_handled.labels(request.method, route, str(response.status)).inc()
        self.metrics.http_seconds.labels(request.method, route).observe(time.monotonic() - started)
        return response

    def _refusal(self, request: web.Request, matched: bool) -> ServerError | None:
        if self.access.checks_names:
            transport = request.transport
            peercert = transport.get_extra_info("peercert") if transport is not None else None
            refusal = self.access.name_refusal(names_from_peercert(peercert))
            if refusal is not None:
                return refusal
        given = request.headers.get(hdrs.AUTHORIZATION, "").encode("latin-1", "replace")
        refusal = self.access.token_refusal(given)
        if refusal is not None:
            return refusal
        if matched and self.state.rejecting:
            return ShuttingDown("server is shutting down; retry on another replica")
        if self.in_flight >= self.max_in_flight:
            return Overloaded(
                f"{self.in_flight} requests in flight; the limit (max_concurrent_rpcs) is "
                f"{self.max_in_flight}",
                retry_after_s=1.0,
            )
        return None

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(HEALTH_PREFIX):
            return await self._handled(request, handler)
        matched = request.match_info.route.resource is not None
        refusal = self._refusal(request, matched)
        if refusal is not None:
            # Counted in the HTTP metrics, not by the drain: clients retrying against a
            # draining server must not prolong it.
            response = self._error(request, refusal)
            if isinstance(refusal, ShuttingDown):
                response.force_close()  # the client's next request opens a new connection
            return response
        self.in_flight += 1
        if matched:
            self.state.enter()
        try:
            return await self._handled(request, handler)
        finally:
            self.in_flight -= 1
            if matched:
                self.state.exit()

    async def _handled(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as error:
            response = error_response(error.status, _http_message(request, error))
            if hdrs.ALLOW in error.headers:
                response.headers[hdrs.ALLOW] = error.headers[hdrs.ALLOW]
            return response
        except HttpProcessingError as error:  # aiohttp's parser, on a body read late
            return error_response(400, f"request body: {error.message}")
        except ConnectionError:  # the client went away; nobody reads this answer
            log.debug("client left %s %s", request.method, request.path)
            return error_response(499, "client closed the connection")
        except Exception as error:
            return self._error(request, error)

    def _error(self, request: web.Request, error: Exception) -> web.Response:
        status, message = status_for(error)
        if status == 500:
            log.error("unhandled error in %s %s", request.method, request.path, exc_info=error)
        retry_after = _retry_after(error) if isinstance(error, ServerError) else None
        return error_response(status, message, retry_after)


def _http_message(request: web.Request, error: web.HTTPException) -> str:
    """aiohttp's own refusals (no route, wrong method) say which; ours carry their text."""
    default = f"{error.status}: {error.reason}"
    if error.text and error.text != default:
        return error.text
    return f"{error.reason.lower()}: {request.method} {request.path}"
