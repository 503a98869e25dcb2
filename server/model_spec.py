"""A model's configuration as plain data: what ``config.pbtxt`` says, without protobuf.

``server.transport.model_config`` reads Triton's text format into a ``ModelSpec`` and writes a
``ModelSpec`` back as the ``ModelConfig`` message; everything else (the repository reader, the
model manager, the handlers, the batcher) sees only these frozen dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorConfig:
    """One ``input`` or ``output`` entry.

    Attributes:
        datatype: the OIP datatype (``FP32``, ``BYTES``, ...), not Triton's ``TYPE_*`` name;
            empty when config.pbtxt leaves it to the ONNX graph.
        dims: the shape without the batch dimension when ``max_batch_size > 0``; -1 = variable.
        format: an input's ``FORMAT_*`` name (``FORMAT_NONE`` when unset).
        label_filename: an output's label file, relative to the model directory.
    """

    name: str
    datatype: str
    dims: tuple[int, ...]
    format: str = "FORMAT_NONE"
    label_filename: str = ""


@dataclass(frozen=True)
class DynamicBatchingConfig:
    """The ``dynamic_batching`` block (only the fields this server acts on or reports)."""

    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    preserve_ordering: bool = False
    # From default_queue_policy; 0 = unbounded (the server's own limit applies).
    max_queue_size: int = 0


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk to serve: ``latest`` N, ``all``, or ``specific`` ones."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """The versions this policy serves, ascending, out of those on disk."""
        available = sorted(available)
        if self.kind == "all":
            return available
        if self.kind == "specific":
            wanted = set(self.versions)
            return [v for v in available if v in wanted]
        return available[-max(self.num_versions, 1) :]


@dataclass(frozen=True)
class ModelSpec:
    """A model's configuration (``config.pbtxt``), resolved and validated."""

    name: str
    platform: str = ""
    backend: str = ""
    # 0: the model has no batch dimension.
    max_batch_size: int = 0
    inputs: tuple[TensorConfig, ...] = ()
    outputs: tuple[TensorConfig, ...] = ()
    # None: no dynamic_batching block, so requests run one at a time.
    dynamic_batching: DynamicBatchingConfig | None = None
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)

    @property
    def label_filenames(self) -> tuple[str, ...]:
        """The outputs' label files, in output order."""
        return tuple(o.label_filename for o in self.outputs if o.label_filename)
