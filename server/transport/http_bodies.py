"""Request bodies of the HTTP/REST listener: content types, and reading within limits.

A declared ``Content-Length`` over the limit is refused before a byte is read; a chunked (or
compressed) body is counted while it streams and refused once past the limit; a body that
stops arriving for ``BODY_IDLE_TIMEOUT_S`` is refused too, so a slow client cannot hold a
request slot. ``Expect: 100-continue`` is answered only when the body is first read, that is
after the token, the drain gate and the content type were checked: a refused client never
sends its body.
"""

from __future__ import annotations

import asyncio

from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from server.errors import InvalidInput, MessageTooLarge

BODY_IDLE_TIMEOUT_S = 30.0
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "application/octet-stream")
MULTIPART = "multipart/form-data"
_CHUNK_BYTES = 256 * 1024


def content_type(request: web.Request) -> str | None:
    """The request's media type, lower case, without parameters (None: no header)."""
    if hdrs.CONTENT_TYPE not in request.headers:
        return None
    return request.content_type.lower()


def require_content_type(request: web.Request, accepted: tuple[str, ...], *, optional: bool) -> str:
    """The media type, or 415 naming the accepted ones.

    Args:
        optional: a request without ``Content-Type`` is accepted (tritonclient sends none).
    """
    given = content_type(request)
    if given is None and optional:
        return ""
    if given not in accepted:
        raise web.HTTPUnsupportedMediaType(
            text=f"Content-Type {given or '(none)'} is not accepted here; "
            f"send {', '.join(accepted)}"
        )
    return given


async def expect_continue(request: web.Request) -> None:
    """The routes' ``Expect`` handler: 100 Continue waits for ``read_body`` (see above)."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"unknown Expect: {expect}")


async def _send_continue(request: web.Request) -> None:
    """The interim answer a client waits for; each route reads its body once."""
    wants = request.headers.get(hdrs.EXPECT, "").lower() == "100-continue"
    if wants and request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the response's body


def _too_large(size: str, limit: int, setting: str) -> MessageTooLarge:
    return MessageTooLarge(
        f"request body is {size} bytes; this endpoint accepts {limit} ({setting})"
    )


def check_declared_length(request: web.Request, limit: int, setting: str) -> None:
    """413 before reading when ``Content-Length`` says the body is over ``limit``."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(str(declared), limit, setting)


async def _next_chunk(reader: asyncio.Future[bytes]) -> bytes:
    try:
        return await asyncio.wait_for(reader, BODY_IDLE_TIMEOUT_S)
    except TimeoutError:
        raise web.HTTPRequestTimeout(
            text=f"no request body arrived for {BODY_IDLE_TIMEOUT_S:g} s"
        ) from None
    except HttpProcessingError as error:  # broken chunked framing, undecodable gzip
        raise InvalidInput(f"request body: {error.message}") from None


async def read_body(request: web.Request, limit: int, setting: str) -> bytes:
    """The whole body, at most ``limit`` bytes (after any Content-Encoding is undone).

    Raises:
        MessageTooLarge: declared or streamed past ``limit`` (``setting`` names the knob).
    """
    check_declared_length(request, limit, setting)
    await _send_continue(request)
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await _next_chunk(asyncio.ensure_future(request.content.readany()))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise _too_large(f"over {limit}", limit, setting)
        chunks.append(chunk)


async def _read_part(part: BodyPartReader, request: web.Request, limit: int, setting: str) -> bytes:
    data = bytearray()
    while True:
        chunk = await _next_chunk(asyncio.ensure_future(part.read_chunk(_CHUNK_BYTES)))
        if not chunk:
            return bytes(data)
        if request.content.total_bytes > limit:
            raise _too_large(f"over {limit}", limit, setting)
        data.extend(chunk)


async def read_images(
    request: web.Request, limit: int, setting: str, max_images: int
) -> list[bytes]:
    """The files of a ``multipart/form-data`` body, in order, one image each.

    A part counts as an image when it has a file name or an image media type; any other part
    (a form field) is refused by name, so a mistyped upload is not silently dropped.
    """
    check_declared_length(request, limit, setting)
    await _send_continue(request)
    try:
        reader = MultipartReader(request.headers, request.content)
        images: list[bytes] = []
        while True:
            part = await reader.next()
            if part is None:
                return images
            if not isinstance(part, BodyPartReader):
                raise InvalidInput("multipart body: nested multipart parts are not accepted")
            media = part.headers.get(hdrs.CONTENT_TYPE, "").split(";")[0].strip().lower()
            if part.filename is None and media not in IMAGE_TYPES:
                raise InvalidInput(
                    f"multipart part {part.name!r} is not a file; send each image as a file "
                    "part (curl -F 'image=@cat.jpg') and options in the query string"
                )
            if len(images) == max_images:
                raise InvalidInput(
                    f"images: more than {max_images} images; the limit "
                    f"(max_images_per_request) is {max_images}"
                )
            images.append(await _read_part(part, request, limit, setting))
    except (ValueError, HttpProcessingError) as error:
        # aiohttp's multipart parser reports a missing boundary or broken framing so.
        raise InvalidInput(f"multipart body: {error}") from None
