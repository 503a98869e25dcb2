# ruff: noqa: N802 (gRPC method names are fixed by the .proto)
"""The Open Inference Protocol servicer (inference.GRPCInferenceService)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import grpc

from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc
from server.errors import InvalidInput, ServerError
from server.handlers.inference import InferenceHandler
from server.transport import converters, wire
from server.transport.deadlines import deadline_of
from server.transport.model_config import model_config_to_proto


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer and ModelStreamInfer receive staged requests (``wire.parse_staged_infer_request``,
    installed by the gate): inputs' typed ``contents`` are still wire bytes."""

    def __init__(self, handler: InferenceHandler) -> None:
        self.handler = handler

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.handler.is_live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.handler.is_ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.handler.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        name, version, extensions = self.handler.server_metadata()
        return pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        info = self.handler.model_metadata(request.name, request.version)
        return converters.model_metadata_to_proto(info)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        spec = self.handler.model_config(request.name, request.version)
        return pb.ModelConfigResponse(config=model_config_to_proto(spec))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        versions = self.handler.statistics(request.name, request.version)
        return converters.statistics_to_proto(versions)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        # One repository: any repository_name answers with it, as Triton does for an empty one.
        return converters.repository_index_to_proto(self.handler.repository_index(request.ready))

    async def _infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        if isinstance(request, pb.ModelInferRequest):  # not parsed by the gate's parser
            request = wire.parse_staged_infer_request(request.SerializeToString())
        plain = converters.stage_infer_request(request)
        timeout = plain.parameters.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)):
            raise InvalidInput("parameters['timeout'] must be an integer (microseconds)")
        plain = dataclasses.replace(plain, deadline=deadline_of(context, timeout))
        response = await self.handler.infer(plain)
        return converters.infer_response_to_proto(response, raw=bool(request.raw_input_contents))

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request, context)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            try:
                response = await self._infer(request, context)
            except ServerError as error:
                # Triton's stream reports per-request errors in the message, not as status.
                yield pb.ModelStreamInferResponse(
                    error_message=str(error), infer_response=pb.ModelInferResponse(id=request.id)
                )
                continue
            yield pb.ModelStreamInferResponse(infer_response=response)
