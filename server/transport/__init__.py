"""The gRPC edge: servicers, converters, interceptors and server assembly.

Everything here may import grpc and the ``*_pb2`` modules; nothing outside this package (except
the composition root and the client) does. Servicers are thin: protobuf in, converters,
handler call, protobuf out.
"""
