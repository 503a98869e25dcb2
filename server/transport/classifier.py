# ruff: noqa: N802 (gRPC method names are fixed by the .proto)
"""The task-level classification servicer (finetune.v1.Classifier)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import grpc

from contracts.load_test import is_load_test
from protocol.finetune.v1 import classifier_pb2 as pb
from protocol.finetune.v1 import classifier_pb2_grpc as pb_grpc
from server.handlers.classification import ClassificationHandler
from server.transport import converters
from server.transport.deadlines import deadline_of


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, handler: ClassificationHandler) -> None:
        self.handler = handler

    async def _classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        plain = converters.classify_request_from_proto(request, self.handler.max_images)
        plain = dataclasses.replace(
            plain,
            deadline=deadline_of(context),
            is_load_test=is_load_test(context.invocation_metadata()),
            client=peer_host(context.peer()),
        )
        return converters.classify_response_to_proto(await self.handler.classify(plain))

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await self._classify(request, context)

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyResponse]:
        # A failing request ends the stream with its status, like a unary call would.
        async for request in request_iterator:
            yield await self._classify(request, context)


def peer_host(peer: str | None) -> str:
    """``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``: one client, whichever connection it uses."""
    if not peer:
        return ""
    host, separator, port = peer.rpartition(":")
    return host if separator and port.isdigit() else peer
