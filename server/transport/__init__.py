"""The edge: gRPC servicers, converters, interceptors and server assembly, and the HTTP/REST
listener beside them (``http_*``: aiohttp routes, admission and converters).

Everything here may import grpc, aiohttp and the ``*_pb2`` modules; nothing else in the server
does (the client has its own stubs). Servicers and routes are thin: the wire format in,
converters, handler call, the wire format out. ``model_config`` is also where the repository
reader turns ``config.pbtxt`` (Triton's protobuf text format) into a plain ``ModelSpec``.
"""
