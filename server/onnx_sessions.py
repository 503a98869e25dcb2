"""onnxruntime sessions for one model version.

Picks the execution providers once, builds ``instances`` sessions, describes the graph's inputs
and outputs in OIP datatypes, warms up, and runs a batch synchronously. It knows nothing about
batching, queues or gRPC; the batcher calls ``run`` from its worker threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contracts.oip_datatypes import ONNX_TYPES, numpy_dtype
from server.errors import ModelLoadError

log = logging.getLogger(__name__)

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: OIP datatype and shape (-1 where dynamic)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class SessionSettings:
    """What the sessions need from the server settings."""

    providers: str = "auto"
    instances: int = 1
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    allow_spinning: bool = True
    graph_optimization: str = "all"


def has_nvidia_gpu() -> bool:
    """Whether an NVIDIA driver and device are visible (no CUDA call, no library load)."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def _preload_cuda_libraries() -> None:
    # onnxruntime-gpu can load CUDA/cuDNN from the nvidia-* wheels when asked to; without the
    # wheels this is a no-op and onnxruntime falls back to the system libraries.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # best effort; session creation reports what is really missing
            log.debug("onnxruntime.preload_dlls failed", exc_info=True)


def requested_providers(choice: str) -> list[str]:
    """The provider list to ask onnxruntime for.

    'auto' asks for CUDA when this onnxruntime has it and an NVIDIA GPU is visible, else CPU;
    onnxruntime itself still falls back to CPU if CUDA cannot start, and OnnxSessions reports
    the providers actually in use.
    """
    available = ort.get_available_providers()
    if choice == "auto":
        use_cuda = "CUDAExecutionProvider" in available and has_nvidia_gpu()
        wanted = _PROVIDERS["cuda"] if use_cuda else _PROVIDERS["cpu"]
    else:
        wanted = _PROVIDERS[choice]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ModelLoadError(
                f"providers={choice!r} needs {missing}, this onnxruntime has {available}"
            )
    if wanted[0] != "CPUExecutionProvider":
        _preload_cuda_libraries()
    return wanted


def _spec(node: ort.NodeArg) -> TensorSpec:
    if node.type not in ONNX_TYPES:
        raise ModelLoadError(f"tensor {node.name!r} has unsupported type {node.type}")
    datatype = ONNX_TYPES[node.type]
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, datatype, shape, numpy_dtype(datatype))


class OnnxSessions:
    """``instances`` onnxruntime sessions of one ONNX file; ``run`` is thread-safe."""

    def __init__(self, onnx_path: Path, settings: SessionSettings) -> None:
        self.path = onnx_path
        self.settings = settings
        wanted = requested_providers(settings.providers)
        options = ort.SessionOptions()
        options.graph_optimization_level = _GRAPH_LEVELS[settings.graph_optimization]
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = settings.inter_op_threads
        spinning = "1" if settings.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        try:
            self._sessions = [
                ort.InferenceSession(str(onnx_path), sess_options=options, providers=wanted)
                for _ in range(settings.instances)
            ]
        except Exception as error:  # onnxruntime raises several unrelated types
            raise ModelLoadError(f"{onnx_path}: onnxruntime could not load it: {error}") from None
        first = self._sessions[0]
        # What onnxruntime actually uses: CUDA falls back to CPU when no GPU is usable.
        self.providers: tuple[str, ...] = tuple(first.get_providers())
        self.inputs = tuple(_spec(n) for n in first.get_inputs())
        self.outputs = tuple(_spec(n) for n in first.get_outputs())
        self.custom_metadata: dict[str, str] = dict(first.get_modelmeta().custom_metadata_map)
        self._use_io_binding = self.providers[0] in (
            "CUDAExecutionProvider",
            "TensorrtExecutionProvider",
        )
        # One for every run: terminate() stops the runs in progress within a kernel.
        self._run_options = ort.RunOptions()
        self._free = list(range(len(self._sessions)))
        self._lock = threading.Lock()
        self._available = threading.Semaphore(len(self._sessions))
        log.info(
            "loaded %s with providers %s (%d session(s), io_binding=%s)",
            onnx_path,
            list(self.providers),
            len(self._sessions),
            self._use_io_binding,
        )

    @property
    def instances(self) -> int:
        return len(self._sessions)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def terminate(self) -> None:
        """Stop the runs in progress and fail every later one (thread-safe).

        For sessions nobody will serve from: a load cancelled at shutdown must not keep a
        thread inside onnxruntime while the process exits.
        """
        self._run_options.terminate = True

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run one batch on a free session; blocks until one is free."""
        names = list(output_names) if output_names else self.output_names
        with self._available:
            with self._lock:
                index = self._free.pop()
            try:
                session = self._sessions[index]
                if self._use_io_binding:
                    return self._run_bound(session, inputs, names, self._run_options)
                values = session.run(names, dict(inputs), self._run_options)
                return dict(zip(names, values, strict=True))
            finally:
                with self._lock:
                    self._free.append(index)

    @staticmethod
    def _run_bound(
        session: ort.InferenceSession,
        inputs: Mapping[str, np.ndarray],
        names: list[str],
        run_options: ort.RunOptions,
    ) -> dict[str, np.ndarray]:
        # IO binding copies inputs to the device once and lets onnxruntime allocate outputs on
        # the device, avoiding the extra staging copies of session.run on CUDA.
        binding = session.io_binding()
        for name, value in inputs.items():
            device_value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0)
            binding.bind_ortvalue_input(name, device_value)
        for name in names:
            binding.bind_output(name, "cuda", 0)
        session.run_with_iobinding(binding, run_options)
        values = binding.copy_outputs_to_cpu()
        return dict(zip(names, values, strict=True))

    def example_inputs(self, batch_size: int) -> dict[str, np.ndarray]:
        """Zero inputs of the given batch size; other dynamic dimensions get size 1."""
        result = {}
        for spec in self.inputs:
            shape = [
                batch_size if i == 0 and d == -1 else (d if d >= 0 else 1)
                for i, d in enumerate(spec.shape)
            ]
            if spec.datatype == "BYTES":
                result[spec.name] = np.full(shape, b"", dtype=np.object_)
            else:
                result[spec.name] = np.zeros(shape, dtype=spec.dtype)
        return result

    def warm_up(self, batch_sizes: Sequence[int], timeout_s: float) -> list[int]:
        """Run every session once per batch size, so no request pays a shape's first run.

        Stops after ``timeout_s`` (the sizes left stay cold); returns the sizes warmed.
        """
        deadline = time.monotonic() + timeout_s
        warmed: list[int] = []
        for batch_size in batch_sizes:
            if time.monotonic() >= deadline:
                break
            example = self.example_inputs(batch_size)
            for session in self._sessions:
                try:
                    if self._use_io_binding:
                        self._run_bound(session, example, self.output_names, self._run_options)
                    else:
                        session.run(self.output_names, example, self._run_options)
                except Exception as error:
                    raise ModelLoadError(
                        f"{self.path}: warm-up at batch size {batch_size} failed: {error}"
                    ) from None
            warmed.append(batch_size)
        return warmed
