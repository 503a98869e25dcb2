"""The floor of a gRPC request in Python: server CPU per call of an empty ModelInfer handler.

A server process answers ``ModelInfer`` by parsing the request and returning a response built
once (no model, no batcher, no metrics, no validation), on ``grpc.aio`` and on the
synchronous thread-pool server. A ``grpc.aio`` client in this process keeps ``--concurrency``
calls in flight with a 32 px uint8 image each; the server's CPU time (``/proc/PID/stat``)
over the calls answered in a ``--seconds`` window is the cost that no trimming of our handlers
can take away (``serve_cost.py``'s overhead target is measured against it).

    .venv/bin/python benchmarks/grpc_floor.py [--concurrency 8] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from protocol.inference import grpc_service_pb2 as pb

SERVICE, METHOD = "inference.GRPCInferenceService", "ModelInfer"
IMAGE_BYTES = 32 * 32 * 3


def _reply() -> bytes:
    output = pb.ModelInferResponse.InferOutputTensor(name="logits", datatype="FP32", shape=[1, 5])
    return pb.ModelInferResponse(
        model_name="floor",
        outputs=[output],
        raw_output_contents=[np.zeros(5, np.float32).tobytes()],
    ).SerializeToString()


def _handlers(infer: object) -> grpc.GenericRpcHandler:
    method = grpc.unary_unary_rpc_method_handler(
        infer, request_deserializer=pb.ModelInferRequest.FromString, response_serializer=None
    )
    return grpc.method_handlers_generic_handler(SERVICE, {METHOD: method})


def serve(kind: str) -> None:
    """Serve on a port the OS picks, print it, answer until killed."""
    reply = _reply()
    if kind == "aio":

        async def infer_async(_request: object, _context: object) -> bytes:
            return reply

        async def main() -> None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((_handlers(infer_async),))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            print(port, flush=True)
            await server.wait_for_termination()

        asyncio.run(main())
        return

    def infer(_request: object, _context: object) -> bytes:
        return reply

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((_handlers(infer),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


async def drive(port: int, concurrency: int, seconds: float) -> int:
    """Calls answered in ``seconds`` with ``concurrency`` in flight."""
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="images", datatype="UINT8", shape=[1, 32, 32, 3]
    )
    request = pb.ModelInferRequest(
        model_name="floor", inputs=[tensor], raw_input_contents=[bytes(IMAGE_BYTES)]
    ).SerializeToString()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/{METHOD}", request_serializer=None, response_deserializer=None
        )
        answered = 0
        stop = time.monotonic() + seconds

        async def client() -> None:
            nonlocal answered
            while time.monotonic() < stop:
                await call(request)
                answered += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return answered


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--serve", choices=["aio", "sync"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    for kind in ("aio", "sync"):
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            asyncio.run(drive(port, args.concurrency, 2.0))  # warm-up
            before = cpu_seconds(server.pid)
            answered = asyncio.run(drive(port, args.concurrency, args.seconds))
            cpu = cpu_seconds(server.pid) - before
        finally:
            server.kill()
            server.wait()
        print(
            f"{kind}: {answered / args.seconds:.0f} requests/s, server CPU "
            f"{1000 * cpu / max(1, answered):.3f} ms/request (concurrency {args.concurrency})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
