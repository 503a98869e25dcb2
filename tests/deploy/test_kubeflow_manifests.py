"""The KServe and Kubeflow Trainer v2 overlays fit their engines' published contracts.

The custom resources are validated against the CRDs in ../shared/k8s-crds (skipped where that
folder or the tools venv with jsonschema is absent: `make lint-deploy` runs the same check), and
held to the engines' example runtimes there: the container names, the ports, /mnt/models, the
replicated job the Trainer injects its progress endpoint into. The rest ties the pieces together:
the storageUri's volume and path, the server's flags, the labels the policies select on.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
import yaml
from rendered_manifests import (
    CRD_DIR,
    DEPLOY,
    ROOT,
    find,
    flag_value,
    one,
    predictor_pod,
    render,
    server_argv,
    trainjob_pod,
)

TOOLS_PYTHON = ROOT / ".venv-tools" / "bin" / "python"
# The Trainer's status server (its controller manager's port) and its default namespace.
STATUS_SERVER_PORT = 10443
TRAINER_NAMESPACE = "kubeflow-system"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def example(name: str) -> dict[str, Any]:
    path = CRD_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (the engines' published files live in ../shared)")
    return yaml.safe_load(path.read_text())


# ---- Kubeflow Trainer v2 ----------------------------------------------------------------------


def test_trainjob_runs_the_jobs_trainer_on_the_torch_distributed_runtime() -> None:
    docs = render("gpu-trainjob")
    assert not find(docs, "Job"), "the single-pod Job is replaced"
    job = one(docs, "TrainJob")
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] >= 1
    assert trainer["image"].endswith("/finetune-trainer:0.1.0"), "kustomize's images: reach it"
    # The base Job's program and flags, launched by torchrun (PET_* come from the runtime).
    base_job = one(render("gpu"), "Job", "finetune-train")
    base_args = base_job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert trainer["command"] == ["torchrun"]
    assert trainer["args"] == ["/opt/venv/bin/trainer", *base_args]
    # One process per GPU.
    gpus = trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) == trainer["numProcPerNode"]
    # Each runtimePatches entry has its own manager (the list's key).
    managers = [p["manager"] for p in job["spec"]["runtimePatches"]]
    assert len(set(managers)) == len(managers) == 2


def test_trainjob_patches_the_runtimes_trainer_job_and_container() -> None:
    runtime = example("example-clustertrainingruntime-torch-distributed.yaml")
    job = one(render("gpu-trainjob"), "TrainJob")
    assert runtime["metadata"]["name"] == job["spec"]["runtimeRef"]["name"]
    replicated = {r["name"]: r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    for patch in job["spec"]["runtimePatches"]:
        for target in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            assert target["name"] in replicated, target["name"]
            template = replicated[target["name"]]["template"]
            # The Trainer injects KUBEFLOW_TRAINER_SERVER_* into the trainer step's containers.
            ancestor = template["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"]
            assert ancestor == "trainer"
            runtime_containers = {
                c["name"] for c in template["spec"]["template"]["spec"]["containers"]
            }
            patched = target["template"]["spec"]["template"]["spec"].get("containers", [])
            assert {c["name"] for c in patched} <= runtime_containers


def test_trainjob_pods_mount_the_shared_volumes_and_reach_the_status_server() -> None:
    docs = render("gpu-trainjob")
    labels, pod = trainjob_pod(one(docs, "TrainJob"))
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {p["metadata"]["name"] for p in find(docs, "PersistentVolumeClaim")}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/data"]["readOnly"] is True
    assert {"/outputs", "/tmp", "/dev/shm"} <= mounts.keys()
    assert pod["terminationGracePeriodSeconds"] > 20  # the trainer's SIGTERM budget
    # The peers policy lets the nodes rendezvous; the status policy lets rank 0 report.
    peers = one(docs, "NetworkPolicy", "finetune-trainer-peers")
    assert peers["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    status = one(docs, "NetworkPolicy", "finetune-trainer-status")
    assert status["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (rule,) = status["spec"]["egress"]
    assert rule["ports"] == [{"port": STATUS_SERVER_PORT, "protocol": "TCP"}]
    namespace = rule["to"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    assert namespace == TRAINER_NAMESPACE


# ---- KServe -------------------------------------------------------------------------------


def test_servingruntime_follows_kserves_runtime_contract() -> None:
    triton = example("example-kserve-tritonserver-runtime.yaml")
    docs = render("gpu-kserve")
    runtime = one(docs, "ServingRuntime")
    assert runtime["apiVersion"] == triton["apiVersion"]
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    assert [f["name"] for f in spec["supportedModelFormats"]] == ["onnx"]
    (container,) = spec["containers"]
    assert container["name"] == triton["spec"]["containers"][0]["name"] == "kserve-container"
    args = container["args"]
    assert flag_value(args, "--model-repository") == "/mnt/models"
    assert flag_value(args, "--model-name") == "{{.Name}}"  # KServe fills in the isvc's name
    # KServe's Service publishes the first port on 80: HTTP/REST; a "grpc" name makes h2c.
    ports = [(p["name"], p["containerPort"]) for p in container["ports"]]
    assert ports == [("http1", 8080), ("grpc", 8081)]
    assert flag_value(args, "--http-port") == "8080"
    assert flag_value(args, "--grpc-port") == "8081"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 8081, probe
    metrics_port = flag_value(args, "--metrics-port")
    annotations = spec["annotations"]
    assert annotations["prometheus.io/port"] == annotations["prometheus.kserve.io/port"]
    assert annotations["prometheus.io/port"] == metrics_port
    # Left on, KServe would point prometheus.io/port at its own default.
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "false"


def test_kserve_pods_are_hardened_like_the_deployment() -> None:
    deployment_pod = one(render("gpu"), "Deployment", "finetune-server")["spec"]["template"]["spec"]
    docs = render("gpu-kserve")
    isvc = one(docs, "InferenceService")
    labels, pod = predictor_pod(isvc, one(docs, "ServingRuntime"))
    assert pod["securityContext"] == deployment_pod["securityContext"]
    server = pod["containers"][0]
    assert server["securityContext"] == deployment_pod["containers"][0]["securityContext"]
    assert pod["terminationGracePeriodSeconds"] == deployment_pod["terminationGracePeriodSeconds"]
    assert pod["serviceAccountName"] == deployment_pod["serviceAccountName"]
    # The PodDisruptionBudget of the base selects the predictor pods.
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler"):
        assert not find(docs, kind, "finetune-server"), f"KServe makes its own {kind}"
    predictor = isvc["spec"]["predictor"]
    assert predictor["minReplicas"] >= 2
    assert predictor["deploymentStrategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_inferenceservice_serves_the_model_the_training_job_writes() -> None:
    docs = render("gpu-kserve")
    isvc = one(docs, "InferenceService")
    runtime = one(docs, "ServingRuntime")
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {
        f["name"] for f in runtime["spec"]["supportedModelFormats"]
    }
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    # RawDeployment publishes both ports (Knative allows one).
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    # pvc://CLAIM/PATH: the claim the Job writes its outputs to, the model's directory there.
    scheme, _, rest = model["storageUri"].partition("://")
    claim, _, path = rest.partition("/")
    assert scheme == "pvc"
    job = one(docs, "Job", "finetune-train")["spec"]["template"]["spec"]
    outputs = next(v for v in job["volumes"] if v["name"] == "outputs")
    assert outputs["persistentVolumeClaim"]["claimName"] == claim
    trainer_args = job["containers"][0]["args"]
    assert flag_value(trainer_args, "--output") == "/outputs"
    assert path == f"model_repository/{isvc['metadata']['name']}"
    # The model is named after the InferenceService; the server is told that name.
    assert flag_value(server_argv(docs), "--model-name") == isvc["metadata"]["name"]
    # The init container waits on the same directory before the server starts.
    wait = next(c for c in predictor["initContainers"] if c["name"] == "wait-for-model")
    mount = next(m for m in wait["volumeMounts"] if m["mountPath"] == wait["command"][-1])
    assert (mount["subPath"], mount["readOnly"]) == (path, True)
    volume = next(v for v in predictor["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == claim


def test_gpu_component_puts_the_predictor_on_a_gpu_with_cuda() -> None:
    docs = render("gpu-kserve")
    _, pod = predictor_pod(one(docs, "InferenceService"), one(docs, "ServingRuntime"))
    server = pod["containers"][0]
    # The model's args come after the runtime's: the server's last --providers wins.
    assert server["args"][-1] == "--providers=cuda"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert server["resources"]["limits"]["cpu"] == server["resources"]["requests"]["cpu"]


# ---- the published CRDs -----------------------------------------------------------------------


def test_custom_resources_validate_against_the_published_crds() -> None:
    if not CRD_DIR.is_dir():
        pytest.skip(f"{CRD_DIR} is absent (the engines' CRDs live in ../shared)")
    if not TOOLS_PYTHON.exists():
        pytest.skip("jsonschema lives in .venv-tools: run `make lint-deploy` once")
    rendered = sorted(str(p) for p in (DEPLOY / "rendered").glob("*.yaml"))
    result = subprocess.run(
        [
            str(TOOLS_PYTHON),
            str(DEPLOY / "validate-crds.py"),
            "--require-kinds",
            "TrainJob ServingRuntime InferenceService",
            str(CRD_DIR),
            *rendered,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    for kind in ("TrainJob", "ServingRuntime", "InferenceService"):
        assert f"valid: {kind} " in result.stdout, kind


def test_the_crd_check_refuses_a_misspelt_field(tmp_path: Any) -> None:
    if not CRD_DIR.is_dir() or not TOOLS_PYTHON.exists():
        pytest.skip("needs ../shared/k8s-crds and .venv-tools (make lint-deploy)")
    job = one(render("gpu-trainjob"), "TrainJob")
    job["spec"]["trainer"]["numProcsPerNode"] = job["spec"]["trainer"].pop("numProcPerNode")
    job["spec"]["trainer"]["numNodes"] = "2"
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(job))
    result = subprocess.run(
        [str(TOOLS_PYTHON), str(DEPLOY / "validate-crds.py"), str(CRD_DIR), str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "'numProcsPerNode' was unexpected" in result.stderr
    assert "spec.trainer.numNodes: '2' is not of type 'integer'" in result.stderr
