"""A real run with ``--unlabeled-data``: phase 2 adds the ramped MMD term, AdaBN is tried on
the best model and kept only when val accuracy does not drop, and what was used (counts,
methods, weights, both accuracies, the entropies) is in summary.json, best.pt and the
model.json the export builds from it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from trainer_helpers import make_capture_folder, make_image_folder, tiny_config

from trainer import checkpoint as ckpt
from trainer.export.metadata import build_metadata
from trainer.run import train


@pytest.fixture(scope="module")
def adapted_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    root = tmp_path_factory.mktemp("adaptation")
    data = make_image_folder(root / "data", classes=("a", "b"), train_per_class=6)
    captures = make_capture_folder(root / "captures", count=7, corrupt=1)
    config = tiny_config(
        data, root / "out", finetune_epochs=2, calibrate="off", unlabeled_data=captures
    )
    handler = _Collect()
    logger = logging.getLogger("trainer")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        summary = train(config)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return root / "out", summary, "\n".join(handler.lines)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.slow
def test_phase_two_adds_the_ramped_alignment_term(adapted_run: tuple[Path, dict, str]) -> None:
    output, summary, _ = adapted_run
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    terms = [r["penalties"]["alignment"] for r in records if r["phase"] == "finetune"]
    assert len(terms) == 2 and all(t["method"] == "mmd" and t["steps"] > 0 for t in terms)
    assert all(t["value"] >= 0 for t in terms)
    # DANN's ramp: the weight at the end of epoch 2 is above epoch 1's, below the maximum
    # (10, the default).
    assert 0 < terms[0]["weight"] < terms[1]["weight"] < 10.0
    alignment = summary["adaptation"]["feature_alignment"]
    assert alignment["method"] == "mmd" and alignment["max_weight"] == 10.0
    assert alignment["last_epoch"] == terms[-1]


@pytest.mark.slow
def test_adabn_is_tried_and_recorded_with_both_accuracies(
    adapted_run: tuple[Path, dict, str],
) -> None:
    output, summary, log_text = adapted_run
    adaptation = summary["adaptation"]
    assert adaptation["unlabeled_data"] == {
        "files_found": 8,
        "images_used": 7,
        "skipped_unreadable": 1,
    }
    adabn = adaptation["adabn"]
    assert adabn["images"] == 7
    as_trained, with_adabn = adabn["val_accuracy_as_trained"], adabn["val_accuracy_with_adabn"]
    assert 0 <= as_trained <= 1 and 0 <= with_adabn <= 1
    assert adabn["kept"] == (with_adabn >= as_trained)
    entropy = adaptation["prediction_entropy"]
    for key in ("before_phase_2", "as_trained", "with_adabn"):
        assert 0 <= entropy[key] <= torch.log(torch.tensor(2.0)).item() + 1e-6
    assert "event=unlabeled_entropy stage=before_phase_2" in log_text
    assert "event=adaptation adabn_kept=" in log_text

    best = ckpt.load_checkpoint(output / "checkpoints" / "best.pt")
    assert best.adaptation == adaptation
    assert best.header.config["unlabeled_data"].endswith("captures")
    assert best.header.config["alignment_weight"] == 10.0
    # The kept statistics are in best.pt, the others as trained: best.pt's BN buffers differ
    # from last.pt's (the same epoch's weights) exactly when AdaBN was kept.
    last = ckpt.load_checkpoint(output / "checkpoints" / "last.pt")
    if best.position == last.position:
        best_state, last_state = best.model_state, last.model_state
        same = torch.equal(best_state["bn1.running_mean"], last_state["bn1.running_mean"])
        assert same != adabn["kept"]
        assert torch.equal(best_state["conv1.weight"], last_state["conv1.weight"])


@pytest.mark.slow
def test_model_json_carries_the_adaptation_record(adapted_run: tuple[Path, dict, str]) -> None:
    output, summary, _ = adapted_run
    best = ckpt.load_checkpoint(output / "checkpoints" / "best.pt")
    document = build_metadata(
        best, input_format="uint8-nhwc", precision="fp32", parity={}, exporter="test"
    ).to_dict()
    assert document["adaptation"] == json.loads(json.dumps(summary["adaptation"]))
