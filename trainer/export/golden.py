"""The golden set an exported version carries (layout and comparison: ``contracts.golden_set``).

A few dozen val images, byte-for-byte as on disk, plus one stored sideways with an EXIF
rotation (found among the val images, or generated from one of them), each with the
probabilities the trainer's eval path computes: ``trainer.data.image_decode`` -> torchvision's
eval resize and centre crop -> the serving module in PyTorch. The same files are then run
through a Pillow decode and resize into the exported ONNX graph, as the server will; the
largest difference is recorded, and the tolerance is derived from it.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from contracts.golden_set import GOLDEN_DIRNAME, GOLDEN_FILENAME, GoldenImage, GoldenSet
from contracts.graph_signature import INPUT_NAME, PROBABILITIES_NAME, UINT8_NHWC
from contracts.preprocessing import Preprocessing
from trainer.data.augment import eval_transform
from trainer.data.image_decode import CorruptImage, decode_image, open_rgb
from trainer.export.graph import ServingModel
from trainer.export.images import preprocess
from trainer.export.ort_checks import cpu_session, to_feed

log = logging.getLogger(__name__)

#: Val images in the set (plus the EXIF-rotated one).
GOLDEN_LIMIT = 32
#: Val files whose EXIF header is read while looking for a rotated one.
EXIF_SEARCH_LIMIT = 2000
#: The tolerance is this many times the largest difference measured at export ...
TOLERANCE_FACTOR = 3.0
#: ... and at least this (absolute probability): the floor covers differences the export's
#: own measurement cannot see, such as another onnxruntime build or CPU on the server.
TOLERANCE_FLOOR = 0.01
_ORIENTATION = 0x0112
GENERATED = "generated"
DRAFT_FREE_FACTOR = 4


@dataclass(frozen=True)
class _Candidate:
    path: Path
    label: int
    source: str


def build_golden_set(  # noqa: PLR0913  the export's facts, passed by keyword
    data_dir: Path,
    val_files: Sequence[tuple[Path, int]],
    *,
    classes: Sequence[str],
    preprocessing: Preprocessing,
    serving: ServingModel,
    onnx_path: Path,
    input_format: str,
) -> tuple[GoldenSet, dict[str, bytes]]:
    """The golden set for an exported graph, and its files keyed by their path in the version.

    Args:
        data_dir: the data folder ``val_files`` lie in (the golden images are named from it).
        val_files: the run's val split (``trainer.export.images.list_split``).
    """
    candidates = _choose(Path(data_dir), val_files, preprocessing.resize_size)
    paths = _Paths(preprocessing, serving, onnx_path, input_format)
    with tempfile.TemporaryDirectory(prefix="golden-") as work_dir:
        work = Path(work_dir)
        files = _copy(candidates, work)
        expected, served = paths.measure(files)
        if files and not any(_exif_orientation(path) not in (None, 0, 1) for path in files):
            # No val image is stored rotated: turn the clearest one (largest top-1 margin).
            source = candidates[int(np.argmax([_margin(row) for row in expected]))]
            rotated = work / f"{len(files):02d}-exif-rotated.jpg"
            _write_rotated(source.path, rotated)
            candidates.append(_Candidate(source.path, source.label, GENERATED))
            files.append(rotated)
            more_expected, more_served = paths.measure([rotated])
            expected = np.concatenate([expected, more_expected])
            served = np.concatenate([served, more_served])
        contents = {path.name: path.read_bytes() for path in files}
    measured = float(np.abs(expected - served).max())
    tolerance = round(max(TOLERANCE_FLOOR, TOLERANCE_FACTOR * measured), 6)
    images = []
    left_out = []
    for path, candidate, row, graph_row in zip(files, candidates, expected, served, strict=True):
        top1 = int(np.argmax(row))
        if top1 != int(np.argmax(graph_row)) or _margin(row) <= 2 * tolerance:
            # On a decision boundary: differences within the tolerance may flip its top-1.
            left_out.append(candidate.source)
            del contents[path.name]
            continue
        probabilities = tuple(float(p) for p in row)
        images.append(
            GoldenImage(path.name, top1, probabilities, candidate.source, candidate.label)
        )
    golden = GoldenSet(tuple(classes), tuple(images), tolerance, measured)
    _log_summary(golden, left_out)
    version_files = {f"{GOLDEN_DIRNAME}/{name}": data for name, data in contents.items()}
    version_files[f"{GOLDEN_DIRNAME}/{GOLDEN_FILENAME}"] = _json_bytes(golden)
    return golden, version_files


def _log_summary(golden: GoldenSet, left_out: list[str]) -> None:
    if left_out:
        log.info(
            "golden set: left out %d image(s) whose top-1 margin is within the tolerance: %s",
            len(left_out),
            ", ".join(left_out),
        )
    log.debug(  # the export's golden set step line says it
        "golden set: %d images, largest probability difference trainer vs graph %.2g, "
        "tolerance %.2g",
        len(golden.images),
        golden.measured_max_abs_diff,
        golden.tolerance,
    )


@dataclass(frozen=True)
class _Paths:
    """The two paths an image takes: the trainer's eval path and the served graph's."""

    preprocessing: Preprocessing
    serving: ServingModel
    onnx_path: Path
    input_format: str

    def measure(self, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``[N, C]`` of both paths."""
        return (
            _trainer_probabilities(files, self.preprocessing, self.serving, self.input_format),
            _graph_probabilities(files, self.preprocessing, self.onnx_path, self.input_format),
        )


