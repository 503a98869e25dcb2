"""The trainer's subcommands other than ``train`` and ``export``: ``evaluate``,
``ingest`` and ``make-demo-data``."""
