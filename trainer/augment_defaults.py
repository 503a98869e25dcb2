"""The augmentation a config resolves to before any image is seen.

``--augment fixed`` is the conventional recipe (horizontal flip, a random-resized crop keeping
25% of the area); ``--augment auto`` starts from the crop-scale rule here and lets
``trainer.data.augment_policy`` test the label-changing transforms on the data. The settings
resolver (``trainer.config``) needs these facts, and sits below the data room, so they live
in their own leaf.
"""

from __future__ import annotations

FIXED = "fixed"
# Candidate transforms, their config fields and their values under ``--augment fixed``.
CANDIDATES: dict[str, bool] = {"hflip": True, "vflip": False, "rotate90": False}
SMALL_IMAGE_PX, LARGE_IMAGE_PX = 64, 160
SMALL_IMAGE_SCALE, LARGE_IMAGE_SCALE = 0.6, 0.25
FIXED_CROP_SCALE = 0.25


def crop_scale_for(input_size: int) -> float:
    """The smallest area share a random-resized crop keeps for ``input_size`` px inputs."""
    if input_size <= SMALL_IMAGE_PX:
        return SMALL_IMAGE_SCALE
    if input_size >= LARGE_IMAGE_PX:
        return LARGE_IMAGE_SCALE
    share = (input_size - SMALL_IMAGE_PX) / (LARGE_IMAGE_PX - SMALL_IMAGE_PX)
    return round(SMALL_IMAGE_SCALE + share * (LARGE_IMAGE_SCALE - SMALL_IMAGE_SCALE), 3)
