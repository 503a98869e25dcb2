"""WiSE-FT's mixing of two state dicts."""

from __future__ import annotations

import pytest
import torch

from trainer.finetune.weight_interpolation import interpolate_states


def _states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    start = {"w": torch.zeros(2, 3), "bn.num_batches_tracked": torch.tensor(5)}
    end = {"w": torch.full((2, 3), 4.0), "bn.num_batches_tracked": torch.tensor(9)}
    return start, end


@pytest.mark.parametrize(("mix", "value"), [(0.0, 0.0), (0.25, 1.0), (0.5, 2.0), (1.0, 4.0)])
def test_floating_tensors_are_mixed_linearly(mix: float, value: float) -> None:
    start, end = _states()
    mixed = interpolate_states(start, end, mix)
    assert torch.equal(mixed["w"], torch.full((2, 3), value))


def test_counters_come_from_the_end_and_the_inputs_are_untouched() -> None:
    start, end = _states()
    mixed = interpolate_states(start, end, 0.5)
    assert int(mixed["bn.num_batches_tracked"]) == 9
    assert torch.equal(start["w"], torch.zeros(2, 3)) and torch.equal(
        end["w"], torch.full((2, 3), 4.0)
    )


def test_states_that_do_not_line_up_are_refused() -> None:
    start, end = _states()
    with pytest.raises(ValueError, match="different tensors"):
        interpolate_states({"w": start["w"]}, end, 0.5)
    with pytest.raises(ValueError, match=r"w: shape \(2, 3\) != \(3,\)"):
        interpolate_states(start, {**end, "w": torch.zeros(3)}, 0.5)
    with pytest.raises(ValueError, match="mix must be in"):
        interpolate_states(start, end, 1.5)
