"""The ``client`` command: classify images, check health, load-test a server, verify a model.

Exit status: 0 on success; 1 when the server refused or failed a request (``classify``: any
image not classified; ``health``: not SERVING or unreachable; ``bench``: any failed request;
``verify``: the golden set was not reproduced); 2 for bad arguments or unreadable inputs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from client.api import AsyncInferenceClient, ImageResult, InferenceClient, RequestError
from client.bench import BenchSetupError, bench_classify, bench_infer, synthetic_jpeg
from client.connection import ClientConfigError, ConnectionOptions, read_token_file
from client.loadgen import LoadSpec
from client.settings import (
    DEFAULT_REPOSITORY,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    ClientEnvironment,
    read_environment,
)
from client.stats import BenchReport
from client.tensors import TensorError
from client.verify import VerifySetupError, verify
from contracts.image_formats import IMAGE_EXTENSIONS
from contracts.settings import SettingError, positive_int_argument

# The formats the server decodes; other files in a directory are skipped.
IMAGE_SUFFIXES = IMAGE_EXTENSIONS
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# How often `client health --wait-s` asks a starting server again.
_HEALTH_RETRY_S = 0.5


class UsageError(Exception):
    """Bad arguments or unreadable inputs (exit status 2)."""


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _add_connection_flags(parser: argparse.ArgumentParser, env: ClientEnvironment) -> None:
    group = parser.add_argument_group("connection (each flag also reads CLIENT_<FLAG>)")
    group.add_argument(
        "--target",
        default=env.target or DEFAULT_TARGET,
        help=f"server address HOST:PORT (default: $CLIENT_TARGET, else {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=bool(env.tls),
        help="use TLS with the system CA roots (implied by --ca-cert)",
    )
    group.add_argument(
        "--ca-cert",
        type=Path,
        default=env.ca_cert,
        help="PEM CA certificate that signed the server's certificate",
    )
    group.add_argument(
        "--client-cert",
        type=Path,
        default=env.client_cert,
        help="PEM client certificate for mutual TLS",
    )
    group.add_argument(
        "--client-key",
        type=Path,
        default=env.client_key,
        help="PEM private key of --client-cert",
    )
    group.add_argument(
        "--server-name",
        default=env.server_name,
        help="name to check the server certificate against",
    )
    group.add_argument(
        "--token-file",
        type=Path,
        default=env.token_file,
        help="file of the bearer token sent on every call (its last token, # comments skipped)",
    )
    group.add_argument(
        "--allow-insecure-token",
        action="store_true",
        default=bool(env.allow_insecure_token),
        help="send the token without TLS to a host other than this one (a trusted network "
        "only; refused by default)",
    )
    group.add_argument(
        "--timeout-s",
        type=_positive_float,
        default=env.timeout_s if env.timeout_s is not None else DEFAULT_TIMEOUT_S,
        help="deadline of each call in seconds (default %(default)s)",
    )


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The ``client`` parser; ``CLIENT_<FLAG>`` in ``environ`` (default: os.environ) are the
    connection flags' defaults.

    Raises:
        SettingError: a ``CLIENT_*`` value of the wrong type, naming the variable.
    """
    env = read_environment(os.environ if environ is None else environ)
    parser = argparse.ArgumentParser(
        prog="client", description="Client of the finetune inference server."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_classify_parser(commands, env)
    _add_health_parser(commands, env)
    _add_bench_parser(commands, env)
    _add_verify_parser(commands, env)
    return parser


def _add_classify_parser(commands: argparse._SubParsersAction, env: ClientEnvironment) -> None:
    """``client classify``: image files or directories, labels and scores out."""
    classify = commands.add_parser(
        "classify",
        help="classify image files",
        description="Prints PATH<TAB>LABEL<TAB>SCORE per image; with --top-k K, each line "
        "carries K label/score column pairs, best first, and a last column 'abstained' when "
        "the model was unsure (top score under the version's abstention threshold). Exit 0 "
        "only if every image was classified.",
    )
    _add_connection_flags(classify, env)
    classify.add_argument(
        "paths",
        nargs="+",
        metavar="IMAGE_OR_DIR",
        help="image files, or directories searched recursively for images",
    )
    classify.add_argument(
        "--top-k", type=positive_int_argument, default=1, help="labels per image (default 1)"
    )
    classify.add_argument("--json", action="store_true", help="print one JSON document")
    classify.add_argument("--model", default="", help="model name (default: server's default)")
    classify.add_argument("--model-version", default="", help="model version (default: latest)")
    classify.add_argument(
        "--parallel",
        type=positive_int_argument,
        default=8,
        help="requests in flight at once (default 8)",
    )
    classify.add_argument(
        "--abstention-threshold",
        type=_probability,
        default=None,
        help="abstain below this top score instead of the version's own (0: never abstain)",
    )


def _add_health_parser(commands: argparse._SubParsersAction, env: ClientEnvironment) -> None:
    """``client health``: the server's grpc.health.v1 status."""
    health = commands.add_parser(
        "health",
        help="check grpc.health.v1 status",
        description="Prints the health status; exit 0 only when SERVING.",
    )
    _add_connection_flags(health, env)
    health.add_argument("--service", default="", help="service name (default: whole server)")
    health.add_argument(
        "--wait-s",
        type=float,
        default=0.0,
        metavar="S",
        help="ask again every half second until SERVING or S seconds have passed, for a "
        "server that is still starting (default: ask once)",
    )


def _add_bench_parser(commands: argparse._SubParsersAction, env: ClientEnvironment) -> None:
    """``client bench``: the load generator's shape (closed or open loop) and request."""
    bench = commands.add_parser(
        "bench",
        help="load-test the server",
        description="asyncio load generator. Closed loop at --concurrency, or open loop at "
        "--rate requests/s (then --concurrency caps requests in flight). Sends Classify "
        "requests with --image (a generated JPEG when absent), or raw ModelInfer requests "
        "with random inputs when --model is given.",
    )
    _add_connection_flags(bench, env)
    bench.add_argument(
        "--concurrency",
        type=positive_int_argument,
        default=1,
        help="requests in flight (default 1)",
    )
    bench.add_argument(
        "--rate",
        type=_positive_float,
        default=None,
        help="fixed request rate per second (open loop)",
    )
    bench.add_argument(
        "--duration-s", type=_positive_float, default=10.0, help="measurement window (default 10)"
    )
    bench.add_argument(
        "--warmup-s", type=float, default=1.0, help="load before measuring, not counted (default 1)"
    )
    bench.add_argument(
        "--batch", type=positive_int_argument, default=1, help="images per request (default 1)"
    )
    bench.add_argument(
        "--image",
        type=Path,
        default=None,
        help="encoded image to classify (default: a generated 256 px JPEG)",
    )
    bench.add_argument(
        "--model", default="", help="send raw ModelInfer requests to this model instead of Classify"
    )
    bench.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_verify_parser(commands: argparse._SubParsersAction, env: ClientEnvironment) -> None:
    """``client verify``: a version's golden set against the server."""
    verify = commands.add_parser(
        "verify",
        help="check that the server reproduces a version's golden set",
        description="Sends the golden set of a model version (REPO/MODEL/VERSION/golden/) "
        "through Classify and compares every probability with what the trainer computed, as "
        "the server does when it loads the version. Exit 0 when it passes, 1 when any top-1 "
        "or probability differs beyond the set's tolerance.",
    )
    _add_connection_flags(verify, env)
    verify.add_argument("--model", required=True, help="model name")
    verify.add_argument(
        "--model-version", default="", help="version (default: the newest one the server loaded)"
    )
    verify.add_argument(
        "--repository",
        type=Path,
        default=env.repository or DEFAULT_REPOSITORY,
        help="the model repository the server serves, readable here "
        "(default $CLIENT_REPOSITORY, else ./models)",
    )
    verify.add_argument("--json", action="store_true", help="print the verdict as JSON")


def connection_options(args: argparse.Namespace) -> ConnectionOptions:
    token = read_token_file(args.token_file) if args.token_file else None
    return ConnectionOptions(
        target=args.target,
        tls=args.tls,
        ca_cert=args.ca_cert,
        client_cert=args.client_cert,
        client_key=args.client_key,
        server_name=args.server_name,
        token=token,
        timeout_s=args.timeout_s,
        allow_insecure_token=args.allow_insecure_token,
    )


def collect_images(paths: Sequence[str]) -> list[Path]:
    """Files as given; directories expanded to their image files, sorted, recursively."""
    found: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            images = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not images:
                raise UsageError(f"directory {path} holds no image files")
            found.extend(images)
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"no such file or directory: {path}")
    return found


