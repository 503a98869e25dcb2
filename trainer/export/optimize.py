"""Offline graph optimisation with onnxruntime, kept only when it shrinks the graph.

Only the *basic* level is used offline: its rewrites (constant folding, redundant node
removal, Conv+BatchNorm fusion...) are standard ONNX and run on any execution provider,
whereas the extended level writes CPU-specific fused ops into the file. The dynamo exporter
already folds most of this, so on its output the pass usually changes nothing and is skipped;
on a legacy-exporter graph it removes real work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

log = logging.getLogger(__name__)

TOOL = "onnxruntime ORT_ENABLE_BASIC"


@dataclass(frozen=True)
class OptimizationReport:
    """Node counts before and after, and whether the optimised graph is worth using."""

    tool: str
    nodes_before: int
    nodes_after: int

    @property
    def is_smaller(self) -> bool:
        return self.nodes_after < self.nodes_before

    def as_metadata(self, *, applied: bool) -> dict[str, object]:
        return {
            "tool": self.tool,
            "applied": applied,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
        }


def optimize_offline(source: Path, target: Path) -> OptimizationReport:
    """Write onnxruntime's basic-level optimised graph of ``source`` to ``target``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    before = len(onnx.load(str(source), load_external_data=False).graph.node)
    optimized = onnx.load(str(target), load_external_data=False)
    # onnxruntime lists every domain it knows; keep only those the graph uses.
    used = {node.domain for node in optimized.graph.node} | {""}
    kept = [o for o in optimized.opset_import if o.domain in used]
    del optimized.opset_import[:]
    optimized.opset_import.extend(kept)
    onnx.save(optimized, str(target))
    report = OptimizationReport(TOOL, before, len(optimized.graph.node))
    log.debug("offline optimisation: %d -> %d nodes", report.nodes_before, report.nodes_after)
    return report
