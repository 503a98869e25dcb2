"""``report/strategies.md``: every phase-2 strategy the run tried on its own data, and the winner.

One row for the probe (the head phase alone, the floor ``best.pt`` never falls below) and one
per trial of the phase-2 search (``trainer.finetune.choice``): policy, learning rate and
decay, the rung and steps it got, val accuracy and loss, the train loss beside the val loss
(the gap shows over-fitting), seconds. Then which strategy won and why, what phase 2 then
made of it, what the mixes of phase 2's start and end scored (WiSE-FT,
``trainer.stages.interpolation``), and what the choice cost. It is written from the summary,
so it says exactly what ``summary.json`` says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contracts.atomic_files import atomic_write_bytes

HEADER = (
    "| strategy | LR (top group) | decay | rung | steps | val accuracy | val loss | "
    "train loss | seconds |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
)


def write_strategies(path: Path, summary: dict[str, Any]) -> None:
    """Write the strategies table of a finished run's ``summary``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, render_strategies(summary).encode())


def render_strategies(summary: dict[str, Any]) -> str:
    """The Markdown of ``report/strategies.md``."""
    choice = summary.get("finetune_choice") or {}
    probe = summary.get("head_phase_val_accuracy")
    best = summary.get("best_val_accuracy")
    lines = ["# Phase-2 strategies tried on this run's data\n"]
    init = summary.get("init_choice") or {}
    # Under --init random no head phase is recorded; the source's probe still decided.
    source_probe = probe if probe is not None else init.get("weights_probe_val_accuracy")
    rows = [_row("probe (head phase alone)", *(None,) * 4, source_probe, *(None,) * 3)]
    if init:
        rows.append(
            _row(
                "probe on a random initialisation",
                *(None,) * 4,
                init.get("random_init_probe_val_accuracy"),
                *(None,) * 3,
            )
        )
    rows += [
        _row(
            t["name"],
            t["lr"],
            t["lr_decay"],
            t["rung"] + 1,
            t["steps"],
            t["val_accuracy"],
            t["val_loss"],
            t["train_loss"],
            t["seconds"],
        )
        for t in choice.get("trials", [])
    ]
    lines.append(HEADER + "".join(rows))
    if init:
        lines.append(f"**Start:** `--init {init['init']}`: {init['reason']}.\n")
    lines.append(_chosen(choice))
    lines.append(_outcome(summary, probe, best))
    lines.append(_interpolation(summary.get("weight_interpolation")))
    return "\n".join(lines)


def _row(*cells: Any) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 1e-2 else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def _chosen(choice: dict[str, Any]) -> str:
    if not choice:
        return "No phase 2 was planned: nothing was chosen.\n"
    policy = choice["unfreeze"]
    decay = choice.get("lr_decay")
    text = (
        f"**Chosen:** `--unfreeze {policy}` ({choice['unfreeze_source']}), "
        f"`--lr {choice['lr']:.2e}` ({choice['lr_source']}), `--lr-decay {decay}`.\n"
    )
    if choice.get("reason"):
        text += f"Why: {choice['reason']}.\n"
    if choice.get("trials"):
        share = (
            choice["steps_spent"] / choice["planned_phase2_steps"]
            if choice.get("planned_phase2_steps")
            else 0.0
        )
        text += (
            f"The choice cost {choice['seconds']} s and {choice['steps_spent']} training steps "
            f"({share:.2f} of phase 2's planned {choice['planned_phase2_steps']}).\n"
        )
    return text


def _interpolation(record: dict[str, Any] | None) -> str:
    if not record:
        return ""
    rows = "".join(
        _row(row["mix"], row["val_accuracy"], row["val_loss"]) for row in record["mixes"]
    )
    return (
        "**Weight interpolation (WiSE-FT)** between phase 2's start (mix 0) and its last epoch "
        f"(mix 1); the best epoch scored {_cell(record['best_val_accuracy_before'])}:\n\n"
        "| mix | val accuracy | val loss |\n|---:|---:|---:|\n"
        f"{rows}\n{record['reason']}.\n"
    )


def _outcome(summary: dict[str, Any], probe: float | None, best: float | None) -> str:
    if best is None or probe is None:
        return ""
    gain = best - probe
    interpolation = summary.get("weight_interpolation") or {}
    if gain > 0 and interpolation.get("kept_mix") is not None:
        return (
            f"**Phase 2 as run:** best val accuracy {best:.3f}, {gain:+.3f} over the probe; "
            f"`best.pt` holds the mix {interpolation['kept_mix']} of phase 2's start and end.\n"
        )
    if gain > 0:
        return (
            f"**Phase 2 as run:** best val accuracy {best:.3f}, {gain:+.3f} over the probe; "
            "`best.pt` holds the phase-2 epoch that reached it.\n"
        )
    return (
        f"**Phase 2 as run:** no epoch beat the probe's val accuracy ({probe:.3f}); "
        "`best.pt` holds the probe.\n"
    )
