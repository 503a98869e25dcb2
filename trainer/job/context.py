"""What every part of one training process is given: built once by ``trainer.run``, frozen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.checkpoint import BEST, LAST, START_OF_PHASE_2, CheckpointHeader
from trainer.config import TrainConfig
from trainer.job.process_setup import DistInfo


@dataclass(frozen=True)
class RunContext:
    """The resolved config, this process's place in the job, its device and outputs.

    Attributes:
        config: the config with every default resolved (``config.resolve_defaults``).
        dist: rank and world size.
        device: where this rank trains.
        output: the run's output directory.
        checkpoints: ``output/checkpoints``.
        header: what every checkpoint of this run records about the model.
    """

    config: TrainConfig
    dist: DistInfo
    device: torch.device
    output: Path
    checkpoints: Path
    header: CheckpointHeader

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, logs metrics and exports."""
        return self.dist.is_main

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / BEST

    @property
    def phase_2_start_checkpoint(self) -> Path:
        return self.checkpoints / START_OF_PHASE_2
