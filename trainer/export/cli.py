"""The ``trainer export`` subcommand: parses flags and calls ``export_checkpoint``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from contracts.graph_signature import DEFAULT_INPUT_FORMAT, INPUT_FORMATS
from trainer.config import check_output_directory
from trainer.errors import CheckpointError, ConfigError
from trainer.evaluation.abstention import DEFAULT_TARGET_PRECISION
from trainer.export.precisions import INT8_MODES, PRECISIONS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export`` on the ``trainer`` command line; sets ``func``."""
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint to a verified ONNX model in a Triton-layout repository",
        description=(
            "Export a training checkpoint to ONNX, verify it against PyTorch, and publish it "
            "as the next version of REPO/<model-name>/."
        ),
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="checkpoint file (.pt) written by trainer train; loaded without running any code",
    )
    parser.add_argument(
        "--output-repository",
        type=Path,
        required=True,
        help="model repository root (created when missing)",
    )
    parser.add_argument(
        "--model-name",
        default="classifier",
        help="model directory name: letters, digits, '_', '.', '-' (default: %(default)s)",
    )
    parser.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        default=DEFAULT_INPUT_FORMAT,
        help="graph input: uint8 RGB NHWC with preprocessing in the graph, or normalised NCHW "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="precision of the published model; int8 needs --data (default: %(default)s)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="ImageFolder root (train/, val/): real-image parity, int8 calibration, accuracy "
        "(default: random images for parity only)",
    )
    parser.add_argument(
        "--int8-mode",
        choices=INT8_MODES,
        default="static",
        help="int8 quantisation: static (calibrated on train images) or dynamic "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--int8-accuracy-budget",
        type=float,
        default=1.0,
        metavar="POINTS",
        help="refuse an int8 model whose val accuracy drops more than this (default 1 point)",
    )
    parser.add_argument(
        "--abstention-precision",
        type=_fraction,
        default=DEFAULT_TARGET_PRECISION,
        metavar="P",
        help="choose the abstention threshold on the val images (--data) so that the answers "
        "the server does not abstain on are right this often (default: %(default)s)",
    )
    parser.set_defaults(func=run)
    return parser


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    """Run the export; usage problems raise ``UsageError``, failed checks ``ExportError``."""
    if args.int8_accuracy_budget < 0:
        raise ConfigError("--int8-accuracy-budget must be >= 0 points")
    # Checked before the import below, which pulls in torch and onnx (seconds).
    if not args.checkpoint.is_file():
        raise CheckpointError(f"checkpoint {args.checkpoint} does not exist or is not a file")
    check_output_directory(args.output_repository, "--output-repository")
    from trainer.export.exporter import export_checkpoint
    from trainer.progress import configure_logging

    # One line per export step on stderr; stdout keeps the JSON summary.
    configure_logging()
    result = export_checkpoint(
        args.checkpoint,
        args.output_repository,
        model_name=args.model_name,
        input_format=args.input_format,
        precision=args.precision,
        data_dir=args.data,
        int8_mode=args.int8_mode,
        int8_accuracy_budget=args.int8_accuracy_budget,
        abstention_precision=args.abstention_precision,
    )
    summary = {
        "model_dir": str(result.model_dir),
        "version": result.version,
        "precision": result.precision,
        "max_abs_diff_logits": result.max_abs_diff,
        "exporter": result.exporter,
    }
    comparison = result.metadata.get("precision_comparison")
    if comparison:
        summary["precision_comparison"] = comparison
    print(json.dumps(summary, indent=2))
    return 0
