"""Baseline (e) of benchmarks/serve_throughput.py: KServe's Python model server on onnxruntime.

Runs in a separate environment that has kserve and onnxruntime (not this project's):

    python -m venv /tmp/kserve-venv && /tmp/kserve-venv/bin/pip install kserve onnxruntime
    /tmp/kserve-venv/bin/python benchmarks/kserve_onnx_model.py --model_name demo \\
        --model_path model.onnx --grpc_port 8081 --http_port 8080

It follows the custom-model pattern of KServe's documentation: a ``kserve.Model`` whose
``predict`` runs the session, served over the same Open Inference Protocol gRPC service.
"""

import argparse

import kserve
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse


class OnnxModel(kserve.Model):
    """An onnxruntime session behind KServe's data plane."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:  # type: ignore[no-untyped-def, override]
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        names = [o.name for o in self.session.get_outputs()]
        outputs = []
        for name, value in zip(names, self.session.run(names, feeds), strict=True):
            output = InferOutput(name=name, shape=list(value.shape), datatype="FP32")
            output.set_data_from_numpy(value, binary_data=True)
            outputs.append(output)
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id)


if __name__ == "__main__":
    # kserve's parser already defines --model_name, --grpc_port and --http_port.
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--model_path", required=True)
    args, _ = parser.parse_known_args()
    kserve.ModelServer().start([OnnxModel(args.model_name, args.model_path)])
