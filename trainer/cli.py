"""``trainer`` command line: parses arguments and calls library functions, nothing else.

Exit codes: 0 success (also after a graceful SIGTERM stop with a checkpoint saved), 2 bad
usage, config, data or weights (``trainer: error: <message>`` on stderr), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from contracts.settings import positive_int_argument
from trainer.commands.demo_data import add_parser as add_demo_parser
from trainer.commands.ingest import add_parser as add_ingest_parser
from trainer.errors import RUNTIME_EXIT_CODE, USAGE_EXIT_CODE, UsageError
from trainer.export.cli import add_parser as add_export_parser

log = logging.getLogger("trainer")


def build_parser() -> argparse.ArgumentParser:
    """The ``trainer`` parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="trainer", description="Two-phase fine-tuning of torchvision classifiers."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(subparsers)
    add_export_parser(subparsers)
    add_demo_parser(subparsers)
    add_ingest_parser(subparsers)
    _add_evaluate_parser(subparsers)
    return parser


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from trainer.config import FIELDS, field_help_with_default, field_type

    parser = subparsers.add_parser(
        "train",
        help="fine-tune a torchvision classifier on an image folder",
        description=(
            "Fine-tune in two phases (head only, then unfrozen layer groups), checkpoint, "
            "report and export. Every flag is also a YAML key (--config) and an environment "
            "variable TRAINER_<NAME>; flags win over the environment, which wins over the file."
        ),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML file of settings")
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        base, _ = field_type(name)
        text = field_help_with_default(name)
        if base is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, dest=name, metavar=name.split("_")[-1].upper(), help=text)
    parser.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from trainer.config import FIELDS, build_config, check_output_directory, given_settings
    from trainer.errors import DataError

    # Only flags given are in ``args`` (SUPPRESS): a resumed run takes the rest from its
    # checkpoint, so what was given (file, environment, flags) travels with the config.
    flags = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    given = given_settings(file=getattr(args, "config", None), flags=flags)
    config = build_config(given)
    # Checked before the imports below, which pull in torch and torchvision (seconds).
    assert config.data is not None and config.output is not None  # build_config checked
    if not config.data.is_dir():
        raise DataError(f"data: {config.data} does not exist or is not a directory")
    check_output_directory(config.output, "output")
    if config.repository is not None:
        check_output_directory(config.repository, "repository")
    from trainer.progress import configure_logging
    from trainer.run import train

    configure_logging(fmt=config.log_format)
    summary = train(config, given=frozenset(given))
    if summary.get("status") == "interrupted":
        log.info("stopped on request; resume with --resume auto")
    return 0


def _add_evaluate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure a checkpoint or an exported model on an image folder",
        description=(
            "Evaluate a model on DIR/<class>/* (one split of the trainer's data, or a test "
            "folder of the model's classes): top-1 and top-5 accuracy (top-5 with more than 5 "
            "classes), per-class precision, recall, F1 and support, the confusion matrix, ECE "
            "(15 bins) and NLL. A checkpoint runs in PyTorch with the trainer's eval "
            "preprocessing; a repository version runs in onnxruntime on the CPU, fed as the "
            "server feeds it. Tables are printed; --output also writes evaluation.json and "
            "confusion.png."
        ),
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--checkpoint",
        type=Path,
        metavar="PATH",
        help="checkpoint (.pt) written by trainer train; loaded without running any code",
    )
    model.add_argument(
        "--model-repository",
        type=Path,
        metavar="DIR",
        help="Triton-layout model repository written by trainer export",
    )
    parser.add_argument(
        "--model",
        metavar="NAME",
        help="model name in the repository (default: classifier)",
    )
    parser.add_argument(
        "--version",
        type=positive_int_argument,
        metavar="N",
        help="model version in the repository (default: the latest complete one)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="DIR",
        help="image folder DIR/<class>/* whose class folders are the model's classes",
    )
    parser.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="also write evaluation.json and confusion.png here (default: print only)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int_argument,
        default=32,
        metavar="N",
        help="images per forward pass (default: %(default)s)",
    )
    parser.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from trainer.config import check_output_directory
    from trainer.errors import ConfigError, DataError

    if args.checkpoint is not None and (args.model is not None or args.version is not None):
        raise ConfigError("--model and --version choose a version of --model-repository")
    # Checked before the imports below, which pull in torch and onnxruntime (seconds).
    if not args.data.is_dir():
        raise DataError(f"data: {args.data} does not exist or is not a directory")
    if args.output is not None:
        check_output_directory(args.output, "--output")
    from trainer.commands.evaluate import (
        DEFAULT_MODEL_NAME,
        evaluate_folder,
        format_report,
        load_checkpoint_model,
        load_repository_model,
        write_outputs,
    )
    from trainer.progress import configure_logging

    configure_logging()
    if args.checkpoint is not None:
        model = load_checkpoint_model(args.checkpoint)
    else:
        name = args.model or DEFAULT_MODEL_NAME
        model = load_repository_model(args.model_repository, name, args.version)
    evaluation = evaluate_folder(model, args.data, batch_size=args.batch_size)
    print(format_report(evaluation))
    if args.output is not None:
        for path in write_outputs(evaluation, args.output):
            print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trainer`` and ``python -m trainer``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return USAGE_EXIT_CODE
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"trainer: error: {exc}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except Exception:
        log.exception("trainer %s failed", args.command)
        return RUNTIME_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
