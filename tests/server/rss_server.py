"""A real server in a child process, so a test can read that process's memory.

    python rss_server.py REPOSITORY SETTINGS_JSON   # prints {"port": N} once serving, then
                                                   # serves until its stdin closes

The peak resident memory of what a request costs can only be read from the process that
served it (C allocations of gRPC and protobuf included; tracemalloc sees neither). The test
resets the child's high-water mark (``/proc/PID/clear_refs``), sends its requests and reads
VmHWM minus the VmRSS before them: an upper bound of what they cost at once.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

MIB = 1024 * 1024


class ServerProcess:
    """``rss_server.py`` run as a child; ``port`` is its gRPC port."""

    def __init__(self, repository: Path, **settings: Any) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(repository), json.dumps(settings)],
            cwd=Path(__file__).resolve().parents[2],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the server process ended before serving")
        self.port = int(json.loads(line)["port"])
        self.target = f"127.0.0.1:{self.port}"

    def status_kib(self, field: str) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
        raise RuntimeError(f"no {field} in /proc/{self.process.pid}/status")

    def reset_peak(self) -> int:
        """Reset VmHWM to VmRSS where the kernel allows it; returns VmRSS in bytes."""
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        return self.status_kib("VmRSS") * 1024

    def peak(self) -> int:
        """VmHWM in bytes."""
        return self.status_kib("VmHWM") * 1024

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _serve(repository: Path, settings: dict[str, Any], stdin: IO[str]) -> None:
    from server_harness import RunningServer, server_config

    for key in ("auth_token_file",):
        if key in settings:
            settings[key] = Path(settings[key])
    with RunningServer(server_config(repository, **settings)) as server:
        print(json.dumps({"port": server.port}), flush=True)
        stdin.read()  # until the test closes the pipe


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _serve(Path(sys.argv[1]), json.loads(sys.argv[2]), sys.stdin)
