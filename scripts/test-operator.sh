#!/usr/bin/env bash
# Offline checks of the operator's Helm chart and manifests (no cargo, no cluster):
#   helm lint --strict, helm template with default and example values, kubernetes-validate
#   --strict on the rendered objects, checkov on the rendered manifests (skips must be
#   documented in the chart README), the chart's CRD equal to crds/, the chart's alerts
#   through promtool (tests/prometheus/check-rules.sh), and its Grafana dashboard
#   (tests/grafana/check-dashboard.sh).
# Installs what is missing into ./.tools (gitignored); safe to run again.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
BIN="$TOOLS/bin"
VENV="$TOOLS/venv"
CHART="$ROOT/charts/wsgate-operator"
NAMESPACE="wsgate-system"
OUT="$TOOLS/rendered"

# Pinned so that results do not change under us (helm: tests/e2e/tools/helm/go.mod).
PY_PACKAGES=("kubernetes-validate==1.37.0" "checkov==3.3.30")
# Kubernetes version the rendered objects are validated against (the chart's floor is 1.30).
K8S_VERSION="1.32.0"

# Checks skipped by checkov. Each must be explained in charts/wsgate-operator/README.md
# (section "Security checks"); this script fails if one is not.
CHECKOV_SKIPS=(
  CKV_K8S_43 # image digest: users pin by digest through image.digest; a chart cannot know it
)

log() { printf '==> %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

install_helm() {
  # helm from its pinned Go module (tests/e2e/tools/helm), built once into a cache folder.
  local bin
  bin="$("$ROOT/tests/e2e/tools/build.sh" helm)"
  mkdir -p "$BIN"
  ln -sfn "$bin/helm" "$BIN/helm"
}

install_python_tools() {
  if [[ -x "$VENV/bin/checkov" && -x "$VENV/bin/kubernetes-validate" ]]; then return; fi
  log "installing ${PY_PACKAGES[*]} into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
}

render() { # name, extra helm args...
  local name="$1"; shift
  "$BIN/helm" template wsgate-operator "$CHART" --namespace "$NAMESPACE" --include-crds "$@" \
    >"$OUT/$name.yaml"
}

main() {
  install_helm
  install_python_tools
  rm -rf "$OUT" && mkdir -p "$OUT"

  local values_files=("$CHART"/ci/*-values.yaml)
  [[ -e "${values_files[0]}" ]] || fail "no example values in $CHART/ci/"

  log "helm lint --strict (default values)"
  "$BIN/helm" lint --strict "$CHART" --namespace "$NAMESPACE"
  for values in "${values_files[@]}"; do
    log "helm lint --strict -f ${values#"$ROOT"/}"
    "$BIN/helm" lint --strict "$CHART" --namespace "$NAMESPACE" -f "$values"
  done

  log "helm template (default values)"
  render default
  for values in "${values_files[@]}"; do
    log "helm template -f ${values#"$ROOT"/}"
    render "$(basename "$values" .yaml)" -f "$values"
  done

  for rendered in "$OUT"/*.yaml; do
    log "kubernetes-validate --strict ${rendered#"$ROOT"/}"
    # Custom resources (the optional ServiceMonitor) have no schema in kubernetes-validate; they
    # are filtered out here and covered by the chart's own template logic.
    python3 - "$rendered" "$rendered.builtin" <<'PY'
import sys
docs = open(sys.argv[1]).read().split("\n---")
keep = [d for d in docs if "apiVersion: monitoring.coreos.com/" not in d]
open(sys.argv[2], "w").write("\n---".join(keep))
PY
    "$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "$rendered.builtin"
  done

  for skip in "${CHECKOV_SKIPS[@]}"; do
    grep -q "$skip" "$CHART/README.md" || fail "checkov skip $skip is not explained in the chart README"
  done
  for rendered in "$OUT"/*.yaml; do
    log "checkov ${rendered#"$ROOT"/}"
    local skips
    skips="$(IFS=,; echo "${CHECKOV_SKIPS[*]}")"
    "$VENV/bin/checkov" -f "$rendered" --framework kubernetes --skip-download --compact --quiet \
      --skip-check "$skips"
  done

  log "chart CRD equals crds/"
  for crd in "$ROOT"/crds/*.yaml; do
    cmp -s "$crd" "$CHART/crds/$(basename "$crd")" \
      || fail "$CHART/crds/$(basename "$crd") differs from crds/: cp crds/*.yaml charts/wsgate-operator/crds/"
  done
  for crd in "$CHART"/crds/*.yaml; do
    [[ -e "$ROOT/crds/$(basename "$crd")" ]] || fail "chart ships a CRD not in crds/: $crd"
  done

  log "alert rules: promtool check rules + promtool test rules"
  "$ROOT/tests/prometheus/check-rules.sh" "$BIN/helm" "$VENV/bin/python"

  log "Grafana dashboard: ConfigMap, panels, PromQL"
  "$ROOT/tests/grafana/check-dashboard.sh" "$BIN/helm" "$VENV/bin/python"

  log "operator chart checks passed"
}

main "$@"
