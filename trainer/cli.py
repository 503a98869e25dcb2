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

from trainer.errors import RUNTIME_EXIT_CODE, USAGE_EXIT_CODE, UsageError

log = logging.getLogger("trainer")


def build_parser() -> argparse.ArgumentParser:
    """The ``trainer`` parser with its subcommands (export and demo data when installed)."""
    parser = argparse.ArgumentParser(
        prog="trainer", description="Two-phase fine-tuning of torchvision classifiers."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(subparsers)
    try:
        from trainer.export.cli import add_parser as add_export_parser
    except ImportError as exc:
        log.debug("export subcommand unavailable: %s", exc)
    else:
        add_export_parser(subparsers)
    try:
        from trainer.demo_data import add_parser as add_demo_parser
    except ImportError as exc:
        log.debug("make-demo-data subcommand unavailable: %s", exc)
    else:
        add_demo_parser(subparsers)
    from trainer.ingest import add_parser as add_ingest_parser

    add_ingest_parser(subparsers)
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
    from trainer.config import FIELDS, build_config, given_settings
    from trainer.progress import configure_logging
    from trainer.run import train

    # Only flags given are in ``args`` (SUPPRESS): a resumed run takes the rest from its
    # checkpoint, so what was given (file, environment, flags) travels with the config.
    flags = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    given = given_settings(file=getattr(args, "config", None), flags=flags)
    config = build_config(given)
    configure_logging(fmt=config.log_format)
    summary = train(config, given=frozenset(given))
    if summary.get("status") == "interrupted":
        log.info("stopped on request; resume with --resume auto")
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
        log.exception("training failed")
        return RUNTIME_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
