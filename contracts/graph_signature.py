"""The exported graph's signature: its input's name and layouts, its outputs' names.

The export builds the graph with this signature and records its input format in
``model.json`` and ``config.pbtxt``; the server lays decoded pixels out by that format and
reads the probabilities by their output name.

    uint8-nhwc    input ``image``, UINT8 ``[-1, H, W, 3]`` RGB, resized and centre-cropped;
                  the float conversion, normalisation and NHWC -> NCHW happen in the graph
    float32-nchw  input ``image``, FP32 ``[-1, 3, H, W]``, already normalised

Both layouts have the outputs ``logits`` and ``probabilities`` (FP32, ``[-1, classes]``).
"""

from __future__ import annotations

UINT8_NHWC = "uint8-nhwc"
FLOAT32_NCHW = "float32-nchw"
#: Every input format, the default first.
INPUT_FORMATS = (UINT8_NHWC, FLOAT32_NCHW)
#: What a ``model.json`` without ``input_format`` (or an export without the option) means.
DEFAULT_INPUT_FORMAT = UINT8_NHWC

INPUT_NAME = "image"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"
OUTPUT_NAMES = (LOGITS_NAME, PROBABILITIES_NAME)