async def _classify_all(
    options: ConnectionOptions, paths: list[Path], args: argparse.Namespace
) -> list[ImageResult | Exception]:
    slots = asyncio.Semaphore(args.parallel)

    async def one(client: AsyncInferenceClient, path: Path) -> ImageResult | Exception:
        async with slots:
            try:
                data = path.read_bytes()
            except OSError as exc:
                return exc
            try:
                results = await client.classify_images(
                    [data],
                    args.top_k,
                    model_name=args.model,
                    model_version=args.model_version,
                    abstention_threshold=args.abstention_threshold,
                )
            except RequestError as exc:
                return exc
            if len(results) != 1:
                return RequestError(
                    grpc.StatusCode.UNKNOWN, f"server answered {len(results)} results for one image"
                )
            return results[0]

    async with AsyncInferenceClient(options) as client:
        return list(await asyncio.gather(*(one(client, p) for p in paths)))


def _describe_error(error: Exception) -> str:
    if isinstance(error, OSError):
        return f"cannot read: {error.strerror or error}"
    return str(error)


def run_classify(args: argparse.Namespace) -> int:
    paths = collect_images(args.paths)
    outcomes = asyncio.run(_classify_all(connection_options(args), paths, args))
    failed = 0
    records: list[dict[str, object]] = []
    for path, outcome in zip(paths, outcomes, strict=True):
        if isinstance(outcome, Exception):
            failed += 1
            records.append({"path": str(path), "error": _describe_error(outcome)})
            if not args.json:
                print(f"{path}: {_describe_error(outcome)}", file=sys.stderr)
            continue
        records.append(
            {
                "path": str(path),
                "model": outcome.model_name,
                "model_version": outcome.model_version,
                "predictions": [
                    {"label": p.label, "index": p.index, "score": p.score}
                    for p in outcome.predictions
                ],
                "abstained": outcome.abstained,
            }
        )
        if not args.json:
            columns = [str(path)]
            for p in outcome.predictions:
                columns += [p.label, f"{p.score:.6f}"]
            if outcome.abstained:
                columns.append("abstained")
            print("\t".join(columns))
    if args.json:
        print(json.dumps({"results": records, "failed": failed}, indent=2))
    return EXIT_FAILED if failed else EXIT_OK


