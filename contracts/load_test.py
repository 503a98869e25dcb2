"""The mark a load test puts on its requests, so the server keeps them out of what describes
production traffic.

``client bench`` sends every request with the gRPC metadata entry ``x-load-test: 1``. The server
answers such a request like any other (latency, queue and request counters include it: it is
real load) but leaves it out of the prediction monitors (predictions by class, top
probability, abstentions, class drift) and the capture for review, and counts its answers in
``classification_load_test_predictions_total`` instead. Any other client may send the same
entry.
"""

from __future__ import annotations

from collections.abc import Iterable

# gRPC metadata keys are lower case; "x-" keeps it clear of gRPC's and HTTP/2's own.
LOAD_TEST_KEY = "x-load-test"
LOAD_TEST_METADATA = (LOAD_TEST_KEY, "1")
_OFF = frozenset({"", "0", "false", "no"})


def is_load_test(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether gRPC metadata carries the mark (any value but empty, 0, false or no)."""
    for key, value in metadata or ():
        if key.lower() == LOAD_TEST_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            return text.strip().lower() not in _OFF
    return False
