"""The export's choices beyond the graph's signature (``contracts.graph_signature``): the
precision of the published graph and how int8 is quantised."""

from __future__ import annotations

PRECISIONS = ("fp32", "fp16", "int8")
INT8_MODES = ("static", "dynamic")