def run_health(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + max(0.0, args.wait_s)
    with InferenceClient(connection_options(args)) as client:
        while True:
            try:
                status: str | None = client.health(args.service)
                problem = None
            except RequestError as exc:
                status, problem = None, f"UNREACHABLE {exc}"
            if status == "SERVING" or time.monotonic() >= deadline:
                break
            time.sleep(_HEALTH_RETRY_S)
    if problem is not None:
        print(problem, file=sys.stderr)
        return EXIT_FAILED
    print(status)
    return EXIT_OK if status == "SERVING" else EXIT_FAILED


async def _bench(args: argparse.Namespace) -> BenchReport:
    spec = LoadSpec(
        concurrency=args.concurrency,
        rate=args.rate,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        batch=args.batch,
    )
    if args.model and args.image:
        raise UsageError("--image sends Classify requests; --model sends ModelInfer: pick one")
    async with AsyncInferenceClient(connection_options(args)) as client:
        if args.model:
            return await bench_infer(client, spec, args.model)
        image = _read_file(args.image) if args.image else synthetic_jpeg()
        return await bench_classify(client, spec, image)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def run_bench(args: argparse.Namespace) -> int:
    if args.warmup_s < 0:
        raise UsageError(f"--warmup-s must not be negative, got {args.warmup_s}")
    report = asyncio.run(_bench(args))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_text())
    if report.stopped:
        print(f"client bench: stopped early: {report.stopped}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if report.error_count or not report.requests_ok else EXIT_OK


def run_verify(args: argparse.Namespace) -> int:
    with InferenceClient(connection_options(args)) as client:
        report = verify(client, args.repository, args.model, args.model_version)
    if args.json:
        print(json.dumps(dataclasses.asdict(report) | {"passed": report.passed}, indent=2))
    else:
        print(report.format_text())
    return EXIT_OK if report.passed else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except SettingError as exc:
        print(f"client: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    handlers = {
        "classify": run_classify,
        "health": run_health,
        "bench": run_bench,
        "verify": run_verify,
    }
    try:
        return handlers[args.command](args)
    except (UsageError, ClientConfigError, BenchSetupError, TensorError, VerifySetupError) as exc:
        print(f"client {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RequestError as exc:
        print(f"client {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
