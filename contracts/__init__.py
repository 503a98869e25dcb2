"""What the trainer and the server must agree on, written once.

A small package with no torch, no onnxruntime and no grpc, imported by both halves (and the
client): the model repository's layout and name rule, the preprocessing description, the image
formats, the Open Inference Protocol's datatypes, atomic file writes and how a setting's string
becomes a value. Each module owns one contract; its errors are plain ``ValueError`` subclasses
so each half maps them to its own.
"""
