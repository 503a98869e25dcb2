"""The ``client`` command against a real server, and its import boundary."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_harness import RunningServer, server_config
from test_client_library import solid_png

from client.cli import main


def test_cli_imports_neither_torch_nor_onnxruntime_nor_the_server() -> None:
    code = (
        "import sys\n"
        "import client, client.cli, client.bench, client.verify\n"
        "banned = ('torch', 'onnxruntime', 'prometheus_client', 'server', 'trainer')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in banned)\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr

    usage = subprocess.run(
        [sys.executable, "-m", "client.cli", "--help"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert usage.returncode == 0, usage.stderr
    for command in ("classify", "health", "bench"):
        assert command in usage.stdout
    script = Path(sys.executable).with_name("client")
    if script.exists():  # the installed console script
        assert subprocess.run([script, "--help"], check=False, capture_output=True).returncode == 0


def write_images(root: Path) -> list[Path]:
    (root / "nested").mkdir(parents=True)
    paths = [root / "red.png", root / "nested" / "blue.png"]
    paths[0].write_bytes(solid_png((255, 0, 0)))
    paths[1].write_bytes(solid_png((0, 0, 255)))
    (root / "notes.txt").write_text("not an image, skipped by directory expansion")
    return paths


def test_classify_prints_one_line_per_image(
    running_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = write_images(tmp_path / "images")
    assert main(["classify", "--target", running_server.target, str(tmp_path / "images")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == sorted(str(p) for p in paths)
    for line in lines:
        _, label, score = line.split("\t")
        assert label.startswith("class_")
        assert 0.0 < float(score) <= 1.0

    assert main(["classify", "--target", running_server.target, "--top-k", "3", str(paths[0])]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    columns = line.split("\t")
    assert len(columns) == 1 + 2 * 3
    scores = [float(s) for s in columns[2::2]]
    assert scores == sorted(scores, reverse=True)

    assert main(["classify", "--target", running_server.target, "--json", *map(str, paths)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["failed"] == 0
    assert [r["path"] for r in document["results"]] == [str(p) for p in paths]
    assert all(len(r["predictions"]) == 1 for r in document["results"])


def test_classify_fails_when_any_image_fails(
    running_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    good.write_bytes(solid_png((0, 255, 0)))
    bad.write_bytes(b"\xff\xd8 truncated")
    assert main(["classify", "--target", running_server.target, str(good), str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{good}\tclass_")
    assert f"{bad}: INVALID_ARGUMENT" in captured.err

    assert main(["classify", "--target", running_server.target, str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["classify", "--target", running_server.target, str(empty)]) == 2
    assert "holds no image files" in capsys.readouterr().err


def test_health_exit_codes(
    running_server: RunningServer, model_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "--target", running_server.target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"

    with RunningServer(server_config(model_repository), start_models=False) as loading:
        assert main(["health", "--target", loading.target]) == 1
        assert capsys.readouterr().out.strip() == "NOT_SERVING"
        # --wait-s asks again until SERVING or the time is up, then gives the last answer.
        started = time.monotonic()
        assert main(["health", "--target", loading.target, "--wait-s", "1"]) == 1
        assert time.monotonic() - started >= 1.0
        assert capsys.readouterr().out.strip() == "NOT_SERVING"
    assert main(["health", "--target", running_server.target, "--wait-s", "30"]) == 0

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    assert main(["health", "--target", closed, "--timeout-s", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def _bench_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    code = main(["bench", "--duration-s", "0.6", "--warmup-s", "0.1", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_bench_reports_throughput_latency_and_errors(
    running_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--target", running_server.target]
    code, report = _bench_json(capsys, *target, "--concurrency", "4")
    assert code == 0
    assert report["mode"] == "concurrency" and report["error_count"] == 0
    assert report["requests_ok"] > 0
    assert report["requests_per_s"] == pytest.approx(report["requests_ok"] / 0.6)
    latency = report["latency"]
    assert 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"] <= latency["max_ms"]

    code, report = _bench_json(capsys, *target, "--model", "classifier", "--batch", "3")
    assert code == 0 and report["requests_ok"] > 0
    assert report["images_per_s"] == pytest.approx(3 * report["requests_per_s"])

    code, report = _bench_json(capsys, *target, "--rate", "40", "--concurrency", "8")
    assert code == 0 and report["mode"] == "rate"
    assert 10 <= report["requests_ok"] <= 30  # 40/s over a 0.6 s window

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    code, report = _bench_json(capsys, *target, "--image", str(bad), "--concurrency", "2")
    assert code == 1
    assert report["requests_ok"] == 0
    assert set(report["errors"]) == {"INVALID_ARGUMENT"} and report["error_count"] > 0


def test_bench_text_report(running_server: RunningServer, capsys) -> None:  # type: ignore[no-untyped-def]
    args = ["bench", "--target", running_server.target, "--duration-s", "0.3", "--warmup-s", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "throughput" in out and "p99" in out and "errors      none" in out


def test_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["bench", "--target", "127.0.0.1:1", "--concurrency", "0"])
    assert usage.value.code == 2
    assert "positive integer" in capsys.readouterr().err

    assert main(["health", "--target", "no-port-here"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err

    image = tmp_path / "x.png"
    image.write_bytes(solid_png((1, 1, 1)))
    assert main(["bench", "--target", "127.0.0.1:1", "--model", "m", "--image", str(image)]) == 2
    assert "pick one" in capsys.readouterr().err

    missing = tmp_path / "token"
    assert main(["health", "--target", "127.0.0.1:1", "--token-file", str(missing)]) == 2
    assert "cannot read token file" in capsys.readouterr().err


def test_target_defaults_to_the_environment_then_localhost(
    running_server: RunningServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("CLIENT_TARGET", running_server.target)
    assert main(["health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    monkeypatch.delenv("CLIENT_TARGET")
    from client.cli import build_parser

    assert build_parser().parse_args(["health"]).target == "localhost:8001"


def test_connection_flags_default_to_the_environment_read_as_the_server_reads_its_own() -> None:
    from client.cli import build_parser

    environ = {
        "CLIENT_TLS": "yes",
        "CLIENT_ALLOW_INSECURE_TOKEN": "off",
        "CLIENT_TIMEOUT_S": "2.5",
        "CLIENT_CA_CERT": "",  # empty: not set
        "CLIENT_REPOSITORY": "repo",
        "CLIENT_ID": "another program's",  # CLIENT_ is a common prefix: left alone
    }
    args = build_parser(environ).parse_args(["verify", "--model", "m", "--timeout-s", "4"])
    assert (args.tls, args.allow_insecure_token, args.ca_cert) == (True, False, None)
    assert (args.timeout_s, args.repository) == (4.0, Path("repo"))
    assert build_parser(environ).parse_args(["health"]).timeout_s == 2.5
    assert build_parser({}).parse_args(["health"]).timeout_s == 30


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CLIENT_TLS", "maybe", "CLIENT_TLS: cannot read 'maybe' as true or false"),
        ("CLIENT_TIMEOUT_S", "soon", "CLIENT_TIMEOUT_S: cannot read 'soon' as a number"),
        ("CLIENT_TIMEOUT_S", "-1", "CLIENT_TIMEOUT_S: cannot read '-1' as a positive number"),
    ],
)
def test_a_mistyped_environment_value_is_a_usage_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["health"]) == 2
    assert capsys.readouterr().err.strip() == f"client: error: {message}"
