"""The domain-adaptation blocks: gradient reversal, MMD, DANN's ramp, AdaBN, entropy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.finetune.domain_adaptation import (
    GradientReversal,
    GradientReversalFunction,
    adapt_batchnorm,
    dann_ramp,
    mmd,
    prediction_entropy,
)

# ---- gradient reversal ----------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.3, 2.5])
def test_gradient_reversal_is_identity_forward_and_negated_scaled_backward(scale: float) -> None:
    features = torch.randn(4, 6, requires_grad=True)
    upstream = torch.randn(4, 6)
    out = GradientReversal(scale)(features)
    assert torch.equal(out, features)
    out.backward(upstream)
    assert features.grad is not None
    assert torch.allclose(features.grad, -scale * upstream)


def test_gradient_reversal_function_reverses_only_what_passes_through_it() -> None:
    # x feeds the loss twice: once directly, once reversed; the two gradients cancel at 1.
    x = torch.tensor([2.0], requires_grad=True)
    reversed_x = GradientReversalFunction.apply(x, 1.0)
    (x * 3 + reversed_x * 3).sum().backward()  # type: ignore[operator]
    assert x.grad is not None and x.grad.item() == 0.0


# ---- MMD ---------------------------------------------------------------------------------


def test_mmd_is_zero_for_identical_batches() -> None:
    batch = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    assert mmd(batch, batch.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_mmd_is_positive_and_grows_with_a_mean_shift() -> None:
    generator = torch.Generator().manual_seed(1)
    source = torch.randn(32, 8, generator=generator)
    target = torch.randn(32, 8, generator=generator)
    values = [mmd(source, target + shift).item() for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values[0] >= 0.0
    assert all(value > 0.0 for value in values[1:])
    assert values == sorted(values) and values[-1] > 5 * values[1]


def test_mmd_is_differentiable_and_pulls_the_batches_together() -> None:
    source = torch.randn(8, 4)
    target = (torch.randn(8, 4) + 2.0).requires_grad_(True)
    mmd(source, target).backward()
    assert target.grad is not None and torch.isfinite(target.grad).all()
    # A small step against the gradient moves the target toward the source: MMD falls.
    with torch.no_grad():
        moved = target - 0.5 * target.grad / target.grad.norm()
    assert mmd(source, moved).item() < mmd(source, target.detach()).item()


def test_mmd_refuses_batches_of_different_widths() -> None:
    with pytest.raises(ValueError, match="one width"):
        mmd(torch.zeros(2, 3), torch.zeros(2, 4))


def test_dann_ramp_goes_from_zero_to_one() -> None:
    assert dann_ramp(0.0) == 0.0
    assert dann_ramp(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert dann_ramp(1.0) == pytest.approx(0.99991, abs=1e-5)
    assert dann_ramp(2.0) == dann_ramp(1.0) and dann_ramp(-1.0) == 0.0


# ---- AdaBN -------------------------------------------------------------------------------


class _Net(nn.Module):
    """Convolutions with BatchNorm, dropout between them and a buffer that is not BN's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.bn2 = nn.BatchNorm2d(4, momentum=0.3)
        self.fc = nn.Linear(4, 2)
        self.register_buffer("scale", torch.tensor([1.5, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(torch.relu(self.bn(self.conv(x))))
        x = torch.relu(self.bn2(self.conv2(x))).mean(dim=(2, 3))
        return self.fc(x) * self.scale


def _batchnorm_buffer(name: str) -> bool:
    return name.startswith(("bn.", "bn2.")) and name.rsplit(".", 1)[1] in (
        "running_mean",
        "running_var",
        "num_batches_tracked",
    )


def test_adabn_changes_only_batchnorm_buffers() -> None:
    torch.manual_seed(0)
    model = _Net()
    model.train()
    model(torch.randn(8, 3, 12, 12))  # source statistics
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = [p.grad for p in model.parameters()]
    target = [torch.randn(4, 3, 12, 12) * 3 + 2 for _ in range(3)]

    assert adapt_batchnorm(model, target) == 12

    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(_batchnorm_buffer(k) for k in changed)
    for name, value in before.items():
        if not _batchnorm_buffer(name):
            assert torch.equal(value, after[name]), name  # bit-identical
    assert [p.grad for p in model.parameters()] == grads_before  # no gradient computed
    assert int(after["bn.num_batches_tracked"]) == 3
    # The modes and momenta are put back.
    assert not model.training and not model.bn.training and not model.drop.training
    assert model.bn.momentum == 0.1 and model.bn2.momentum == 0.3


def test_adabn_statistics_are_the_cumulative_average_of_the_target_batches() -> None:
    bn = nn.BatchNorm2d(2)
    batches = [torch.randn(5, 2, 4, 4) + i for i in range(3)]
    adapt_batchnorm(nn.Sequential(bn), batches)
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches])
    assert torch.allclose(bn.running_mean, means.mean(0), atol=1e-6)


def test_adabn_without_batchnorm_or_batches_changes_nothing() -> None:
    linear = nn.Sequential(nn.Linear(3, 2))
    assert adapt_batchnorm(linear, [torch.randn(2, 3)]) == 0
    model = _Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert adapt_batchnorm(model, []) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_adabn_takes_a_prepare_step() -> None:
    bn = nn.BatchNorm2d(3)
    raw = [torch.full((2, 3, 4, 4), 10, dtype=torch.uint8)]
    adapt_batchnorm(nn.Sequential(bn), raw, prepare=lambda b: b.float() / 10)
    assert torch.allclose(bn.running_mean, torch.ones(3))


def test_prediction_entropy_spans_certain_to_uniform() -> None:
    logits = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    entropy = prediction_entropy(logits)
    assert entropy[0].item() == pytest.approx(0.0, abs=1e-6)
    assert entropy[1].item() == pytest.approx(math.log(3))
