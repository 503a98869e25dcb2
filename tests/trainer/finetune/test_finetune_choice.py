"""Phase 2's depth and LR from the data: the LR range test and the policy trials."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from trainer_helpers import make_capture_folder, make_image_folder, tiny_config

from trainer.config import resolve_config
from trainer.errors import ConfigError
from trainer.finetune.choice import (
    CANDIDATES,
    Candidate,
    Trial,
    _rung_count,
    _rung_units,
    affordable_rungs,
    late_winner,
    successive_halving,
)
from trainer.finetune.lr_finder import FALLBACK_LR, suggest_lr, sweep_lrs
from trainer.run import train

# ---- the LR range test's suggestion --------------------------------------------------------


def test_sweep_is_geometric_from_start_to_end() -> None:
    lrs = sweep_lrs(5, 1e-6, 1e-2)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-2)
    assert all(b / a == pytest.approx(10.0) for a, b in itertools.pairwise(lrs))
    with pytest.raises(ValueError, match="at least 2 steps"):
        sweep_lrs(1)


def test_suggestion_is_a_tenth_of_the_smoothed_minimum() -> None:
    lrs = sweep_lrs(41, 1e-6, 1e-1)
    # A loss bowl in log-LR with its floor at 1e-3, blowing up beyond.
    losses = [1.0 + 0.05 * (math.log10(lr) + 3.0) ** 2 for lr in lrs]
    finding = suggest_lr(lrs, losses)
    lowest = lrs[min(range(len(lrs)), key=lambda i: finding.smoothed[i])]
    assert finding.suggestion == pytest.approx(lowest / 10)
    # The smoothing lags the raw curve (its floor at 1e-3) by a few steps, never by a decade.
    assert 1e-3 <= lowest < 1e-2 and "a tenth" in finding.reason


def test_flat_then_climbing_curve_takes_a_tenth_of_the_blow_up() -> None:
    lrs = sweep_lrs(16)  # 1e-6 .. 1e-1, 1/3 decade a step
    # A converged head: noise around 0.9, then the loss climbs from 1e-3 on.
    losses = [0.92, 0.89, 0.9, 0.95, 0.93, 0.91, 0.9, 0.92, 0.95, 1.1, 1.5, 2.5, 5, 12, 23, 37]
    finding = suggest_lr(lrs, losses)
    climbed = next(
        i for i, v in enumerate(finding.smoothed) if v > 1.5 * min(finding.smoothed[: i + 1])
    )
    assert finding.suggestion == pytest.approx(lrs[climbed] / 10)
    assert 1e-4 <= finding.suggestion <= 1e-3 and "flat" in finding.reason


def test_a_dip_among_the_first_tiny_rates_is_noise_not_a_fall() -> None:
    lrs = sweep_lrs(16)
    # One heavy first batch, lighter ones next (rates 1e-6..1e-5 move nothing), then the climb.
    losses = [1.07, 0.9, 0.92, 0.93, 0.95, 0.94, 0.96, 0.95, 1.0, 1.1, 1.5, 2.5, 5, 12, 23, 37]
    finding = suggest_lr(lrs, losses)
    assert "flat" in finding.reason and 1e-4 <= finding.suggestion <= 1e-3


def test_flat_or_broken_curves_fall_back() -> None:
    lrs = sweep_lrs(20)
    flat = suggest_lr(lrs, [1.0] * 20)
    assert flat.suggestion == FALLBACK_LR and "neither fell" in flat.reason
    broken = suggest_lr(lrs, [math.nan] * 20)
    assert broken.suggestion == FALLBACK_LR and "no finite loss" in broken.reason
    with pytest.raises(ValueError, match="one loss per learning rate"):
        suggest_lr(lrs, [1.0])


def test_suggestion_is_clamped_to_a_trustworthy_range() -> None:
    lrs = sweep_lrs(20)
    falling = [10.0 - i * 0.4 for i in range(20)]  # lowest at the very end (1e-1)
    assert suggest_lr(lrs, falling).suggestion == pytest.approx(1e-3)


# ---- the search: successive halving on planted curves ---------------------------------------


def _planted(curves: dict[str, list[float]]):
    """A ``run`` whose candidates score ``curves[name][rung]`` (accuracy; loss = 1 - it)."""
    calls: list[tuple[str, int, int]] = []

    def run(candidate: Candidate, rung: int, steps: int) -> Trial:
        calls.append((candidate.name, rung, steps))
        accuracy = curves[candidate.name][rung]
        return Trial(candidate, 1e-3, rung, steps, accuracy, 1.0 - accuracy, 0.5, 0.1)

    return run, calls


def test_a_policy_that_starts_slowly_and_wins_later_is_found() -> None:
    # "all flat" is third after the first rung and best after the second: one short trial
    # each would have picked top:1.
    run, calls = _planted(
        {
            "top:1": [0.80, 0.81],
            "top:2": [0.78, 0.80],
            "all": [0.70, 0.75],
            "all flat": [0.79, 0.90],
        }
    )
    winner, trials = successive_halving(CANDIDATES, [8, 24], run)
    assert winner.name == "all flat" and winner.lr_decay == 1.0
    assert calls == [
        ("top:1", 0, 8),
        ("top:2", 0, 8),
        ("all", 0, 8),
        ("all flat", 0, 8),
        ("top:1", 1, 24),
        ("all flat", 1, 24),
    ]
    assert len(trials) == 6


def test_ties_go_to_the_cheaper_policy_and_loss_breaks_accuracy_ties() -> None:
    run, _ = _planted({c.name: [0.8, 0.8] for c in CANDIDATES})
    assert successive_halving(CANDIDATES, [8, 24], run)[0].name == "top:1"

    def by_loss(candidate: Candidate, rung: int, steps: int) -> Trial:
        loss = {"top:1": 0.5, "top:2": 0.4, "all": 0.3, "all flat": 0.6}[candidate.name]
        return Trial(candidate, 1e-3, rung, steps, 0.8, loss, 0.5, 0.1)

    assert successive_halving(CANDIDATES, [8, 24], by_loss)[0].name == "all"


def test_a_single_survivor_wins_without_another_rung() -> None:
    run, calls = _planted({"top:1": [0.9, 0.0, 0.0], "top:2": [0.5, 0.0, 0.0]})
    winner, trials = successive_halving(CANDIDATES[:2], [8, 24, 72], run)
    assert winner.name == "top:1" and [c[1] for c in calls] == [0, 0] and len(trials) == 2


def test_when_no_trial_beats_the_probe_phase_2_goes_to_the_flat_policy() -> None:
    run, _ = _planted(
        {"top:1": [0.80, 0.84], "top:2": [0.78, 0.80], "all": [0.7], "all flat": [0.2]}
    )
    _, trials = successive_halving(CANDIDATES, [8, 24], run)
    flat = late_winner(CANDIDATES, trials, probe_accuracy=0.855)
    assert flat is not None and flat.name == "all flat" and flat.lr_rule == "head lr"
    # One trial past the probe: the search's own winner stands.
    assert late_winner(CANDIDATES, trials, probe_accuracy=0.83) is None
    # A tie with the probe is no gain (the probe's accuracy is recorded to four places).
    assert late_winner(CANDIDATES, trials, probe_accuracy=0.84) is not None
    # Without a probe to compare with, or without the flat policy among the candidates: none.
    assert late_winner(CANDIDATES, trials, probe_accuracy=None) is None
    assert late_winner(CANDIDATES[:3], trials, probe_accuracy=0.855) is None


def test_rungs_past_phase_2s_own_steps_are_dropped() -> None:
    # Four candidates, rungs of 8 and 24 steps: 32 + 48 trial steps.
    assert affordable_rungs([8, 24], 4, budget=80) == [8, 24]
    assert affordable_rungs([8, 24], 4, budget=79) == [8]
    assert affordable_rungs([8, 24], 4, budget=0) == [8]  # the first rung always runs
    assert affordable_rungs([8, 24, 72], 9, budget=9 * 8 + 3 * 24) == [8, 24]


def test_the_search_budget_counts_every_rung() -> None:
    # Four candidates: two rungs (4 -> 2 -> the winner), 4 x 1 + 2 x 3 first-rung lengths.
    assert (_rung_count(4), _rung_units(4)) == (2, 10)
    assert (_rung_count(1), _rung_units(1)) == (1, 1)
    assert (_rung_count(9), _rung_units(9)) == (2, 9 + 3 * 3)  # the best of three wins


# ---- the flags ---------------------------------------------------------------------------


def test_auto_is_a_value_and_nonsense_names_the_choices(tmp_path: Path) -> None:
    base = {"data": tmp_path, "output": tmp_path / "out"}
    config = resolve_config(environ={}, flags=base | {"lr": "auto", "unfreeze": "auto"})
    assert config.lr is None and config.unfreeze == ""
    with pytest.raises(ConfigError, match=r"--lr: expected a positive number or auto, got 'fast'"):
        resolve_config(environ={}, flags=base | {"lr": "fast"})
    with pytest.raises(ConfigError, match="unfreeze: must be top:K, all, gradual:N or auto"):
        resolve_config(environ={}, flags=base | {"unfreeze": "deep"})


# ---- a real run: choice from the fitted head, recorded, and undone ---------------------------


@pytest.fixture(scope="module")
def source_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("choice")
    source_data = make_image_folder(root / "source", train_per_class=12, val_per_class=4)
    train(tiny_config(source_data, root / "source-run", finetune_epochs=2, batch_size=8))
    target = make_image_folder(
        root / "target", classes=("a", "b", "c", "d"), train_per_class=10, val_per_class=6, seed=3
    )
    return root / "source-run" / "checkpoints" / "best.pt", target


def _fine_tune(source: Path, data: Path, output: Path, **flags) -> dict:
    settings = {
        "weights": str(source),
        "head_epochs": 1,
        "finetune_epochs": 2,
        "batch_size": 8,
        "calibrate": "off",
    } | flags
    return train(tiny_config(data, output, **settings))


def test_defaults_test_the_lr_and_the_policies_and_record_them(
    source_and_data: tuple[Path, Path], tmp_path: Path
) -> None:
    source, data = source_and_data
    summary = _fine_tune(source, data, tmp_path / "auto")
    choice = summary["finetune_choice"]
    assert choice["unfreeze_source"] == "search"
    first = [t for t in choice["trials"] if t["rung"] == 0]
    assert [t["name"] for t in first] == ["top:1", "top:2", "all", "all flat"]
    tested = choice["lr_range_test"]["suggestion"]
    assert all(t["steps"] >= 8 for t in choice["trials"])
    # The flat policy retrains everything at the head's rate; the others at the tested one.
    assert all(t["lr"] == (1e-3 if t["name"] == "all flat" else tested) for t in choice["trials"])
    # Phase 2 plans 10 steps here: a second rung (2 x 24 steps) would take the trials past
    # them, so the best of the first rung wins.
    assert {t["rung"] for t in choice["trials"]} == {0}
    best = max(first, key=lambda t: (t["val_accuracy"], -t["val_loss"]))  # ties: shallower
    # The search's winner, unless no trial beat the probe: then the late-winning flat policy.
    probe = summary["head_phase"]["val_accuracy"]
    if any(t["val_accuracy"] > probe for t in first):
        assert (choice["unfreeze"], choice["lr_decay"]) == (best["policy"], best["lr_decay"])
        assert choice["lr_source"] == "range test"
    else:  # on this data the best trial ties the probe (19 of 24 val images)
        assert (choice["unfreeze"], choice["lr_decay"], choice["lr"]) == ("all", 1.0, 1e-3)
        assert choice["lr_source"] == "head lr"
        assert choice["reason"].startswith("all flat: no trial beat the probe")
    curve = json.loads((tmp_path / "auto" / "report" / "lr_find.json").read_text())
    assert curve["suggestion"] == tested and len(curve["lrs"]) == len(curve["losses"]) >= 16
    assert (tmp_path / "auto" / "report" / "lr_find.png").stat().st_size > 1000
    recorded = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert recorded["unfreeze"] == choice["unfreeze"] and recorded["lr"] == choice["lr"]
    assert recorded["lr_decay"] == choice["lr_decay"]
    strategies = (tmp_path / "auto" / "report" / "strategies.md").read_text()
    assert all(t["name"] in strategies for t in choice["trials"]) and "probe" in strategies

    # The trials leave no trace: the same run with the chosen values given as flags (nothing
    # tested) trains to exactly the same result.
    given = _fine_tune(
        source,
        data,
        tmp_path / "given",
        unfreeze=choice["unfreeze"],
        lr=choice["lr"],
        lr_decay=choice["lr_decay"],
    )
    assert given["finetune_choice"]["unfreeze_source"] == "flag"
    assert given["finetune_choice"]["trials"] == []
    assert given["best_val_accuracy"] == summary["best_val_accuracy"]
    assert _final_val_loss(tmp_path / "given") == _final_val_loss(tmp_path / "auto")


def test_a_given_policy_only_tests_the_lr(source_and_data: tuple[Path, Path], tmp_path: Path):
    source, data = source_and_data
    choice = _fine_tune(source, data, tmp_path / "run", unfreeze="top:2")["finetune_choice"]
    assert choice["unfreeze"] == "top:2" and choice["unfreeze_source"] == "flag"
    assert choice["lr_source"] == "range test" and choice["trials"] == []


def _final_val_loss(output: Path) -> float:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["val_loss"]


def test_report_refuses_a_malformed_range_test_record(tmp_path: Path) -> None:
    from trainer.evaluation.report import _read_lr_find

    path = tmp_path / "lr_find.json"
    path.write_text(
        json.dumps(
            {"lrs": [1e-5, 1e-4], "losses": [1.0], "smoothed": [1.0, 0.9], "suggestion": 1e-5}
        )
    )
    with pytest.raises(ValueError, match=r"lr_find\.json: lrs, losses and smoothed differ"):
        _read_lr_find(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"lr_find\.json: not an LR range test record"):
        _read_lr_find(path)


def test_with_unlabeled_data_every_layer_trains_without_a_search(
    source_and_data: tuple[Path, Path], tmp_path: Path
) -> None:
    source, data = source_and_data
    captures = make_capture_folder(tmp_path / "captures", count=6, corrupt=0)
    summary = _fine_tune(source, data, tmp_path / "run", unlabeled_data=captures)
    choice = summary["finetune_choice"]
    assert (choice["unfreeze"], choice["unfreeze_source"]) == ("all", "--unlabeled-data")
    assert choice["trials"] == [] and choice["lr_source"] == "range test"
    assert "must reach every layer" in choice["reason"]
    # A policy the user gives still wins; without the alignment term the search runs.
    given = _fine_tune(source, data, tmp_path / "given", unlabeled_data=captures, unfreeze="top:1")
    assert given["finetune_choice"]["unfreeze"] == "top:1"
    unaligned = _fine_tune(
        source, data, tmp_path / "unaligned", unlabeled_data=captures, alignment_weight=0.0
    )
    assert unaligned["finetune_choice"]["unfreeze_source"] == "search"


# ---- a real retrain where the winning policy only wins late -----------------------------------


def _lab_and_field_digits(root: Path, per_class: int) -> tuple[Path, Path]:
    """scikit-learn's 8x8 digits at 32 px: ``lab`` white on black, ``grown`` the lab images
    and as many "field" ones (each digit drawn into a patch of a packaged photograph as
    ``|patch - 255 * digit|``: bright on dark patches, dark on bright ones)."""
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    digits, photos = load_digits(), load_sample_images().images
    rng = np.random.default_rng(0)
    val = per_class // 3
    for label in range(10):
        chosen = rng.permutation(np.flatnonzero(digits.target == label))
        parts = np.split(chosen, np.cumsum([per_class, val, per_class, val]))[:4]
        places = (("train", "lab"), ("val", "lab"), ("train", "field"), ("val", "field"))
        for (split, origin), indices in zip(places, parts, strict=True):
            for i in indices:
                digit = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8))
                ink = np.asarray(digit.resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255
                if origin == "lab":
                    pixels = np.repeat((ink * 255).astype(np.uint8)[..., None], 3, axis=2)
                else:
                    photo = photos[rng.integers(len(photos))]
                    y, x = (
                        rng.integers(0, photo.shape[0] - 32),
                        rng.integers(0, photo.shape[1] - 32),
                    )
                    patch = photo[y : y + 32, x : x + 32].astype(np.float32)
                    pixels = np.abs(patch - 255 * ink[..., None]).astype(np.uint8)
                folders = [root / "grown"] + ([root / "lab"] if origin == "lab" else [])
                for folder in folders:
                    target = folder / split / f"digit-{label}"
                    target.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(pixels).save(target / f"{origin}-{i}.png")
    return root / "lab", root / "grown"


@pytest.mark.slow
def test_a_policy_that_only_wins_late_is_what_phase_2_runs_and_it_wins(tmp_path: Path) -> None:
    # The loop's retrain in miniature (benchmarks/domain_shift.py's retrain row): a model of
    # the lab images retrained on lab + field images. The probe on its lab features scores
    # 0.80; every trial the search can afford scores below it (retraining every layer fast
    # wrecks the probe first: about 0.2 after 8 steps), so the search alone would keep the
    # probe. The late winner runs instead, and overtakes the probe after a few epochs.
    lab, grown = _lab_and_field_digits(tmp_path / "data", per_class=20)
    train(tiny_config(lab, tmp_path / "lab-run", finetune_epochs=8, batch_size=16, calibrate="off"))
    summary = train(
        tiny_config(
            grown,
            tmp_path / "retrain",
            weights=str(tmp_path / "lab-run" / "checkpoints" / "best.pt"),
            init="weights",
            head_epochs=1,
            finetune_epochs=8,
            batch_size=16,
            calibrate="off",
        )
    )
    choice, probe = summary["finetune_choice"], summary["head_phase"]["val_accuracy"]
    trials = {(t["name"], t["rung"]): t["val_accuracy"] for t in choice["trials"]}
    assert trials[("all flat", 0)] < probe - 0.3  # the trial saw it wreck the probe
    assert max(trials.values()) <= probe
    assert (choice["unfreeze"], choice["lr_decay"], choice["lr_source"]) == ("all", 1.0, "head lr")
    assert choice["reason"].startswith("all flat: no trial beat the probe")
    epochs = [
        json.loads(line)["val_accuracy"]
        for line in (tmp_path / "retrain" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["phase"] == "finetune"
    ]
    assert epochs[0] < probe  # it starts below the probe ...
    assert max(epochs) >= probe + 0.04  # ... and wins
    assert summary["best_val_accuracy"] == pytest.approx(max(epochs))
