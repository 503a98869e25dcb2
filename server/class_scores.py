"""From a classifier graph's outputs to class probabilities, and the k best classes.

Classify, the Open Inference Protocol's classification extension and the golden-set check at
load all go through these two functions, so they normalise and rank alike.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from contracts.graph_signature import PROBABILITIES_NAME


def class_probabilities(outputs: Mapping[str, np.ndarray], first_output: str) -> np.ndarray:
    """The graph's ``probabilities`` output, else the softmax of its first output (the logits
    of a graph exported without one), over the class axis (the last), as float64."""
    if PROBABILITIES_NAME in outputs:
        return np.asarray(outputs[PROBABILITIES_NAME], dtype=np.float64)
    logits = np.asarray(outputs[first_output], dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def top_k_indices(row: np.ndarray, k: int) -> np.ndarray:
    """The indices of the ``k`` largest values of ``row`` (all of them when fewer), largest
    first; equal values keep their class order."""
    return np.argsort(-np.asarray(row), kind="stable")[:k]
