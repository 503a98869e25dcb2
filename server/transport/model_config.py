"""Triton's ``ModelConfig`` (text format in ``config.pbtxt``, message in ``ModelConfig``) <->
the plain ``ModelSpec``.

The only place the model configuration's protobuf is touched: the repository reader calls
``parse_model_config`` and the transport calls ``model_config_to_proto``.
"""

from __future__ import annotations

from google.protobuf import text_format

from contracts.oip_datatypes import CONFIG_TYPES, DATATYPE_TO_CONFIG_TYPE
from protocol.inference import model_config_pb2 as mc
from server.model_spec import (
    DynamicBatchingConfig,
    ModelSpec,
    TensorConfig,
    VersionPolicy,
)


class ModelConfigError(ValueError):
    """config.pbtxt is not a valid Triton model configuration for this server."""


def _datatype(value: mc.DataType.ValueType, where: str) -> str:
    name = mc.DataType.Name(value)
    if name == "TYPE_INVALID":  # not stated; the ONNX graph decides
        return ""
    if name not in CONFIG_TYPES:
        raise ModelConfigError(f"{where}: data_type {name} is not supported")
    return CONFIG_TYPES[name]


def _config_type(datatype: str) -> mc.DataType.ValueType:
    return mc.DataType.Value(DATATYPE_TO_CONFIG_TYPE.get(datatype, "TYPE_INVALID"))


def _version_policy(config: mc.ModelConfig) -> VersionPolicy:
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy(kind="all")
    if choice == "specific":
        return VersionPolicy(kind="specific", versions=tuple(policy.specific.versions))
    count = policy.latest.num_versions if choice == "latest" else 1
    return VersionPolicy(kind="latest", num_versions=max(count, 1))


def _dynamic_batching(config: mc.ModelConfig) -> DynamicBatchingConfig | None:
    if not config.HasField("dynamic_batching"):
        return None
    batching = config.dynamic_batching
    return DynamicBatchingConfig(
        max_queue_delay_us=int(batching.max_queue_delay_microseconds),
        preferred_batch_sizes=tuple(batching.preferred_batch_size),
        preserve_ordering=batching.preserve_ordering,
        max_queue_size=int(batching.default_queue_policy.max_queue_size),
    )


def spec_from_proto(config: mc.ModelConfig) -> ModelSpec:
    """The plain spec of a parsed configuration.

    Raises:
        ModelConfigError: a datatype outside the OIP vocabulary.
    """
    inputs = tuple(
        TensorConfig(
            name=i.name,
            datatype=_datatype(i.data_type, f"input {i.name!r}"),
            dims=tuple(i.dims),
            format=mc.ModelInput.Format.Name(i.format),
        )
        for i in config.input
    )
    outputs = tuple(
        TensorConfig(
            name=o.name,
            datatype=_datatype(o.data_type, f"output {o.name!r}"),
            dims=tuple(o.dims),
            label_filename=o.label_filename,
        )
        for o in config.output
    )
    return ModelSpec(
        name=config.name,
        platform=config.platform,
        backend=config.backend,
        max_batch_size=int(config.max_batch_size),
        inputs=inputs,
        outputs=outputs,
        dynamic_batching=_dynamic_batching(config),
        version_policy=_version_policy(config),
    )


def parse_model_config(text: str) -> ModelSpec:
    """Read ``config.pbtxt`` text (the name may be empty; the caller defaults it).

    Raises:
        ModelConfigError: unparsable text or an unsupported datatype.
    """
    try:
        config = text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as error:
        raise ModelConfigError(str(error)) from None
    return spec_from_proto(config)


def _policy_to_proto(policy: VersionPolicy, target: mc.ModelVersionPolicy) -> None:
    if policy.kind == "all":
        target.all.SetInParent()
    elif policy.kind == "specific":
        target.specific.versions.extend(policy.versions)
    else:
        target.latest.num_versions = policy.num_versions


def model_config_to_proto(spec: ModelSpec) -> mc.ModelConfig:
    """The ``ModelConfig`` message Triton's clients (and perf_analyzer) read."""
    config = mc.ModelConfig(
        name=spec.name,
        platform=spec.platform,
        backend=spec.backend,
        max_batch_size=spec.max_batch_size,
    )
    _policy_to_proto(spec.version_policy, config.version_policy)
    for tensor in spec.inputs:
        config.input.add(
            name=tensor.name,
            data_type=_config_type(tensor.datatype),
            format=mc.ModelInput.Format.Value(tensor.format),
            dims=tensor.dims,
        )
    for tensor in spec.outputs:
        config.output.add(
            name=tensor.name,
            data_type=_config_type(tensor.datatype),
            dims=tensor.dims,
            label_filename=tensor.label_filename,
        )
    batching = spec.dynamic_batching
    if batching is not None:
        target = config.dynamic_batching
        target.SetInParent()
        target.max_queue_delay_microseconds = batching.max_queue_delay_us
        target.preferred_batch_size.extend(batching.preferred_batch_sizes)
        target.preserve_ordering = batching.preserve_ordering
        if batching.max_queue_size:
            target.default_queue_policy.max_queue_size = batching.max_queue_size
    return config
