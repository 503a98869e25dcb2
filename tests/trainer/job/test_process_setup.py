"""Process setup from the environment of torchrun, a PyTorchJob or an Indexed Job."""

from __future__ import annotations

import pytest
import torch

from trainer.errors import ConfigError
from trainer.job.process_setup import DistInfo, configure_threads, dist_info_from_env, select_amp

MASTER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_single_process_without_world_size() -> None:
    assert dist_info_from_env({}) == DistInfo(0, 1, 0)


def test_torchrun_environment() -> None:
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", **MASTER}
    info = dist_info_from_env(env)
    assert info == DistInfo(3, 4, 1) and info.enabled and not info.is_main


def test_indexed_job_rank_from_completion_index() -> None:
    info = dist_info_from_env({"WORLD_SIZE": "2", "JOB_COMPLETION_INDEX": "1", **MASTER})
    assert info == DistInfo(1, 2, 0)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "2", **MASTER}, "neither RANK nor JOB_COMPLETION_INDEX"),
        ({"WORLD_SIZE": "2", "RANK": "2", **MASTER}, "outside world size"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR and MASTER_PORT"),
        ({"WORLD_SIZE": "two"}, "distributed environment"),
    ],
)
def test_bad_distributed_environment(env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dist_info_from_env(env)


def test_threads_shared_by_local_ranks() -> None:
    before = torch.get_num_threads()
    assert configure_threads({"OMP_NUM_THREADS": "3"}) == before  # explicit setting wins
    assert configure_threads({"LOCAL_WORLD_SIZE": "64"}) == 1


def test_amp_choices_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert select_amp("off", cpu) == (None, False)
    assert select_amp("bf16", cpu) == (torch.bfloat16, False)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        select_amp("fp16", cpu)
