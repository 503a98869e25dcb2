"""``POST /v2/models/{m}/classify``: images from an HTTP body and the query string to the
plain ClassifyRequest the gRPC Classify builds, and its answer as JSON with Classify's fields."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from server.errors import InvalidInput
from server.types import ClassifyRequest, ClassifyResponse

CLASSIFY_QUERY = ("top_k", "abstention_threshold", "id")


def classify_request_from_http(
    images: list[bytes],
    query: Mapping[str, str],
    model_name: str,
    model_version: str,
    is_load_test: bool = False,
) -> ClassifyRequest:
    """Images from the body and ``top_k``, ``abstention_threshold``, ``id`` from the query."""
    unknown = sorted(set(query) - set(CLASSIFY_QUERY))
    if unknown:
        raise InvalidInput(
            f"unknown query parameter {unknown[0]!r}; known: {', '.join(CLASSIFY_QUERY)}"
        )
    if not images:
        raise InvalidInput("images: at least one image is required")
    top_k = 1
    if "top_k" in query:
        text = query["top_k"].strip()
        if not text.isascii() or not text.isdigit():
            raise InvalidInput(f"top_k: {query['top_k']!r} is not a positive integer")
        top_k = int(text)
    threshold = None
    if "abstention_threshold" in query:
        try:
            threshold = float(query["abstention_threshold"])
        except ValueError:
            threshold = math.nan
        if not 0.0 <= threshold <= 1.0:
            raise InvalidInput(
                f"abstention_threshold {query['abstention_threshold']!r} is not in [0, 1]"
            )
    return ClassifyRequest(
        images=images,
        top_k=top_k,
        model_name=model_name,
        model_version=model_version,
        id=query.get("id", ""),
        abstention_threshold=threshold,
        is_load_test=is_load_test,
    )


def classify_response_to_json(response: ClassifyResponse) -> dict[str, Any]:
    """The fields of finetune.v1.ClassifyResponse, as JSON."""
    return {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "results": [
            {
                "predictions": [
                    {"label": p.label, "index": p.index, "score": p.score}
                    for p in result.predictions
                ],
                "abstained": result.abstained,
                "abstention_threshold": result.abstention_threshold,
            }
            for result in response.results
        ],
    }
