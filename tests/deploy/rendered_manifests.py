"""Rendering the overlays and reading their workloads, for the tests of tests/deploy.

Every workload kind the overlays use (Deployment, Job, PyTorchJob, Kubeflow Trainer's TrainJob,
KServe's InferenceService with its ServingRuntime) is read as the pods it becomes: a pod spec
with its containers, so one hardening or GPU check covers them all.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir())
# Overlays that serve with KServe (an InferenceService instead of the Deployment).
KSERVE_OVERLAYS = [name for name in OVERLAYS if "kserve" in name]
DEPLOYMENT_OVERLAYS = [name for name in OVERLAYS if name not in KSERVE_OVERLAYS]
# The published CRDs and example runtimes (../shared/k8s-crds/README.md), beside the checkout.
CRD_DIR = ROOT.parent / "shared" / "k8s-crds"

Doc = dict[str, Any]


def render_text(overlay: str) -> str:
    result = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


_CACHE: dict[str, list[Doc]] = {}


def render(overlay: str) -> list[Doc]:
    if overlay not in _CACHE:
        _CACHE[overlay] = [d for d in yaml.safe_load_all(render_text(overlay)) if d]
    return _CACHE[overlay]


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def flag_value(args: list[str], flag: str) -> str:
    for arg in args:
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {args}")


def env_values(container: Doc) -> dict[str, str]:
    """The container's literal environment (valueFrom entries are left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


# ---- workloads as pods ---------------------------------------------------------------------


def trainjob_pod(job: Doc) -> tuple[dict[str, str], Doc]:
    """(labels, pod spec) of a TrainJob's "node" pods: its runtimePatches entries merged in
    order, as the Trainer's webhook does, with the container's image, command, args, env and
    resources from ``spec.trainer``."""
    labels: dict[str, str] = {}
    spec: Doc = {}
    for patch in job["spec"]["runtimePatches"]:
        for replicated in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            template = replicated["template"]["spec"]["template"]
            labels |= template.get("metadata", {}).get("labels", {})
            spec |= template.get("spec", {})
    trainer = job["spec"]["trainer"]
    node = dict(next(c for c in spec["containers"] if c["name"] == "node"))
    node |= {
        "image": trainer["image"],
        "command": trainer["command"],
        "args": trainer["args"],
        "env": trainer.get("env", []),
        "resources": trainer["resourcesPerNode"],
    }
    return labels, spec | {"containers": [node]}


def _merged_resources(runtime: Doc, model: Doc) -> Doc:
    return {
        key: runtime.get(key, {}) | model.get(key, {})
        for key in ("requests", "limits")
        if key in runtime or key in model
    }


def predictor_pod(isvc: Doc, runtime: Doc) -> tuple[dict[str, str], Doc]:
    """(labels, pod spec) of an InferenceService's predictor pods: the runtime's container with
    the model's fields merged over it (args appended, as KServe does), the predictor's pod
    fields, and both sets of volumes."""
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    container = dict(runtime["spec"]["containers"][0])
    container["args"] = container.get("args", []) + model.get("args", [])
    container["env"] = container.get("env", []) + model.get("env", [])
    container["resources"] = _merged_resources(
        container.get("resources", {}), model.get("resources", {})
    )
    pod_fields = {
        k: v
        for k, v in predictor.items()
        if k not in ("model", "labels", "annotations", "volumes")
        and k not in ("minReplicas", "maxReplicas", "scaleMetric", "scaleTarget")
        and k != "deploymentStrategy"
    }
    volumes = runtime["spec"].get("volumes", []) + predictor.get("volumes", [])
    return predictor.get("labels", {}), pod_fields | {
        "containers": [container],
        "volumes": volumes,
    }


def workload_pods(docs: list[Doc]) -> list[tuple[str, dict[str, str], Doc]]:
    """(name, pod labels, pod spec) of every workload in ``docs``."""
    pods = []
    for d in docs:
        name = d["metadata"]["name"]
        if d["kind"] in ("Deployment", "Job"):
            template = d["spec"]["template"]
            pods.append((name, template["metadata"]["labels"], template["spec"]))
        elif d["kind"] == "PyTorchJob":
            for role, replica in d["spec"]["pytorchReplicaSpecs"].items():
                template = replica["template"]
                pods.append((f"{name}/{role}", template["metadata"]["labels"], template["spec"]))
        elif d["kind"] == "TrainJob":
            pods.append((name, *trainjob_pod(d)))
        elif d["kind"] == "InferenceService":
            runtime = one(docs, "ServingRuntime", d["spec"]["predictor"]["model"]["runtime"])
            pods.append((name, *predictor_pod(d, runtime)))
    return pods


def server_pod(docs: list[Doc]) -> tuple[dict[str, str], Doc]:
    """(labels, pod spec) of the inference server: the Deployment's or KServe's predictor."""
    if find(docs, "InferenceService"):
        isvc = one(docs, "InferenceService")
        return predictor_pod(
            isvc, one(docs, "ServingRuntime", isvc["spec"]["predictor"]["model"]["runtime"])
        )
    template = one(docs, "Deployment", "finetune-server")["spec"]["template"]
    return template["metadata"]["labels"], template["spec"]


def server_argv(docs: list[Doc]) -> list[str]:
    """The server's command line as its pod runs it (KServe's {{.Name}} filled in)."""
    container = server_pod(docs)[1]["containers"][0]
    args: list[str] = container["args"]
    for isvc in find(docs, "InferenceService"):
        args = [a.replace("{{.Name}}", isvc["metadata"]["name"]) for a in args]
    return args


def server_config_of(docs: list[Doc]) -> Any:
    """The server's settings as the program's own loader resolves the manifest's args and env."""
    from server.config import load_config

    container = server_pod(docs)[1]["containers"][0]
    return load_config(server_argv(docs), environ=env_values(container))


def server_has_flag(name: str) -> bool:
    """Whether the server's settings have a field ``name`` (a flag being added elsewhere)."""
    import dataclasses

    from server.config import ServerConfig

    return name in {f.name for f in dataclasses.fields(ServerConfig)}