def _json_bytes(golden: GoldenSet) -> bytes:
    return (json.dumps(golden.to_dict(), indent=2) + "\n").encode()


def _margin(row: np.ndarray) -> float:
    best = np.sort(row)[::-1]
    return float(best[0] - best[1]) if len(best) > 1 else 1.0


def _choose(
    data_dir: Path, val_files: Sequence[tuple[Path, int]], resize_size: int
) -> list[_Candidate]:
    """Up to ``GOLDEN_LIMIT`` decodable val images (classes interleaved), and a rotated one
    beyond them when one exists among the first ``EXIF_SEARCH_LIMIT``."""
    chosen: list[_Candidate] = []
    found_rotated = False
    for path, label in val_files[:EXIF_SEARCH_LIMIT]:
        if len(chosen) >= GOLDEN_LIMIT and found_rotated:
            break
        orientation = _exif_orientation(path)
        is_rotated = orientation not in (None, 0, 1)
        wanted = len(chosen) < GOLDEN_LIMIT or (is_rotated and not found_rotated)
        if orientation is not None and wanted and _decodes(path, resize_size):
            chosen.append(_Candidate(path, label, path.relative_to(data_dir).as_posix()))
            found_rotated = found_rotated or is_rotated
    return chosen


def _exif_orientation(path: Path) -> int | None:
    """The EXIF orientation from the header (0 without one); None if it cannot be read."""
    try:
        with Image.open(path) as image:
            return int(image.getexif().get(_ORIENTATION, 0))
    except (OSError, ValueError, SyntaxError):
        return None


def _decodes(path: Path, resize_size: int) -> bool:
    """Decodable, and not a JPEG the server would decode at a reduced DCT scale."""
    try:
        image = open_rgb(path)
        with Image.open(path) as opened:
            is_jpeg = opened.format == "JPEG"
    except (CorruptImage, OSError):
        return False
    # The server's Image.draft keeps at least twice the resize target, so JPEGs under four
    # times it decode in full there too; larger ones would test the draft, not the contract.
    return not is_jpeg or min(image.size) < DRAFT_FREE_FACTOR * resize_size


def _copy(candidates: list[_Candidate], work: Path) -> list[Path]:
    """The files, byte-for-byte, under their golden names."""
    files = []
    for index, candidate in enumerate(candidates):
        target = work / f"{index:02d}{candidate.path.suffix.lower()}"
        shutil.copyfile(candidate.path, target)
        files.append(target)
    return files


def _write_rotated(source: Path, target: Path) -> None:
    """A JPEG stored turned 90 degrees anticlockwise with orientation 6, upright when read."""
    upright = open_rgb(source)
    exif = Image.Exif()
    exif[_ORIENTATION] = 6
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(
        buffer, "JPEG", quality=95, exif=exif.tobytes()
    )
    target.write_bytes(buffer.getvalue())


@torch.no_grad()
def _trainer_probabilities(
    files: list[Path], pre: Preprocessing, serving: ServingModel, input_format: str
) -> np.ndarray:
    """The trainer's eval path: its decode, torchvision's resize and crop, PyTorch."""
    transform = eval_transform(pre)
    crops = torch.stack([transform(decode_image(path)) for path in files])
    if input_format == UINT8_NHWC:
        feed = crops.permute(0, 2, 3, 1).contiguous()
    else:
        mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
        std = torch.tensor(pre.std).view(1, 3, 1, 1)
        feed = (crops.float() / 255.0 - mean) / std
    serving.eval()
    _, probabilities = serving(feed)
    return probabilities.double().numpy()


def _graph_probabilities(
    files: list[Path], pre: Preprocessing, onnx_path: Path, input_format: str
) -> np.ndarray:
    """Pillow's decode and resize into the exported graph, as the server computes them."""
    images = np.stack(
        [preprocess(path, input_size=pre.input_size, resize_size=pre.resize_size) for path in files]
    )
    session = cpu_session(onnx_path)
    feed = to_feed(images, input_format, pre.mean, pre.std)
    (probabilities,) = session.run([PROBABILITIES_NAME], {INPUT_NAME: feed})
    return np.asarray(probabilities, dtype=np.float64)
