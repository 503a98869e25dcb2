"""The HTTP/REST routes: KServe v2 / Triton's REST API and ``.../classify`` for images.

Each route is a thin adapter, like a gRPC servicer method: the request's parts to plain
types (``http_converters``), the same handler the gRPC servicer calls, plain types back to
JSON. Admission (token, drain, limits, errors) is ``http_admission``'s middleware.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from contracts.load_test import is_load_test
from server.handlers.classification import ClassificationHandler
from server.handlers.inference import InferenceHandler
from server.transport import http_converters as convert
from server.transport import http_metadata as metadata
from server.transport.http_bodies import (
    IMAGE_TYPES,
    MULTIPART,
    expect_continue,
    read_body,
    read_images,
    require_content_type,
)
from server.transport.http_classify import classify_request_from_http, classify_response_to_json

INFER_TYPES = ("application/json", "application/octet-stream")
JSON_TYPES = ("application/json",)
# Bodies and answers larger than this are converted on a worker thread, so parsing a 64 MB
# JSON request never stalls the event loop (and gRPC and health with it).
_CONVERT_ON_LOOP_BYTES = 256 * 1024
# Requests that carry no tensors or images (the repository index) are this small at most.
SMALL_BODY_BYTES = 64 * 1024
PAYLOAD_SETTING = "max_message_bytes"


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP request may carry."""

    payload_bytes: int  # an infer or classify body (max_message_bytes)
    max_images: int  # files in one multipart classify body (max_images_per_request)


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


def _json(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status)


async def _off_loop(size: int, function: Any, *args: Any) -> Any:
    if size <= _CONVERT_ON_LOOP_BYTES:
        return function(*args)
    return await asyncio.get_running_loop().run_in_executor(
        None, functools.partial(function, *args)
    )


class OipRoutes:
    """The route handlers, bound to the handlers the gRPC servicers also use."""

    def __init__(
        self,
        inference: InferenceHandler,
        classification: ClassificationHandler,
        limits: HttpLimits,
    ) -> None:
        self.inference = inference
        self.classification = classification
        self.limits = limits

    def add_to(self, router: web.UrlDispatcher) -> None:
        """Register every route (``/v2/models/stats`` before ``/v2/models/{model}``)."""
        get = [
            ("/v2/health/live", self.live),
            ("/v2/health/ready", self.ready),
            ("/v2", self.server_metadata),
            ("/v2/models/stats", self.statistics),
        ]
        for model in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            get += [
                (model, self.model_metadata),
                (f"{model}/ready", self.model_ready),
                (f"{model}/config", self.model_config),
                (f"{model}/stats", self.statistics),
            ]
        for path, handler in get:
            router.add_get(path, handler)
        post = [("/v2/repository/index", self.repository_index)]
        for model in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            post += [(f"{model}/infer", self.infer), (f"{model}/classify", self.classify)]
        for path, handler in post:
            router.add_post(path, handler, expect_handler=expect_continue)

    async def live(self, request: web.Request) -> web.Response:
        live = self.inference.is_live()
        return _json({"live": live}, 200 if live else 503)

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.inference.is_ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(metadata.server_metadata_to_json(*self.inference.server_metadata()))

    async def model_metadata(self, request: web.Request) -> web.Response:
        return _json(
            metadata.model_metadata_to_json(self.inference.model_metadata(*_model(request)))
        )

    async def model_ready(self, request: web.Request) -> web.Response:
        ready = self.inference.model_ready(*_model(request))
        return _json({"ready": ready}, 200 if ready else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        return _json(metadata.model_config_to_json(self.inference.model_config(*_model(request))))

    async def statistics(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        return _json(metadata.statistics_to_json(self.inference.statistics(name, version)))

    async def repository_index(self, request: web.Request) -> web.Response:
        require_content_type(request, JSON_TYPES, optional=True)
        body = await read_body(request, SMALL_BODY_BYTES, "repository index requests")
        ready_only = metadata.repository_index_ready_only(body)
        return _json(metadata.repository_index_to_json(self.inference.repository_index(ready_only)))

    async def infer(self, request: web.Request) -> web.Response:
        received = time.monotonic()
        require_content_type(request, INFER_TYPES, optional=True)
        body = await read_body(request, self.limits.payload_bytes, PAYLOAD_SETTING)
        name, version = _model(request)
        header_length = request.headers.get(convert.HEADER_LENGTH)
        plain, encoding = await _off_loop(
            len(body), convert.infer_request_from_http, body, header_length, name, version, received
        )
        del body  # the tensors hold what is needed; the body can go before inference
        response = await self.inference.infer(plain)
        size = sum(tensor.data.nbytes for tensor in response.outputs)
        answer, header_length_out = await _off_loop(
            size, convert.infer_response_to_http, response, encoding
        )
        if header_length_out is None:
            return web.Response(body=answer, content_type="application/json")
        return web.Response(
            body=answer,
            content_type="application/octet-stream",
            headers={convert.HEADER_LENGTH: str(header_length_out)},
        )

    async def classify(self, request: web.Request) -> web.Response:
        media = require_content_type(request, (*IMAGE_TYPES, MULTIPART), optional=False)
        limit = self.limits.payload_bytes
        if media == MULTIPART:
            images = await read_images(request, limit, PAYLOAD_SETTING, self.limits.max_images)
        else:
            images = [await read_body(request, limit, PAYLOAD_SETTING)]
        name, version = _model(request)
        plain = classify_request_from_http(
            images, request.query, name, version, is_load_test(request.headers.items())
        )
        response = await self.classification.classify(plain)
        return _json(classify_response_to_json(response))
