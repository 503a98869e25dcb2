"""The export's golden set: val images byte-for-byte, a generated EXIF-rotated one, the
trainer's probabilities, a measured tolerance; and the server's load-time check passes it."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from contracts.golden_set import GOLDEN_DIRNAME, read_golden_set
from trainer.export import ExportResult

EXIF_ORIENTATION = 0x0112


def test_golden_set_is_published_with_the_version(
    resnet_export: tuple[ExportResult, Path], image_folder: Path
) -> None:
    result, _checkpoint = resnet_export
    found = read_golden_set(result.model_dir)
    assert found is not None
    golden, data = found
    assert golden.labels == tuple(result.metadata["labels"])
    assert 0 < golden.tolerance <= 0.05
    assert golden.tolerance >= golden.measured_max_abs_diff
    summary = result.metadata["golden_set"]
    assert summary["images"] == len(golden.images) and summary["tolerance"] == golden.tolerance
    sources = {image.source: raw for image, raw in zip(golden.images, data, strict=True)}
    for source, raw in sources.items():
        if source != "generated":
            assert (image_folder / source).read_bytes() == raw  # byte-for-byte as on disk
    for image in golden.images:
        assert abs(sum(image.probabilities) - 1.0) < 1e-4
        assert image.top1 == max(
            range(len(image.probabilities)), key=image.probabilities.__getitem__
        )
    document = json.loads((result.model_dir / GOLDEN_DIRNAME / "golden.json").read_text())
    assert document["format"] == "finetune-golden-set/1"


def test_generated_golden_image_is_stored_sideways_with_exif_rotation(
    resnet_export: tuple[ExportResult, Path],
) -> None:
    result, _checkpoint = resnet_export
    found = read_golden_set(result.model_dir)
    assert found is not None
    generated = [image for image in found[0].images if image.source == "generated"]
    # The fixture's PNGs (48 x 40) carry no orientation: the clearest one is stored turned.
    assert len(generated) == 1
    with Image.open(result.model_dir / GOLDEN_DIRNAME / generated[0].file) as image:
        assert image.format == "JPEG"
        assert image.getexif().get(EXIF_ORIENTATION) == 6
        assert image.size == (40, 48)
