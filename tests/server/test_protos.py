"""The committed stubs match the .proto sources and coexist with tritonclient's definitions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_stubs_coexist_with_tritonclient_in_one_process() -> None:
    code = (
        "import tritonclient.grpc.service_pb2 as t\n"
        "from protocol.inference import grpc_service_pb2 as g\n"
        "m = g.ModelConfigResponse(config={'name': 'm', 'max_batch_size': 8})\n"
        "print(t.ModelConfigResponse.FromString(m.SerializeToString()).config.max_batch_size)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "8"
