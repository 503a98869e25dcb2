#!/usr/bin/env bash
# Offline static checks of the container and Kubernetes files (make lint-deploy):
#   1. hadolint on both Dockerfiles (any finding fails; justified ones are ignored inline);
#   2. the committed deploy/rendered/ matches a fresh render of deploy/overlays;
#   3. kubernetes-validate --strict on every rendered manifest, for the oldest and the newest
#      Kubernetes version we support; custom resources are skipped only when listed below;
#   4. the custom resources of KServe and Kubeflow Trainer against their published CRDs
#      (deploy/validate-crds.py; the CRDs live in ../shared/k8s-crds beside the checkout);
#   5. checkov on the Dockerfiles and the rendered manifests (skips are inline and justified).
# TOOLS is the virtualenv that `make lint-deploy` installs from deploy/tools-requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="${TOOLS:-.venv-tools}"
K8S_VERSIONS="${K8S_VERSIONS:-1.27.0 1.32.0}"
# Custom resources whose CRD schemas are not shipped with kubernetes-validate. Their fields are
# checked by tests/deploy instead (container name, replica specs, selectors).
SKIPPED_CR_KINDS="ServiceMonitor PyTorchJob Certificate"
# Custom resources validated by step 4 against the engines' published CRDs (and by tests/deploy).
CRD_KINDS="TrainJob ServingRuntime InferenceService"
# The published CRDs (a copy of the engines' files, never vendored here): ../shared/k8s-crds
# beside the repository root, as in CI's checkout; CRD_DIR names another folder.
CRD_DIR="${CRD_DIR:-$(pwd)/../shared/k8s-crds}"

for tool in hadolint kubernetes-validate checkov; do
    [[ -x "$TOOLS/bin/$tool" ]] || {
        echo "error: $TOOLS/bin/$tool is missing; run 'make lint-deploy' to install the tools" >&2
        exit 2
    }
done

echo "== hadolint"
"$TOOLS/bin/hadolint" Dockerfile.train Dockerfile.serve
echo "ok"

echo "== rendered manifests are up to date"
fresh="$(mktemp -d)"
trap 'rm -rf "$fresh"' EXIT
deploy/render-manifests.sh "$fresh" >/dev/null
if ! diff -ru --exclude='.*' deploy/rendered "$fresh"; then
    echo "error: deploy/rendered is stale; run 'make manifests' and commit the result" >&2
    exit 1
fi
echo "ok"

echo "== kubernetes-validate --strict"
for version in $K8S_VERSIONS; do
    report="$("$TOOLS/bin/kubernetes-validate" --strict --quiet -k "$version" deploy/rendered/*.yaml deploy/data-loader.yaml 2>&1)" || {
        echo "$report" >&2
        exit 1
    }
    # Fail on any kind without a schema that is not an explicitly skipped custom resource.
    unknown="$(grep -o "find schema for kind [A-Za-z]*" <<<"$report" | awk '{print $5}' | sort -u || true)"
    for kind in $unknown; do
        if [[ " $SKIPPED_CR_KINDS $CRD_KINDS " != *" $kind "* ]]; then
            echo "error: no schema for kind $kind (Kubernetes $version) and it is not in SKIPPED_CR_KINDS or CRD_KINDS" >&2
            exit 1
        fi
    done
    echo "ok for Kubernetes $version (skipped custom resources: ${unknown//$'\n'/ })"
done

echo "== custom resources against the published CRDs ($CRD_DIR)"
if [[ -d "$CRD_DIR" ]]; then
    "$TOOLS/bin/python" deploy/validate-crds.py --require-kinds "$CRD_KINDS" "$CRD_DIR" \
        deploy/rendered/*.yaml
    echo "ok"
else
    echo "skipped: $CRD_DIR does not exist (the CRDs of KServe and Kubeflow Trainer are read from" \
        "../shared/k8s-crds beside the checkout; set CRD_DIR to validate $CRD_KINDS)"
fi

echo "== checkov"
# --skip-download: no policy download and no platform calls; checkov runs fully offline.
"$TOOLS/bin/checkov" --quiet --compact --skip-download --framework dockerfile \
    -f Dockerfile.train -f Dockerfile.serve
"$TOOLS/bin/checkov" --quiet --compact --skip-download --framework kubernetes \
    -d deploy/rendered
"$TOOLS/bin/checkov" --quiet --compact --skip-download --framework kubernetes \
    -f deploy/data-loader.yaml
echo "ok"
