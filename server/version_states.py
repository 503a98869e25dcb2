"""What the repository index says of each model version: ready, loading, or unavailable and why.

Plain data: the model manager fills it in, the transport turns it into Triton's
``RepositoryIndexResponse``; the state names are Triton's, which tritonclient users read.
"""

from __future__ import annotations

from dataclasses import dataclass

READY = "READY"
LOADING = "LOADING"
UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class VersionState:
    """One row of the index.

    Attributes:
        version: empty when no version can be named (the model's config.pbtxt is unreadable).
        state: ``READY``, ``LOADING`` or ``UNAVAILABLE``.
        reason: why it is unavailable; for a ready version, the change to it that was refused
            (it serves the files it loaded before).
    """

    model: str
    version: str
    state: str
    reason: str = ""

    @property
    def is_ready(self) -> bool:
        return self.state == READY
