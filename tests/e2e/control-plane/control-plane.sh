#!/usr/bin/env bash
# A real Kubernetes control plane as local processes, for the e2e suite: etcd, kube-apiserver
# (RBAC authorization, default admission plugins, service-account tokens, front proxy for
# aggregated APIs), kube-controller-manager, kube-scheduler, and kwok running fake nodes (pods
# are scheduled and marked Running; nothing is executed). Everything listens on 127.0.0.1 on
# free ports, with certificates made by openssl.
#
#   control-plane.sh run DIR -- CMD ARGS...   start, run CMD with KUBECONFIG set, stop (also on failure)
#   control-plane.sh start DIR                start and leave running; DIR/env says how to reach it
#   control-plane.sh stop DIR                 kill every process started in DIR (by PID)
#
# DIR is created and holds certificates, data, logs (DIR/logs) and DIR/kubeconfig (admin, as
# system:masters). The binaries come from tests/e2e/tools/build.sh (or $E2E_BIN).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NODES="${E2E_NODES:-3}"
# Generous: a loaded 2-core machine starts kube-apiserver in 10-30 s.
START_TIMEOUT="${E2E_START_TIMEOUT:-180}"

log() { printf '==> %s\n' "$*" >&2; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Starts a process in the background, records its PID, sends its output to DIR/logs/NAME.log.
spawn() { # name, command...
  local name="$1"; shift
  "$@" >"$DIR/logs/$name.log" 2>&1 &
  echo "$! $name" >>"$DIR/pids"
}

# Waits until "$@" succeeds; fails naming WHAT (with the log's tail) after START_TIMEOUT.
wait_for() { # what, log-name, command...
  local what="$1" name="$2"; shift 2
  local deadline=$((SECONDS + START_TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    if ! alive "$name"; then
      tail -40 "$DIR/logs/$name.log" >&2 || true
      fail "$what exited during start-up"
    fi
    if ((SECONDS > deadline)); then
      tail -40 "$DIR/logs/$name.log" >&2 || true
      fail "$what not ready after ${START_TIMEOUT}s"
    fi
    sleep 0.2
  done
}

alive() { # name
  local pid
  pid="$(awk -v n="$1" '$2 == n { print $1 }' "$DIR/pids")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

certs() {
  local c="$DIR/pki"
  mkdir -p "$c"
  (
    cd "$c"
    openssl_quiet() { openssl "$@" 2>/dev/null; }
    # Cluster CA, API server serving certificate, admin client certificate.
    openssl_quiet req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 \
      -subj "/CN=wsgate-e2e-ca"
    openssl_quiet req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
      -subj "/CN=kube-apiserver"
    printf 'subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' >apiserver.ext
    openssl_quiet x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out apiserver.crt -days 2 -extfile apiserver.ext
    openssl_quiet req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr \
      -subj "/O=system:masters/CN=wsgate-e2e-admin"
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl_quiet x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out admin.crt -days 2 -extfile client.ext
    # Service-account token signing key.
    openssl_quiet genrsa -out sa.key 2048
    openssl_quiet rsa -in sa.key -pubout -out sa.pub
    # Front proxy (aggregated APIs such as custom.metrics.k8s.io).
    openssl_quiet req -x509 -newkey rsa:2048 -nodes -keyout front-proxy-ca.key \
      -out front-proxy-ca.crt -days 2 -subj "/CN=wsgate-e2e-front-proxy-ca"
    openssl_quiet req -newkey rsa:2048 -nodes -keyout front-proxy-client.key \
      -out front-proxy-client.csr -subj "/CN=front-proxy-client"
    openssl_quiet x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt \
      -CAkey front-proxy-ca.key -CAcreateserial -out front-proxy-client.crt -days 2 \
      -extfile client.ext
  )
}

kubeconfig() { # server-url
  cat >"$DIR/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: $1
    certificate-authority: $DIR/pki/ca.crt
users:
- name: admin
  user:
    client-certificate: $DIR/pki/admin.crt
    client-key: $DIR/pki/admin.key
contexts:
- name: e2e
  context: { cluster: e2e, user: admin, namespace: default }
current-context: e2e
EOF
}

nodes() {
  local i
  for ((i = 0; i < NODES; i++)); do
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
  labels:
    type: kwok
    kubernetes.io/hostname: kwok-node-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    topology.kubernetes.io/zone: zone-$((i % 3))
EOF
  done
}

start() {
  [[ -n "${E2E_BIN:-}" ]] || E2E_BIN="$("$HERE/../tools/build.sh")"
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kwok kubectl; do
    [[ -x "$E2E_BIN/$b" ]] || fail "$E2E_BIN/$b is missing (tests/e2e/tools/build.sh builds it)"
  done
  command -v openssl >/dev/null || fail "openssl is required"
  mkdir -p "$DIR/logs"
  : >"$DIR/pids"
  local started=$SECONDS
  certs

  local etcd_port etcd_peer api_port kcm_port sched_port kwok_port
  etcd_port="$(free_port)"; etcd_peer="$(free_port)"; api_port="$(free_port)"
  kcm_port="$(free_port)"; sched_port="$(free_port)"; kwok_port="$(free_port)"

  log "etcd on 127.0.0.1:$etcd_port"
  spawn etcd "$E2E_BIN/etcd" --name e2e --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "e2e=http://127.0.0.1:$etcd_peer" \
    --listen-metrics-urls "" --unsafe-no-fsync --log-level warn
  wait_for etcd etcd curl -fsS "http://127.0.0.1:$etcd_port/health"

  log "kube-apiserver on https://127.0.0.1:$api_port"
  local p="$DIR/pki"
  spawn kube-apiserver "$E2E_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --cert-dir "$p" --tls-cert-file "$p/apiserver.crt" --tls-private-key-file "$p/apiserver.key" \
    --client-ca-file "$p/ca.crt" \
    --authorization-mode Node,RBAC \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$p/sa.pub" --service-account-signing-key-file "$p/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 \
    --requestheader-client-ca-file "$p/front-proxy-ca.crt" \
    --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User \
    --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$p/front-proxy-client.crt" \
    --proxy-client-key-file "$p/front-proxy-client.key" \
    --enable-aggregator-routing=true \
    --audit-policy-file "$HERE/audit-policy.yaml" --audit-log-path "$DIR/audit.log" \
    --audit-log-format json --audit-log-mode blocking \
    --profiling=false --v=1
  wait_for kube-apiserver kube-apiserver curl -fsS --cacert "$p/ca.crt" --cert "$p/admin.crt" \
    --key "$p/admin.key" "https://127.0.0.1:$api_port/readyz"
  kubeconfig "https://127.0.0.1:$api_port"
  export KUBECONFIG="$DIR/kubeconfig"

  log "kube-controller-manager, kube-scheduler"
  spawn kube-controller-manager "$E2E_BIN/kube-controller-manager" \
    --kubeconfig "$KUBECONFIG" --authentication-kubeconfig "$KUBECONFIG" \
    --authorization-kubeconfig "$KUBECONFIG" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" --leader-elect=false \
    --root-ca-file "$p/ca.crt" --service-account-private-key-file "$p/sa.key" \
    --use-service-account-credentials=true \
    --controllers '*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route' \
    --horizontal-pod-autoscaler-sync-period 5s --profiling=false --v=1
  spawn kube-scheduler "$E2E_BIN/kube-scheduler" \
    --kubeconfig "$KUBECONFIG" --authentication-kubeconfig "$KUBECONFIG" \
    --authorization-kubeconfig "$KUBECONFIG" \
    --bind-address 127.0.0.1 --secure-port "$sched_port" --leader-elect=false --profiling=false
  wait_for kube-controller-manager kube-controller-manager curl -fsSk "https://127.0.0.1:$kcm_port/healthz"
  wait_for kube-scheduler kube-scheduler curl -fsSk "https://127.0.0.1:$sched_port/healthz"

  log "kwok with $NODES fake nodes"
  spawn kwok "$E2E_BIN/kwok" --kubeconfig "$KUBECONFIG" \
    --config "$HERE/kwok-stages.yaml" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --node-lease-duration-seconds 40 \
    --cidr 10.244.0.0/16 --node-ip 10.250.0.1 \
    --server-address "127.0.0.1:$kwok_port"
  nodes | "$E2E_BIN/kubectl" apply -f - >/dev/null
  wait_for "fake nodes Ready" kwok "$E2E_BIN/kubectl" wait node -l type=kwok \
    --for=condition=Ready --timeout=5s
  # The default ServiceAccount of "default" must exist before pods can be created there.
  wait_for "default service account" kube-controller-manager "$E2E_BIN/kubectl" get serviceaccount default

  cat >"$DIR/env" <<EOF
export KUBECONFIG=$DIR/kubeconfig
export E2E_BIN=$E2E_BIN
export E2E_DIR=$DIR
export E2E_API_SERVER=https://127.0.0.1:$api_port
export E2E_AUDIT_LOG=$DIR/audit.log
export PATH=$E2E_BIN:\$PATH
EOF
  log "control plane up in $((SECONDS - started)) s: source $DIR/env"
}

stop() {
  [[ -f "$DIR/pids" ]] || return 0
  local pid name
  # Reverse start order: kwok and controllers before the API server, etcd last.
  tac "$DIR/pids" | while read -r pid name; do
    kill "$pid" 2>/dev/null || true
  done
  local deadline=$((SECONDS + 20))
  while read -r pid name; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done <"$DIR/pids"
  rm -f "$DIR/pids"
}

cmd="${1:-}"
DIR="${2:-}"
[[ -n "$cmd" && -n "$DIR" ]] || fail "usage: $0 run|start|stop DIR [-- CMD...]"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
case "$cmd" in
  start)
    trap 'rc=$?; if [[ $rc -ne 0 ]]; then stop; fi' EXIT
    start
    ;;
  stop) stop ;;
  run)
    shift 2
    [[ "${1:-}" == "--" ]] && shift
    [[ $# -gt 0 ]] || fail "run needs a command after --"
    trap 'stop' EXIT
    trap 'exit 130' INT TERM
    start
    # shellcheck disable=SC1091
    source "$DIR/env"
    "$@"
    ;;
  *) fail "unknown command: $cmd" ;;
esac
