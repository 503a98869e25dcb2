"""Domain exceptions of the server.

Handlers, the batcher and the onnxruntime sessions raise these; one interceptor
(server.transport.interceptors) maps them to gRPC status codes. This module imports nothing
from gRPC on purpose.
"""

from __future__ import annotations

# Client-chosen names (models, versions, inputs, outputs, datatypes) echoed in an error are cut
# to this many characters: the message travels in a trailer, and gRPC clients refuse
# trailers over 8-16 KiB with an error that hides the real one.
SHOWN_NAME_CHARS = 128


def shown(name: str) -> str:
    """``name`` quoted for an error message, cut to SHOWN_NAME_CHARS with its length said."""
    if len(name) <= SHOWN_NAME_CHARS:
        return repr(name)
    return f"{name[:SHOWN_NAME_CHARS]!r}... ({len(name)} characters)"


class ServerError(Exception):
    """Base class. ``reason`` is the failure label used in metrics."""

    reason = "internal"


class InvalidInput(ServerError):  # noqa: N818 (names of the domain)
    """The request is malformed; the message names the offending field."""

    reason = "invalid"


class ModelNotFound(ServerError):  # noqa: N818 (names of the domain)
    """No such model, or no such loaded version of it."""

    reason = "not_found"


class ModelNotReady(ServerError):  # noqa: N818 (names of the domain)
    """The model exists but cannot serve now (loading, unloading, draining)."""

    reason = "unavailable"


class ShuttingDown(ModelNotReady):
    """The server is draining and accepts no new work."""


class Overloaded(ServerError):  # noqa: N818 (names of the domain)
    """The request queue is full; the client should back off and retry.

    ``retry_after_s`` travels as gRPC's ``grpc-retry-pushback-ms`` trailing metadata, which
    gRPC retry policies honour.
    """

    reason = "rejected"

    def __init__(self, message: str, retry_after_s: float = 0.1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class MessageTooLarge(ServerError):  # noqa: N818 (names of the domain)
    """A request message is larger than its method's limit (not worth retrying)."""

    reason = "too_large"


class DeadlineExceeded(ServerError):  # noqa: N818 (names of the domain)
    """The client's deadline passed before the request was computed."""

    reason = "deadline"


class StreamExpired(DeadlineExceeded):
    """A bidirectional stream was idle, or open, longer than the server allows."""


class Unauthenticated(ServerError):  # noqa: N818 (names of the domain)
    """Missing or wrong bearer token."""

    reason = "unauthenticated"


class ModelLoadError(ServerError):
    """A model version could not be read, loaded or warmed up."""


class ConfigError(ValueError):
    """The server settings are invalid; the message names the setting."""
