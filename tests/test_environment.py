"""The installed environment: torch and torchvision must be a working pair."""

from __future__ import annotations


def test_torchvision_native_ops_load_with_the_installed_torch() -> None:
    # A torchvision built against another torch imports, but its compiled ops do not load.
    import torch
    import torchvision
    import torchvision.ops

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), iou_threshold=0.5)
    assert keep.tolist() == [0]
    assert torchvision.__version__.startswith("0.29.2")
