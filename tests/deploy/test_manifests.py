"""The Kubernetes manifests render, carry the fields that make them safe, and match the CLIs.

Each overlay is rendered with `kubectl kustomize` (skipped only when kubectl is absent); the
committed deploy/rendered/ must equal a fresh render; the trainer and server arguments in the
manifests must parse with the programs' own parsers.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from rendered_manifests import (
    DEPLOY,
    DEPLOYMENT_OVERLAYS,
    KSERVE_OVERLAYS,
    OVERLAYS,
    find,
    flag_value,
    one,
    render,
    render_text,
    server_config_of,
    server_has_flag,
    server_pod,
    workload_pods,
)

GPU_OVERLAYS = [name for name in OVERLAYS if name.startswith("gpu")]
# The trainer's SIGTERM budget (trainer.config stop_timeout default) and the server's
# drain delay before it stops accepting RPCs.
TRAINER_STOP_BUDGET_S = 20
SERVER_DRAIN_DELAY_S = 1

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


def server_config_or_skip(docs: list[dict[str, Any]]) -> Any:
    """The server's settings; skipped where a KServe runtime names --http-port and the server
    does not have that flag yet."""
    if find(docs, "ServingRuntime") and not server_has_flag("http_port"):
        pytest.skip("the KServe runtime passes --http-port, which server/config.py lacks yet")
    return server_config_of(docs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_committed_render_is_fresh(overlay: str) -> None:
    committed = (DEPLOY / "rendered" / f"{overlay}.yaml").read_text()
    body = "".join(committed.splitlines(keepends=True)[1:])
    assert body == render_text(overlay), "deploy/rendered is stale: run `make manifests`"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_hardened(overlay: str) -> None:
    docs = render(overlay)
    pods = workload_pods(docs)
    assert pods
    accounts = {a["metadata"]["name"]: a for a in find(docs, "ServiceAccount")}
    for name, labels, spec in pods:
        # The default-deny NetworkPolicy (and its DNS egress) selects pods by this label.
        assert labels["app.kubernetes.io/part-of"] == "finetune-serve", name
        if any(d["kind"] == "TrainJob" and d["metadata"]["name"] == name for d in docs):
            # A TrainJob may not set these pod fields: its ServiceAccount mounts no token, and
            # no Service may be named so that its variables read as TRAINER_* settings.
            account = accounts[spec["serviceAccountName"]]
            assert account["automountServiceAccountToken"] is False, name
            services = [s["metadata"]["name"] for s in find(docs, "Service")]
            assert not [s for s in services if s.startswith(("trainer", "server"))], services
        else:
            assert spec["automountServiceAccountToken"] is False, name
            assert spec["enableServiceLinks"] is False, name
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["runAsUser"] >= 10000, name
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert "limits" in container["resources"], name
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts, f"{name}: read-only root needs a writable /tmp"
    assert all(d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", DEPLOYMENT_OVERLAYS)
def test_server_probes_service_and_disruption(overlay: str) -> None:
    docs = render(overlay)
    deployment = one(docs, "Deployment", "finetune-server")
    spec = deployment["spec"]["template"]["spec"]
    server = spec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    config = server_config_or_skip(docs)
    # The kubelet's gRPC probe speaks plaintext: with TLS it must use the health-only port.
    probe_port = ports["health"] if config.tls_cert is not None else ports["grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == probe_port, probe
    grace = float(flag_value(server["args"], "--grace-period-s"))
    assert spec["terminationGracePeriodSeconds"] > grace + SERVER_DRAIN_DELAY_S
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert {c["topologyKey"] for c in spec["topologySpreadConstraints"]} >= {
        "kubernetes.io/hostname"
    }
    mount = next(m for m in server["volumeMounts"] if m["mountPath"] == "/models")
    assert mount["readOnly"] is True
    assert mount["subPath"] == "model_repository"
    assert flag_value(server["args"], "--model-repository") == "/models"
    # The init container waits for the first version of the model the server is told to load.
    wait = next(c for c in spec["initContainers"] if c["name"] == "wait-for-model")
    model_name = flag_value(server["args"], "--model-name")
    assert wait["command"][-1] == f"/models/{model_name}"
    assert [m["subPath"] for m in wait["volumeMounts"] if m["mountPath"] == "/models"] == [
        "model_repository"
    ]

    service = one(docs, "Service", "finetune-server")
    protocols = {p["name"]: p["appProtocol"] for p in service["spec"]["ports"]}
    grpc_protocol = "https" if config.tls_cert is not None else "kubernetes.io/h2c"
    assert protocols == {"grpc": grpc_protocol, "metrics": "http"}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= (
        labels.items()
    )
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "finetune-server"
    assert any(m["type"] == "Resource" for m in hpa["spec"]["metrics"])
    policies = find(docs, "NetworkPolicy")
    assert any(
        p["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "finetune-serve"}
        for p in policies
    )


@pytest.mark.parametrize(
    "overlay", [o for o in OVERLAYS if not o.endswith(("pytorchjob", "trainjob"))]
)
def test_training_jobs_survive_preemption(overlay: str) -> None:
    jobs = find(render(overlay), "Job")
    assert len(jobs) == 1, "exactly one training Job per overlay"
    job = jobs[0]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    ignore = next(r for r in rules if r["action"] == "Ignore")
    assert ignore["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    fail = next(r for r in rules if r["action"] == "FailJob")
    assert fail["onExitCodes"]["values"] == [2]  # trainer.errors.USAGE_EXIT_CODE
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["terminationGracePeriodSeconds"] > TRAINER_STOP_BUDGET_S
    trainer = next(c for c in spec["containers"] if c["name"] == "trainer")
    assert "--resume=auto" in trainer["args"]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_overlays_request_gpus_on_gpu_nodes(overlay: str) -> None:
    docs = render(overlay)
    if overlay in KSERVE_OVERLAYS:
        # KServe makes its own HPA; Prometheus finds the pods by their annotations.
        annotations = one(docs, "ServingRuntime")["spec"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
    else:
        assert find(docs, "ServiceMonitor")
        hpa = one(docs, "HorizontalPodAutoscaler")
        assert any(m["type"] == "Pods" for m in hpa["spec"]["metrics"])
    for name, _, spec in workload_pods(docs):
        assert spec["nodeSelector"], name
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]), name
        limits = spec["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1", name


def test_indexed_job_rendezvous_matches_headless_service() -> None:
    docs = render("gpu-distributed")
    assert not find(docs, "Job", "finetune-train"), "the single-pod Job is replaced"
    job = one(docs, "Job", "finetune-train-ddp")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    service = one(docs, "Service", pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    trainer = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert int(env["NNODES"]) == spec["completions"]
    assert trainer["command"] == ["torchrun"]
    assert "--rdzv-backend=c10d" in trainer["args"]
    endpoint = flag_value(trainer["args"], "--rdzv-endpoint")
    host, port = endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_pytorchjob_follows_the_operator_contract() -> None:
    docs = render("gpu-pytorchjob")
    assert not find(docs, "Job"), "the single-pod Job is replaced"
    job = one(docs, "PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    for replica in replicas.values():
        container = replica["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"  # the operator looks the container up by name
        assert container["command"] == ["torchrun"]
        assert "--resume=auto" in container["args"]


def test_servicemonitor_scrapes_the_metrics_port() -> None:
    docs = render("gpu")
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service", "finetune-server")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names


def _trainer_argv(container: dict[str, Any]) -> list[str]:
    args: list[str] = container["args"]
    if container.get("command") == ["torchrun"]:
        args = args[args.index("/opt/venv/bin/trainer") + 1 :]
    return args


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifest_arguments_parse_with_the_real_clis(overlay: str) -> None:
    from trainer.cli import build_parser
    from trainer.config import FIELDS, resolve_config

    docs = render(overlay)
    parser = build_parser()
    for name, _, spec in workload_pods(docs):
        if name == "finetune-server" or find(docs, "InferenceService", name):
            continue
        containers = spec["containers"] + spec.get("initContainers", [])
        for container in containers:
            args = parser.parse_args(_trainer_argv(container))
            if args.command == "train":
                flags = {f: getattr(args, f) for f in FIELDS if hasattr(args, f)}
                train_config = resolve_config(environ={}, flags=flags)
                assert train_config.resume == "auto", name
                assert str(train_config.output) == "/outputs", name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_arguments_parse_with_the_real_cli(overlay: str) -> None:
    config = server_config_or_skip(render(overlay))
    if overlay in KSERVE_OVERLAYS:
        # Where KServe mounts the model and the ports it routes to.
        assert str(config.model_repository) == "/mnt/models"
        assert (config.http_port, config.grpc_port) == (8080, 8081)
    else:
        assert str(config.model_repository) == "/models"
        assert config.grpc_port == 8001


def _secret_mount(spec: dict[str, Any], container: dict[str, Any], path: Path) -> dict[str, Any]:
    """The Secret volume mounted read-only at a directory holding ``path``."""
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    assert mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    return volume["secret"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_server_requires_the_token_from_a_secret(overlay: str) -> None:
    docs = render(overlay)
    spec = server_pod(docs)[1]
    config = server_config_or_skip(docs)
    assert config.auth_token_file is not None, "the bearer token is on by default"
    secret = _secret_mount(spec, spec["containers"][0], config.auth_token_file)
    assert secret["secretName"] == "finetune-server-token"
    assert config.auth_token_file.name == "token"  # the key documented in deploy/README.md
    # Readable by the server's group only; the pod's fsGroup owns it.
    assert secret["defaultMode"] == 0o440
    assert not find(docs, "Secret"), "the token is created out of band, never committed"
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_bind_address_and_timeout_are_set(overlay: str) -> None:
    config = server_config_or_skip(render(overlay))
    assert config.metrics_host is not None
    assert 0 < config.metrics_timeout_s <= 30


# Overlays that serve without TLS: each says so in its name (components/insecure-plaintext).
INSECURE_OVERLAYS = [name for name in DEPLOYMENT_OVERLAYS if "insecure" in name]
TLS_OVERLAYS = [name for name in DEPLOYMENT_OVERLAYS if name not in INSECURE_OVERLAYS]


@pytest.mark.parametrize("overlay", TLS_OVERLAYS)
def test_server_serves_tls_and_probes_the_plaintext_health_port(overlay: str) -> None:
    docs = render(overlay)
    spec = one(docs, "Deployment", "finetune-server")["spec"]["template"]["spec"]
    server = spec["containers"][0]
    config = server_config_or_skip(docs)
    assert config.tls_cert is not None and config.tls_key is not None
    cert_secret = _secret_mount(spec, server, config.tls_cert)
    assert _secret_mount(spec, server, config.tls_key) == cert_secret
    assert cert_secret["secretName"] == "finetune-server-tls"
    assert cert_secret["defaultMode"] == 0o440
    assert (config.tls_cert.name, config.tls_key.name) == ("tls.crt", "tls.key")
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert config.health_port == ports["health"] != config.grpc_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == config.health_port, probe
    # The health port is not published by the Service: only the kubelet needs it.
    service = one(docs, "Service", "finetune-server")
    assert config.health_port not in {p["port"] for p in service["spec"]["ports"]}


@pytest.mark.parametrize("overlay", INSECURE_OVERLAYS)
def test_insecure_overlay_serves_plaintext_without_the_tls_secret(overlay: str) -> None:
    docs = render(overlay)
    spec = one(docs, "Deployment", "finetune-server")["spec"]["template"]["spec"]
    server = spec["containers"][0]
    config = server_config_or_skip(docs)
    assert (config.tls_cert, config.tls_key, config.health_port) == (None, None, -1)
    assert "health" not in {p["name"] for p in server["ports"]}
    secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert secrets == {"finetune-server-token"}, "the token stays required"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == config.grpc_port, probe


def test_insecure_overlays_are_named_so() -> None:
    assert INSECURE_OVERLAYS == ["insecure-plaintext"]
    for overlay in TLS_OVERLAYS:
        assert server_config_or_skip(render(overlay)).tls_cert is not None, overlay


def test_cert_manager_keeps_the_servers_secret_issued() -> None:
    docs = render("gpu-cert-manager")
    spec = one(docs, "Deployment", "finetune-server")["spec"]["template"]["spec"]
    config = server_config_or_skip(docs)
    assert config.tls_cert is not None
    cert_secret = _secret_mount(spec, spec["containers"][0], config.tls_cert)
    certificate = one(docs, "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["spec"]["secretName"] == cert_secret["secretName"]
    service = one(docs, "Service", "finetune-server")
    namespace = certificate["metadata"]["namespace"]
    assert f"{service['metadata']['name']}.{namespace}.svc" in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["issuerRef"]["name"]
    assert "server auth" in certificate["spec"]["usages"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_labelled_clients_and_monitoring_only(overlay: str) -> None:
    docs = render(overlay)
    policy = one(docs, "NetworkPolicy", "finetune-server-ingress")
    server_labels = server_pod(docs)[0]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= server_labels.items()
    rules = policy["spec"]["ingress"]
    assert all(rule.get("from") for rule in rules), "no rule may admit every source"
    by_port = {port["port"]: rule["from"] for rule in rules for port in rule["ports"]}
    # KServe routes to 8080 (HTTP/REST) and 8081 (gRPC); the Deployment serves gRPC on 8001.
    client_ports = {8080, 8081} if overlay in KSERVE_OVERLAYS else {8001}
    for port in client_ports:
        assert by_port[port] == [
            {"podSelector": {"matchLabels": {"finetune-serve/client": "true"}}}
        ]
    assert by_port[8002] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    assert set(by_port) == client_ports | {8002}
