"""Request messages written as wire bytes, for messages too large or too odd to build with
protobuf in the test process (16 M repeated elements would cost the client 500 MiB).

Field numbers follow protos/inference/grpc_service.proto and protos/finetune/v1/classifier.proto.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

WIRE_VARINT, WIRE_FIXED64, WIRE_BYTES, WIRE_FIXED32 = 0, 1, 2, 5
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
CLASSIFY = "/finetune.v1.Classifier/Classify"


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values travel as ten-byte two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field: string, bytes, submessage or packed repeated scalars."""
    return tag(number, WIRE_BYTES) + varint(len(payload)) + payload


def packed(values: Iterable[int]) -> bytes:
    return b"".join(varint(v) for v in values)


def input_tensor(
    name: str = "image",
    datatype: str = "UINT8",
    shape: Iterable[int] = (),
    contents: bytes | None = None,
) -> bytes:
    """ModelInferRequest.InferInputTensor; ``contents`` is InferTensorContents' wire bytes."""
    body = field(1, name.encode()) + field(2, datatype.encode()) + field(3, packed(shape))
    if contents is not None:
        body += field(5, contents)
    return body


def infer_request(
    model_name: str, inputs: Iterable[bytes], raw: Iterable[bytes] = (), outputs: Iterable[str] = ()
) -> bytes:
    """ModelInferRequest from input_tensor() bodies, raw contents and requested output names."""
    message = field(1, model_name.encode())
    message += b"".join(field(5, tensor) for tensor in inputs)
    message += b"".join(field(6, field(1, name.encode())) for name in outputs)
    message += b"".join(field(7, data) for data in raw)
    return message


def empty_bytes_contents(count: int) -> bytes:
    """InferTensorContents with ``count`` empty bytes_contents elements (2 wire bytes each)."""
    return (tag(8, WIRE_BYTES) + b"\x00") * count


def classify_request(images: Iterable[bytes], model_name: str = "classifier") -> bytes:
    return field(3, model_name.encode()) + b"".join(field(1, image) for image in images)


def empty_images(count: int, model_name: str = "classifier") -> bytes:
    """ClassifyRequest of ``count`` empty images."""
    return field(3, model_name.encode()) + (tag(1, WIRE_BYTES) + b"\x00") * count


def call_raw(
    channel: grpc.Channel,
    method: str,
    body: bytes,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout: float = 60,
) -> grpc.Future:
    """Send wire bytes as one unary request; the future's error carries the status."""
    stub = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return stub.future(body, metadata=metadata, timeout=timeout)


def unlimited_channel(target: str) -> grpc.Channel:
    """A channel that sends and receives messages of any size, on its own connection."""
    return grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )
