"""The head phase as a converged probe on cached features, and the augmentation it decides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from trainer_helpers import make_image_folder, tiny_config

from trainer.head import feature_cache as fc
from trainer.head.linear_probe import LabelledFeatures
from trainer.run import train

_ARROW = [
    (-1.0, -0.25),
    (0.2, -0.25),
    (0.2, -0.7),
    (1.0, 0.0),
    (0.2, 0.7),
    (0.2, 0.25),
    (-1.0, 0.25),
]


def _draw(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.3, 0.42) * size
    cx, cy = rng.uniform(r, size - r, 2)
    colour = tuple(int(c) for c in rng.integers(150, 256, 3))
    if kind in ("left", "right"):
        sign = -1.0 if kind == "left" else 1.0
        draw.polygon([(cx + sign * x * r, cy + y * r) for x, y in _ARROW], fill=colour)
    elif kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return image


def make_shapes(root: Path, kinds: tuple[str, ...], train: int = 40, val: int = 30) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for kind in kinds:
            folder = root / split / kind
            folder.mkdir(parents=True)
            for i in range(count):
                _draw(kind, rng, 40).save(folder / f"{kind}-{i}.png")
    return root


def _probe_run(data: Path, output: Path, **overrides) -> dict:
    flags = {"head_epochs": 1, "finetune_epochs": 0, "batch_size": 16} | overrides
    return train(tiny_config(data, output, **flags))


def test_head_phase_is_a_converged_probe(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    data = make_shapes(tmp_path / "data", ("left", "right", "circle", "square"), 24, 16)
    summary = _probe_run(data, tmp_path / "run", feature_views=2)
    head = summary["head_phase"]
    assert head["method"] == "linear-probe" and head["cache"] == "built"
    document = torch.load(tmp_path / "run" / fc.CACHE_FILE, weights_only=True)
    scaler = StandardScaler().fit(document["train_features"].numpy())
    reference = LogisticRegression(max_iter=2000).fit(
        scaler.transform(document["train_features"].numpy()), document["train_labels"].numpy()
    )
    sklearn_accuracy = reference.score(
        scaler.transform(document["val_features"].numpy()), document["val_labels"].numpy()
    )
    assert summary["head_phase_val_accuracy"] == pytest.approx(head["val_accuracy"], abs=1e-3)
    assert summary["head_phase_val_accuracy"] >= 0.95 * sklearn_accuracy
    assert summary["best_val_accuracy"] >= summary["head_phase_val_accuracy"] - 1e-9
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


def test_flip_that_changes_labels_turns_off(tmp_path: Path) -> None:
    data = make_shapes(tmp_path / "data", ("left", "right"))
    summary = _probe_run(data, tmp_path / "run", feature_views=1)
    decision = summary["augment"]["decisions"]["hflip"]
    assert decision["source"] == "tested"
    assert decision["enabled"] is False, decision
    assert summary["augment"]["hflip"] is False
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    assert "hflip: false" in recorded


def test_flip_that_keeps_labels_stays_on(tmp_path: Path) -> None:
    data = make_shapes(tmp_path / "data", ("circle", "square"))
    summary = _probe_run(data, tmp_path / "run", feature_views=1)
    decision = summary["augment"]["decisions"]["hflip"]
    assert decision["source"] == "tested" and decision["enabled"] is True, decision
    assert "hflip: true" in (tmp_path / "run" / "config.yaml").read_text()


def test_explicit_flag_wins(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data")
    summary = _probe_run(data, tmp_path / "run", hflip=True, vflip=False, feature_views=1)
    decisions = summary["augment"]["decisions"]
    assert decisions["hflip"] == {"enabled": True, "source": "flag"}
    assert decisions["vflip"] == {"enabled": False, "source": "flag"}


def test_feature_cache_reused_then_rebuilt_on_fingerprint_mismatch(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    assert _probe_run(data, out, resume="never", feature_views=1)["head_phase"]["cache"] == "built"
    assert _probe_run(data, out, resume="never", feature_views=1)["head_phase"]["cache"] == "reused"
    # Another view count is another cache: rebuilt, never read as this one.
    assert _probe_run(data, out, resume="never", feature_views=2)["head_phase"]["cache"] == "built"


def test_load_bank_refuses_foreign_and_corrupt_files(tmp_path: Path) -> None:
    bank = fc.FeatureBank(
        LabelledFeatures(torch.ones(4, 3), torch.zeros(4, dtype=torch.long)),
        LabelledFeatures(torch.ones(2, 3), torch.zeros(2, dtype=torch.long)),
        {"hflip": torch.ones(2, 3)},
        views=2,
    )
    path = tmp_path / "features.pt"
    fc.save_bank(path, bank, "key-a")
    assert fc.load_bank(path, "key-a") is not None
    assert fc.load_bank(path, "key-b") is None
    path.write_bytes(b"not a cache")
    assert fc.load_bank(path, "key-a") is None
    torch.save({"format": fc.CACHE_FORMAT, "version": 1, "fingerprint": "key-a"}, path)
    assert fc.load_bank(path, "key-a") is None


def test_budget_too_small_streams_the_head_phase(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data")
    summary = _probe_run(data, tmp_path / "run", feature_cache_mb=0)
    assert summary["head_phase"]["method"] == "streamed"
    assert "feature_cache_mb" in summary["head_phase"]["fallback"]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["head"]


def test_two_layer_head_trains_on_the_cache(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data")
    summary = _probe_run(data, tmp_path / "run", head_hidden=16, feature_views=1)
    assert summary["head_phase"]["method"] == "cached-adam"
    assert summary["head_phase_val_accuracy"] > 0.5
