"""Request handlers on plain numpy arrays and dataclasses (no protobuf, no gRPC)."""
