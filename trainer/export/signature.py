"""Names of the graph signature in the architecture contract (no heavy imports here)."""

from __future__ import annotations

UINT8_NHWC = "uint8-nhwc"
FLOAT32_NCHW = "float32-nchw"
INPUT_FORMATS = (UINT8_NHWC, FLOAT32_NCHW)
PRECISIONS = ("fp32", "fp16", "int8")
INT8_MODES = ("static", "dynamic")

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probabilities")
