"""The preprocessing description a model carries from training to serving.

The trainer records it in the checkpoint and the export metadata (``model.json``); the server
builds its own torch-free eval transform from it. Only the description is shared: the
torchvision and Pillow implementations of "resize the shorter side, centre-crop, normalise"
stay in their halves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Larger inputs are a typo or a hostile file, and every buffer downstream scales with them.
MAX_SIDE = 4096


class InvalidPreprocessing(ValueError):  # noqa: N818 (names of the domain)
    """A preprocessing description that no model could have been trained with."""


@dataclass(frozen=True)
class Preprocessing:
    """Eval transform: resize the shorter side to ``resize_size`` (bilinear, antialiased),
    centre-crop to ``input_size`` (height, width), scale to 0-1, normalise by ``mean``/``std``.
    """

    input_size: tuple[int, int]
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        height, width = self.input_size
        for name, value in (("height", height), ("width", width), ("resize", self.resize_size)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIDE:
                raise InvalidPreprocessing(
                    f"preprocessing {name} {value!r} must be an integer from 1 to {MAX_SIDE}"
                )
        if self.resize_size < min(height, width):
            raise InvalidPreprocessing(
                f"preprocessing resize_size {self.resize_size} is smaller than the crop "
                f"{height}x{width}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InvalidPreprocessing("preprocessing mean and std need 3 values, std > 0")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in checkpoints and ``model.json``."""
        return {
            "input_size": list(self.input_size),
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> Preprocessing:
        """Read the form ``to_dict`` writes (extra keys of a larger document are ignored).

        Raises:
            InvalidPreprocessing: naming the key that is missing or malformed.
        """
        try:
            size = document["input_size"]
            if not isinstance(size, (list, tuple)) or len(size) != 2:
                raise InvalidPreprocessing("input_size must be [height, width]")
            input_size = (_integer(size[0], "input_size"), _integer(size[1], "input_size"))
            resize = _integer(document.get("resize_size", max(input_size)), "resize_size")
            return cls(
                input_size=input_size,
                resize_size=resize,
                mean=_triple(document.get("mean", IMAGENET_MEAN), "mean"),
                std=_triple(document.get("std", IMAGENET_STD), "std"),
            )
        except KeyError as missing:
            raise InvalidPreprocessing(f"preprocessing has no {missing}") from None


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise InvalidPreprocessing(f"{key} must hold integers, got {value!r}")
    return int(value)


def _triple(value: Any, key: str) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise InvalidPreprocessing(f"{key} must be a list of 3 numbers")
    try:
        first, second, third = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidPreprocessing(f"{key} must be a list of 3 numbers") from None
    return first, second, third
