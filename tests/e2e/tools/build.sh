#!/usr/bin/env bash
# Builds the e2e tools from the pinned Go modules next to this script (kubernetes: kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl; etcd; kwok; helm) into a cache folder keyed by
# each module's go.mod + go.sum, so a second run reuses them. Prints the folder holding all the
# binaries (symlinks), the only line on stdout.
#
#   tests/e2e/tools/build.sh [TOOL...]     # default: every tool
#   tests/e2e/tools/build.sh crds          # prints the folder of the pinned prometheus-operator CRDs
#
# WSGATE_TOOLS_CACHE overrides the cache folder (default ~/.cache/wsgate-tools).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${WSGATE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wsgate-tools}"
BIN="$CACHE/bin"

log() { printf '==> %s\n' "$*" >&2; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

if ! command -v go >/dev/null 2>&1; then
  if [[ -x /usr/local/go/bin/go ]]; then PATH="/usr/local/go/bin:$PATH"; else fail "go is required (Go 1.26)"; fi
fi
# go.sum is complete and must stay so: never let a build edit it.
export GOFLAGS=-mod=readonly
export CGO_ENABLED=0

# The version a module pins, read from its go.mod require line.
pinned() { # module-dir, module-path
  awk -v m="$2" '$1 == m { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$HERE/$1/go.mod"
}

# Packages of each module and the binary name of each.
packages() {
  case "$1" in
    kubernetes) echo "kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler kubectl=k8s.io/kubernetes/cmd/kubectl" ;;
    etcd) echo "etcd=go.etcd.io/etcd/server/v3" ;;
    kwok) echo "kwok=sigs.k8s.io/kwok/cmd/kwok" ;;
    helm) echo "helm=helm.sh/helm/v4/cmd/helm" ;;
    *) fail "unknown tool module: $1" ;;
  esac
}

# Link-time version stamps, so that the binaries report the version they were built from
# (helm compares a chart's kubeVersion with the API server's, kubectl warns about skew).
ldflags() {
  local v
  case "$1" in
    kubernetes)
      v="$(pinned kubernetes k8s.io/kubernetes)"
      local major="${v#v}"; major="${major%%.*}"
      local minor="${v#v*.}"; minor="${minor%%.*}"
      local stamp=""
      for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        stamp+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
      done
      echo "-s -w$stamp" ;;
    etcd) echo "-s -w" ;;
    kwok) echo "-s -w" ;;
    helm)
      v="$(pinned helm helm.sh/helm/v4)"
      echo "-s -w -X helm.sh/helm/v4/internal/version.version=$v" ;;
  esac
}

build() { # module-dir
  local mod="$1" key out
  key="$(cat "$HERE/$mod/go.mod" "$HERE/$mod/go.sum" | sha256sum | cut -c1-16)"
  out="$CACHE/$mod-$key"
  if [[ ! -e "$out/.complete" ]]; then
    log "building $mod tools into $out (first run only)"
    rm -rf "$out.part" && mkdir -p "$out.part"
    local start=$SECONDS
    for pair in $(packages "$mod"); do
      (cd "$HERE/$mod" && go build -trimpath -ldflags "$(ldflags "$mod")" -o "$out.part/${pair%%=*}" "${pair#*=}")
    done
    touch "$out.part/.complete"
    rm -rf "$out" && mv "$out.part" "$out"
    log "built $mod in $((SECONDS - start)) s"
  fi
  mkdir -p "$BIN"
  for pair in $(packages "$mod"); do
    ln -sfn "$out/${pair%%=*}" "$BIN/${pair%%=*}"
  done
}

if [[ "${1:-}" == crds ]]; then
  # The module cache checks the download against go.sum.
  dir="$(cd "$HERE/crds" && go mod download -json github.com/prometheus-operator/prometheus-operator \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -d "$dir/example/prometheus-operator-crd" ]] || fail "prometheus-operator module has no CRD folder"
  echo "$dir/example/prometheus-operator-crd"
  exit 0
fi

tools=("$@")
[[ ${#tools[@]} -gt 0 ]] || tools=(helm etcd kwok kubernetes)
for t in "${tools[@]}"; do build "$t"; done
echo "$BIN"
