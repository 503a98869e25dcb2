"""The baseline: an Open Inference Protocol server written the way tutorials write it.

A synchronous ``grpc.server`` on a ThreadPoolExecutor, one ``session.run`` per request, no
batching, no queue limit. It speaks the same protocol as our server (ModelInfer with raw
contents, ModelMetadata, ServerReady, grpc.health.v1), so one load generator drives both.

    python benchmarks/naive_server.py --model model.onnx --model-name demo --port 0

prints ``listening on PORT`` once it accepts calls.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protocol.inference import grpc_service_pb2 as pb
from protocol.inference import grpc_service_pb2_grpc as pb_grpc

_ORT_TO_DATATYPE = {
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(bool)": "BOOL",
}
_DATATYPE_TO_NUMPY = {
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BOOL": np.bool_,
}

_NUMPY_TO_DATATYPE = {np.dtype(v): k for k, v in _DATATYPE_TO_NUMPY.items()}


class NaiveInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """One model, one session, one ``session.run`` per request on the calling thread."""

    def __init__(self, session: ort.InferenceSession, model_name: str) -> None:
        self.session = session
        self.model_name = model_name

    def ServerLive(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        return pb.ModelReadyResponse(ready=request.name == self.model_name)

    def ModelMetadata(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        if request.name != self.model_name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")

        def specs(args):  # type: ignore[no-untyped-def]
            return [
                pb.ModelMetadataResponse.TensorMetadata(
                    name=a.name,
                    datatype=_ORT_TO_DATATYPE.get(a.type, "FP32"),
                    shape=[d if isinstance(d, int) else -1 for d in a.shape],
                )
                for a in args
            ]

        return pb.ModelMetadataResponse(
            name=self.model_name,
            versions=["1"],
            platform="onnxruntime_onnx",
            inputs=specs(self.session.get_inputs()),
            outputs=specs(self.session.get_outputs()),
        )

    def ModelInfer(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        if request.model_name != self.model_name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name!r}")
        feeds = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=False):
            dtype = _DATATYPE_TO_NUMPY.get(tensor.datatype)
            if dtype is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad datatype {tensor.datatype}")
            try:
                feeds[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.shape))
            except ValueError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        names = [o.name for o in request.outputs] or [o.name for o in self.session.get_outputs()]
        try:
            results = self.session.run(names, feeds)
        except Exception as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        response = pb.ModelInferResponse(model_name=self.model_name, model_version="1")
        for name, value in zip(names, results, strict=True):
            array = np.ascontiguousarray(value)
            response.outputs.add(
                name=name,
                datatype=_NUMPY_TO_DATATYPE[array.dtype],
                shape=list(array.shape),
            )
            response.raw_output_contents.append(array.tobytes())
        return response


def serve(model: Path, model_name: str, port: int, workers: int) -> tuple[grpc.Server, int]:
    """Starts the server; returns it and the bound port."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        NaiveInferenceServicer(session, model_name),  # type: ignore[abstract]
        server,
    )
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="ONNX file to serve")
    parser.add_argument("--model-name", required=True, help="name clients use")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--workers", type=int, default=10, help="thread pool size")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"--model {args.model} is not a file")
    server, port = serve(args.model, args.model_name, args.port, args.workers)
    print(f"listening on {port}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
