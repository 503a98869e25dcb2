"""``report/strategies.md`` says what the summary says: every candidate, the winner, the outcome."""

from __future__ import annotations

from pathlib import Path

from trainer.evaluation.strategies import render_strategies, write_strategies


def _trial(name: str, policy: str, decay: float, rung: int, accuracy: float) -> dict:
    return {
        "name": name,
        "policy": policy,
        "lr_decay": decay,
        "lr": 3e-4,
        "rung": rung,
        "steps": 8 * 3**rung,
        "val_accuracy": accuracy,
        "val_loss": 1 - accuracy,
        "train_loss": 0.4,
        "seconds": 1.5,
    }


SEARCHED = {
    "head_phase_val_accuracy": 0.85,
    "best_val_accuracy": 0.91,
    "finetune_choice": {
        "unfreeze": "all",
        "unfreeze_source": "search",
        "lr": 3e-4,
        "lr_source": "range test",
        "lr_decay": 1.0,
        "reason": "all flat: best val accuracy/loss after rung 2",
        "trials": [
            _trial("top:1", "top:1", 0.3, 0, 0.86),
            _trial("all flat", "all", 1.0, 0, 0.84),
            _trial("top:1", "top:1", 0.3, 1, 0.87),
            _trial("all flat", "all", 1.0, 1, 0.90),
        ],
        "seconds": 12.0,
        "steps_spent": 48,
        "planned_phase2_steps": 96,
    },
}


def test_every_trial_is_a_row_and_the_winner_and_gain_are_said(tmp_path: Path) -> None:
    path = tmp_path / "report" / "strategies.md"
    write_strategies(path, SEARCHED)
    text = path.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 1 + 4  # header, the probe, four trials
    assert rows[1].startswith("| probe (head phase alone) |") and "0.85" in rows[1]
    assert "| all flat | 3.00e-04 | 1 | 2 | 24 | 0.9 | 0.1 | 0.4 | 1.5 |" in text
    assert "`--unfreeze all` (search)" in text and "`--lr-decay 1.0`" in text
    assert "0.50 of phase 2's planned 96" in text
    assert "+0.060 over the probe" in text


def test_a_given_policy_and_a_phase_2_that_never_beat_the_probe_are_said() -> None:
    given = {
        "head_phase_val_accuracy": 0.85,
        "best_val_accuracy": 0.85,
        "finetune_choice": {
            "unfreeze": "top:2",
            "unfreeze_source": "flag",
            "lr": 1e-4,
            "lr_source": "flag",
            "lr_decay": 0.3,
            "reason": "given",
            "trials": [],
        },
    }
    text = render_strategies(given)
    assert "`--unfreeze top:2` (flag)" in text and "cost" not in text
    assert "`best.pt` holds the probe" in text
    assert "nothing was chosen" in render_strategies({"best_val_accuracy": 0.5})


def test_the_mixes_are_rows_and_a_kept_mix_is_what_best_pt_holds() -> None:
    mixes = [
        {"mix": 0.25, "val_accuracy": 0.88, "val_loss": 0.31},
        {"mix": 0.5, "val_accuracy": 0.93, "val_loss": 0.22},
        {"mix": 0.75, "val_accuracy": 0.9, "val_loss": 0.25},
    ]
    kept = {
        **SEARCHED,
        "best_val_accuracy": 0.93,
        "weight_interpolation": {
            "mixes": mixes,
            "best_val_accuracy_before": 0.91,
            "kept_mix": 0.5,
            "reason": "mix 0.5 beats the best epoch on val (0.9300 > 0.9100)",
        },
    }
    text = render_strategies(kept)
    assert "| 0.5 | 0.93 | 0.22 |" in text and "| 0.25 | 0.88 | 0.31 |" in text
    assert "the best epoch scored 0.91" in text
    assert "`best.pt` holds the mix 0.5 of phase 2's start and end" in text
    assert "mix 0.5 beats the best epoch on val" in text
    not_kept = {
        **SEARCHED,
        "weight_interpolation": {
            **kept["weight_interpolation"],
            "kept_mix": None,
            "reason": "no mix beats the best epoch on val",
        },
    }
    text = render_strategies(not_kept)
    assert "holds the phase-2 epoch that reached it" in text
    assert "no mix beats the best epoch on val." in text
