#!/usr/bin/env bash
# End-to-end test of the operator on a real, throw-away cluster (kind by default, or k3d).
# Not part of CI (it needs a container engine); run it by hand:
#
#   tests/e2e/kind.sh                 # kind cluster "wsgate-e2e", deleted at the end
#   CLUSTER_TOOL=k3d tests/e2e/kind.sh
#   KEEP_CLUSTER=1 tests/e2e/kind.sh  # leave the cluster for inspection
#
# Needs: docker, kubectl, helm, and kind or k3d. Builds both images from docker/, loads them
# into the cluster, installs the chart, and checks: a minimal WsCluster becomes Ready with owned
# children; a Redis-backed one scales with `kubectl scale wsc`; autoscaling creates and removes
# an HPA; the API server rejects invalid examples; the HTTP API answers with the generated key;
# deleting the WsCluster garbage-collects its children.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER="${CLUSTER:-wsgate-e2e}"
CLUSTER_TOOL="${CLUSTER_TOOL:-kind}"
TAG="e2e-$(date +%s)"
NS=wsgate-e2e
OP_NS=wsgate-system
TIMEOUT=240s

log() { printf '\n==> %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null || fail "$1 is required"; }

for tool in docker kubectl helm "$CLUSTER_TOOL"; do need "$tool"; done

cleanup() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    log "failure: operator logs and events"
    kubectl -n "$OP_NS" logs deploy/wsgate-operator --tail=100 || true
    kubectl -n "$NS" get wsc,deploy,svc,pdb,hpa,pods -o wide || true
    kubectl -n "$NS" get events --sort-by=.lastTimestamp | tail -30 || true
  fi
  if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then
    log "deleting cluster $CLUSTER"
    case "$CLUSTER_TOOL" in
      kind) kind delete cluster --name "$CLUSTER" || true ;;
      k3d) k3d cluster delete "$CLUSTER" || true ;;
    esac
  fi
  exit $rc
}
trap cleanup EXIT

log "creating $CLUSTER_TOOL cluster $CLUSTER"
case "$CLUSTER_TOOL" in
  kind) kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s ;;
  k3d) k3d cluster list "$CLUSTER" >/dev/null 2>&1 || k3d cluster create "$CLUSTER" --wait ;;
  *) fail "CLUSTER_TOOL must be kind or k3d" ;;
esac

log "building images (tag $TAG)"
docker build -f "$ROOT/docker/gateway.Dockerfile" -t "wsgate:$TAG" "$ROOT"
docker build -f "$ROOT/docker/operator.Dockerfile" -t "wsgate-operator:$TAG" "$ROOT"
case "$CLUSTER_TOOL" in
  kind) kind load docker-image --name "$CLUSTER" "wsgate:$TAG" "wsgate-operator:$TAG" ;;
  k3d) k3d image import -c "$CLUSTER" "wsgate:$TAG" "wsgate-operator:$TAG" ;;
esac

log "installing the operator chart"
helm upgrade --install wsgate-operator "$ROOT/charts/wsgate-operator" \
  --namespace "$OP_NS" --create-namespace \
  --set image.repository=wsgate-operator --set image.tag="$TAG" --set image.pullPolicy=Never \
  --set gateway.image="wsgate:$TAG" --set replicaCount=2 --wait --timeout "$TIMEOUT"
kubectl -n "$OP_NS" get lease wsgate-operator -o jsonpath='{.spec.holderIdentity}' | grep -q . \
  || fail "no operator replica holds the leader lease"

kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -

log "a minimal WsCluster becomes Ready with owned children"
kubectl -n "$NS" apply -f "$ROOT/examples/minimal.yaml"
kubectl -n "$NS" wait wsc/chat --for=condition=Ready --timeout="$TIMEOUT"
kubectl -n "$NS" get wsc chat
uid="$(kubectl -n "$NS" get wsc chat -o jsonpath='{.metadata.uid}')"
for child in deployment/chat service/chat poddisruptionbudget/chat secret/chat-api-key; do
  owner="$(kubectl -n "$NS" get "$child" -o jsonpath='{.metadata.ownerReferences[0].uid}')"
  [[ "$owner" == "$uid" ]] || fail "$child is not owned by wsc/chat"
