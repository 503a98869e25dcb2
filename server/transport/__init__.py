"""The gRPC edge: servicers, converters, interceptors and server assembly.

Everything here may import grpc and the ``*_pb2`` modules; nothing else in the server does
(the client has its own stubs). Servicers are thin: protobuf in, converters, handler call,
protobuf out. ``model_config`` is also where the repository reader turns ``config.pbtxt``
(Triton's protobuf text format) into a plain ``ModelSpec``.
"""
