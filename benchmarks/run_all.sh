#!/usr/bin/env bash
# Every benchmark in one go (about 30 minutes on 2 cores); tables on stdout, JSON in
# bench-output/. KSERVE_PYTHON names a Python with kserve installed to add KServe to the
# serving comparison (see docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench-output
python benchmarks/train_throughput.py
python benchmarks/transfer_quality.py
python benchmarks/domain_shift.py
python benchmarks/export_latency.py
# The serving path's cost needs Triton's perf_analyzer ($PERF_ANALYZER, docs/benchmarks.md).
[[ -z ${PERF_ANALYZER:-} ]] || python benchmarks/serve_cost.py
python benchmarks/grpc_floor.py
python benchmarks/serve_throughput.py ${KSERVE_PYTHON:+--kserve-python "$KSERVE_PYTHON"}
python benchmarks/serve_cpu_budget.py