done
[[ "$(kubectl -n "$NS" get wsc chat -o jsonpath='{.status.keyPrefix}')" == "$NS.chat" ]] \
  || fail "default key prefix is not <namespace>.<name>"

log "the HTTP API answers with the generated key"
key="$(kubectl -n "$NS" get secret chat-api-key -o jsonpath='{.data.key}' | base64 -d)"
kubectl -n "$NS" port-forward svc/chat 18080:8080 >/dev/null 2>&1 &
pf=$!
code=000
for _ in $(seq 1 50); do # wait for the port-forward to accept connections (000 = no connection)
  code="$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" http://127.0.0.1:18080/api/stats || true)"
  [[ "$code" != 000 ]] && break
  sleep 0.2
done
kill "$pf" || true
[[ "$code" == 200 ]] || fail "GET /api/stats with the generated key answered $code"

log "Redis-backed cluster: scale with kubectl scale"
kubectl -n "$NS" apply -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: { name: redis }
spec:
  selector: { matchLabels: { app: redis } }
  template:
    metadata: { labels: { app: redis } }
    spec:
      containers:
        - name: redis
          image: docker.io/library/redis:7-alpine
          ports: [{ containerPort: 6379 }]
---
apiVersion: v1
kind: Service
metadata: { name: redis }
spec:
  selector: { app: redis }
  ports: [{ port: 6379 }]
YAML
kubectl -n "$NS" rollout status deploy/redis --timeout="$TIMEOUT"
kubectl -n "$NS" apply -f - <<YAML
apiVersion: wsgate.io/v1alpha1
kind: WsCluster
metadata: { name: fanout }
spec:
  replicas: 2
  redis: { url: "redis://redis.$NS.svc.cluster.local:6379" }
YAML
kubectl -n "$NS" wait wsc/fanout --for=condition=Ready --timeout="$TIMEOUT"
kubectl -n "$NS" scale wsc fanout --replicas=3
kubectl -n "$NS" wait wsc/fanout --for=jsonpath='{.status.readyReplicas}'=3 --timeout="$TIMEOUT"
kubectl -n "$NS" get wsc

log "autoscaling creates an HPA, removing it deletes the HPA"
kubectl -n "$NS" patch wsc fanout --type=merge -p \
  '{"spec":{"autoscaling":{"minReplicas":2,"maxReplicas":4,"targetCPUUtilizationPercentage":80}}}'
kubectl -n "$NS" wait hpa/fanout --for=jsonpath='{.spec.maxReplicas}'=4 --timeout="$TIMEOUT"
kubectl -n "$NS" patch wsc fanout --type=json -p '[{"op":"remove","path":"/spec/autoscaling"}]'
kubectl -n "$NS" wait hpa/fanout --for=delete --timeout="$TIMEOUT"

log "the API server rejects every invalid example"
for bad in "$ROOT"/examples/invalid/*.yaml; do
  # The API server words schema errors differently from the jsonschema crate used in cargo test.
  expected="$(sed -n 's/^# apiserver-expect: //p' "$bad")"
  [[ -n "$expected" ]] || expected="$(sed -n 's/^# expect: //p' "$bad")"
  if out="$(kubectl -n "$NS" apply --dry-run=server -f "$bad" 2>&1)"; then
    fail "$(basename "$bad") was accepted"
  fi
  grep -qF "$expected" <<<"$out" || fail "$(basename "$bad"): expected \"$expected\", got: $out"
done

log "deleting a WsCluster garbage-collects its children"
kubectl -n "$NS" delete wsc chat --wait=true
kubectl -n "$NS" wait deployment/chat --for=delete --timeout="$TIMEOUT"
kubectl -n "$NS" wait secret/chat-api-key --for=delete --timeout="$TIMEOUT"

log "end-to-end test passed"
