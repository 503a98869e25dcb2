"""``client verify``: a version's golden set through a live server, judged as the server judges
it at load (``contracts.golden_set.compare``).

The golden set is read from the model repository the server serves (a path this machine can
read); each image is sent as a Classify request for every class, so the comparison sees the
whole probability row the server computed from the encoded bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.api import InferenceClient, RequestError
from contracts.golden_set import (
    GoldenSet,
    GoldenVerdict,
    InvalidGoldenSet,
    compare,
    read_golden_set,
)
from contracts.repository_layout import is_version_name


class VerifySetupError(Exception):
    """The check cannot run: no such version directory, or no readable golden set."""


@dataclass(frozen=True)
class VerifyReport(GoldenVerdict):
    """The server's verdict on one version's golden set: ``problems`` empty when it passed."""

    model: str
    version: str

    def format_text(self) -> str:
        where = f"model {self.model} version {self.version}"
        if self.passed:
            return (
                f"PASS {where}: {self.images} golden images reproduced "
                f"(tolerance {self.tolerance:g})"
            )
        lines = [f"FAIL {where}: {len(self.problems)} of {self.images} golden images differ"]
        return "\n".join([*lines, *(f"  {problem}" for problem in self.problems)])


def served_version(client: InferenceClient, model: str) -> str:
    """The newest version the server has loaded for ``model``."""
    versions = [v for v in client.model_metadata(model).versions if is_version_name(v)]
    if not versions:
        raise VerifySetupError(f"the server lists no loaded version of {model!r}")
    return max(versions, key=int)


def load_golden(repository: Path, model: str, version: str) -> tuple[GoldenSet, list[bytes]]:
    """The golden set of ``REPO/model/version``.

    Raises:
        VerifySetupError: naming the directory when it has no readable golden set.
    """
    directory = Path(repository) / model / version
    try:
        found = read_golden_set(directory)
    except InvalidGoldenSet as error:
        raise VerifySetupError(f"{directory}: {error}") from None
    if found is None:
        raise VerifySetupError(f"{directory} has no golden set (exported without val data?)")
    return found


def verify(
    client: InferenceClient, repository: Path, model: str, version: str = ""
) -> VerifyReport:
    """Classify every golden image through the server and compare with the golden set."""
    version = version or served_version(client, model)
    golden, images = load_golden(repository, model, version)
    rows: list[list[float]] = []
    refused: list[str] = []
    for image, data in zip(golden.images, images, strict=True):
        try:
            (predictions,) = client.classify(
                [data], len(golden.labels), model_name=model, model_version=version
            )
        except RequestError as error:
            refused.append(f"{image.file}: refused by the server: {error}")
            continue
        row = [0.0] * len(golden.labels)
        for prediction in predictions:
            if 0 <= prediction.index < len(row):
                row[prediction.index] = prediction.score
        rows.append(row)
    problems = refused or compare(golden, rows)
    return VerifyReport(
        images=len(golden.images),
        tolerance=golden.tolerance,
        problems=tuple(problems),
        model=model,
        version=version,
    )
