"""The module that is exported: preprocessing and softmax around the classifier.

Putting the uint8 -> float conversion, the normalisation and the NHWC -> NCHW transpose
inside the graph means a client sends 4x fewer bytes and cannot get mean/std wrong; the
softmax output saves every client from computing it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from contracts.graph_signature import INPUT_FORMATS, UINT8_NHWC


class ServingModel(nn.Module):
    """Wraps a classifier so its graph takes serving input and returns logits and probabilities.

    ``probabilities`` are ``softmax(logits / temperature)`` (temperature 1: plain softmax).

    With ``uint8-nhwc`` the input is ``[N, H, W, 3]`` uint8 RGB, converted exactly as
    torchvision's ``ToTensor`` + ``Normalize`` do (divide by 255, subtract mean, divide by std).
    With ``float32-nchw`` the input is already normalised ``[N, 3, H, W]``.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        classifier: nn.Module,
        *,
        input_format: str,
        mean: Sequence[float],
        std: Sequence[float],
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        self.classifier = classifier
        self.input_format = input_format
        # Calibrated probabilities: softmax(logits / T), T fitted on val after training.
        self.temperature = float(temperature)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_format == UINT8_NHWC:
            x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
            x = (x - self.mean) / self.std
        else:
            x = image
        logits = self.classifier(x)
        if self.temperature != 1.0:
            return logits, torch.softmax(logits / self.temperature, dim=1)
        return logits, torch.softmax(logits, dim=1)


def normalize_uint8_nhwc(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
    """Reference preprocessing outside any graph: uint8 NHWC -> normalised float NCHW.

    Verification feeds this to the bare classifier, so the in-graph preprocessing is checked
    against the textbook pipeline rather than against itself.
    """
    x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s
