"""Usage mistakes: one line ``trainer: error: ...`` naming the problem, exit 2, no traceback.

Each runs the real command in a subprocess, as a user would. The mistakes the arguments and
the config alone reveal are reported before torch is imported, so they cost a second, not ten.
"""

from __future__ import annotations

import json
import pickle
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from trainer.errors import ConfigError
from trainer.model.weights import resolve_weights

# CPU seconds of the command, which a loaded machine does not change (its wall time it does):
# about 0.5 s when it fails before torch is imported; importing torch and torchvision alone
# costs about 9 s. The check on sys.modules says which modules were imported.
FAST_CPU_SECONDS = 3.0
HEAVY_MODULES = ("torch", "torchvision", "onnxruntime")


def run_trainer(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def cpu_seconds_of(
    run: Callable[[], subprocess.CompletedProcess[str]],
) -> tuple[subprocess.CompletedProcess[str], float]:
    """``run()``'s result and the CPU seconds of the child processes it waited for."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result, used


def assert_usage_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trainer: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.returncode == 2


def heavy_modules_at_failure(*args: str | Path) -> tuple[int, list[str]]:
    """Runs ``trainer.cli.main`` in a fresh interpreter; its exit code and what it imported."""
    code = (
        "import json, sys; from trainer.cli import main; "
        f"code = main({[str(a) for a in args]!r}); "
        f"print(json.dumps([code, [m for m in {HEAVY_MODULES!r} if m in sys.modules]]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    exit_code, modules = json.loads(result.stdout.splitlines()[-1])
    return exit_code, modules


def test_train_output_that_is_a_file(image_folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "output.txt"
    output.write_text("not a directory\n")
    result = run_trainer("train", "--data", image_folder, "--output", output, "--weights", "none")
    assert_usage_error(result, f"output: {output} is a file, not a directory")


def test_train_output_under_a_file(image_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    output = tmp_path / "file" / "run"
    result = run_trainer("train", "--data", image_folder, "--output", output, "--weights", "none")
    assert_usage_error(result, f"output: {output} cannot be created", f"{tmp_path / 'file'}")


def test_evaluate_output_that_is_a_file(image_folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "evaluation"
    output.write_text("x")
    result = run_trainer(
        "evaluate",
        "--checkpoint",
        tmp_path / "best.pt",
        "--data",
        image_folder / "val",
        "--output",
        output,
    )
    assert_usage_error(result, f"--output: {output} is a file, not a directory")


def test_export_output_repository_that_is_a_file(tmp_path: Path) -> None:
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"checked later")
    repository = tmp_path / "models"
    repository.write_text("x")
    result = run_trainer("export", "--checkpoint", checkpoint, "--output-repository", repository)
    assert_usage_error(result, f"--output-repository: {repository} is a file, not a directory")


@pytest.mark.slow
def test_weights_file_that_is_not_a_checkpoint(image_folder: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights.pt"
    weights.write_text("hello\n")  # torch.load used to say "KeyError: 101"
    result = run_trainer(
        "train",
        "--data",
        image_folder,
        "--output",
        tmp_path / "out",
        "--weights",
        weights,
        "--image-size",
        "32",
        "--device",
        "cpu",
    )
    assert_usage_error(
        result, f"weights: {weights} is not a checkpoint of this trainer or a state dict"
    )


def _write_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"a": 1}))


def _write_tensor(path: Path) -> None:
    torch.save(torch.zeros(3), path)


def _write_dict_of_numbers(path: Path) -> None:
    torch.save({"weight": 1.0}, path)


@pytest.mark.filterwarnings("error")  # a warning would be a second line on stderr
@pytest.mark.parametrize(
    "write",
    [
        lambda path: path.write_text("hello\n"),
        lambda path: path.write_bytes(bytes(range(256))),
        lambda path: path.write_text('{"json": true}'),
        _write_pickle,
        _write_tensor,
        _write_dict_of_numbers,
    ],
)
def test_weights_that_are_no_state_dict_say_so_in_one_line(tmp_path: Path, write) -> None:
    path = tmp_path / "weights.pt"
    write(path)
    with pytest.raises(ConfigError) as caught:
        resolve_weights("resnet18", str(path))
    message = str(caught.value)
    assert f"weights: {path} is not a checkpoint of this trainer or a state dict" in message
    assert "\n" not in message


def test_bad_image_size_is_reported_before_torch_is_imported(
    image_folder: Path, tmp_path: Path
) -> None:
    # 2 cores: 12.0-19.5 s before (image_size checked after torch and the data scan), 0.4-0.6 s
    # after.
    args = ("train", "--data", image_folder, "--output", tmp_path / "out", "--image-size", "-3")
    result, cpu_s = cpu_seconds_of(lambda: run_trainer(*args))
    assert_usage_error(result, "image_size: must be at least 16, got -3")
    assert cpu_s < FAST_CPU_SECONDS, cpu_s
    assert heavy_modules_at_failure(*args) == (2, [])


def test_missing_data_is_reported_before_torch_is_imported() -> None:
    result, cpu_s = cpu_seconds_of(lambda: run_trainer("train", "--output", "out"))
    assert_usage_error(result, "data: is required (--data DIR)")
    assert cpu_s < FAST_CPU_SECONDS, cpu_s
    assert heavy_modules_at_failure("train", "--output", "out") == (2, [])


def test_missing_data_folder_is_reported_before_torch_is_imported(tmp_path: Path) -> None:
    args = ("train", "--data", tmp_path / "nope", "--output", tmp_path / "out")
    assert_usage_error(run_trainer(*args), f"data: {tmp_path / 'nope'} does not exist")
    assert heavy_modules_at_failure(*args) == (2, [])
