"""WiSE-FT: weight-space ensembles of the head-phase model and the end of phase 2.

Wortsman et al. (2022) found that averaging the weights of a model before and after
fine-tuning, ``(1 - mix) * start + mix * end``, often beats both ends: the fine-tuned weights
bring what the new task taught, the starting ones the features phase 2 bent too far. Here
the start is the model the head phase fitted (the converged probe on the source backbone) and
the end is phase 2's last epoch; both share one architecture and one head shape, so every
tensor lines up. The mix is chosen on val by ``trainer.stages.interpolation``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# The mixes tried between the two ends (0 is the head-phase model, 1 phase 2's end, both
# scored already). A coarse grid: val sets here are small, and a finer one would mostly fit
# their noise.
MIXES = (0.25, 0.5, 0.75)


def interpolate_states(
    start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], mix: float
) -> dict[str, torch.Tensor]:
    """``(1 - mix) * start + mix * end`` for every floating-point tensor; counters (integer
    buffers such as BatchNorm's ``num_batches_tracked``) are taken from ``end``.

    Raises:
        ValueError: ``mix`` outside [0, 1], or the two states differ in keys or shapes.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    if start.keys() != end.keys():
        differ = sorted(set(start) ^ set(end))[:5]
        raise ValueError(f"the two states hold different tensors, e.g. {differ}")
    mixed: dict[str, torch.Tensor] = {}
    for name, last in end.items():
        first = start[name]
        if first.shape != last.shape:
            raise ValueError(f"{name}: shape {tuple(first.shape)} != {tuple(last.shape)}")
        if last.is_floating_point():
            mixed[name] = torch.lerp(first.to(last.dtype), last, mix)
        else:
            mixed[name] = last.clone()
    return mixed
