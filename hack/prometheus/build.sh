#!/usr/bin/env bash
# Build Prometheus and promtool from source through the Go module proxy, and fetch the Prometheus
# Operator's monitoring.coreos.com CRDs, for the monitoring tests (tests/monitoring).
#
# Why from source: the only registry with these programs that the development and CI machines reach
# is the Go module proxy (Debian's prometheus is 2.42, two major versions old). Prometheus 3.x is
# published there as github.com/prometheus/prometheus v0.3xx.y; it has no replace lines, so a plain
# `go install` at the pinned version works. Built without the `builtinassets` tag: the web UI is not
# embedded (the tests use the HTTP API only), which saves the npm build.
#
# Cache layout (outside the checkout, keyed by version, reused by CI; Go caches shared with
# hack/k8s/build.sh):
#   $DSM_CACHE_DIR/prometheus/<PROMETHEUS_MODULE_VERSION>/{prometheus,promtool}
#   $DSM_CACHE_DIR/prometheus-operator/<PROMETHEUS_OPERATOR_VERSION>/crds/monitoring.coreos.com_*.yaml
# Each is moved into place only after it is complete.
#
# Without Go: one loud line and exit 0 (the monitoring tests then skip), or exit 1 with CI=true.
# Environment: DSM_CACHE_DIR (default ~/.cache/dsm), GO (the go binary), DSM_K8S_BUILD_PROCS (go -p).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${DSM_CACHE_DIR:-$HOME/.cache/dsm}"
prom_dir="$cache/prometheus/$PROMETHEUS_MODULE_VERSION"
crd_dir="$cache/prometheus-operator/$PROMETHEUS_OPERATOR_VERSION/crds"
procs="${DSM_K8S_BUILD_PROCS:-2}"
# v0.316.0 -> 3.16.0 (the module's minor number is 300 + the release's minor)
mm="${PROMETHEUS_MODULE_VERSION#v0.}"
prom_release="3.$((10#${mm%%.*} - 300)).${mm#*.}"

log() { printf '==> %s\n' "$*" >&2; }
loud() { printf '\n!!!!!! %s\n\n' "$*" >&2; }

missing=()
[[ -x "$prom_dir/prometheus" ]] || missing+=(prometheus)
[[ -x "$prom_dir/promtool" ]] || missing+=(promtool)
[[ -f "$crd_dir/monitoring.coreos.com_prometheusrules.yaml" &&
   -f "$crd_dir/monitoring.coreos.com_servicemonitors.yaml" ]] || missing+=(crds)
if ((${#missing[@]} == 0)); then
    log "Prometheus $prom_release and prometheus-operator $PROMETHEUS_OPERATOR_VERSION CRDs: cached in $cache"
    exit 0
fi

if [[ -n "${GO:-}" ]]; then
    go_bin="$(command -v "$GO" || true)"
else
    go_bin="$(command -v go || true)"
    [[ -n "$go_bin" || ! -x /usr/local/go/bin/go ]] || go_bin=/usr/local/go/bin/go
fi
if [[ -z "$go_bin" ]]; then
    loud "MONITORING TESTS UNAVAILABLE: no Go toolchain (${GO:-go}) to build ${missing[*]}; install Go >= 1.26 or set GO=/path/to/go. Monitoring tests will be skipped$([[ "${CI:-}" == "true" ]] && echo ' -- and CI=true, so this is an error')."
    [[ "${CI:-}" == "true" ]] && exit 1
    exit 0
fi

export GOPATH="$cache/go/path" GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build"
export GOTOOLCHAIN=local GOFLAGS="-buildvcs=false" CGO_ENABLED=0
mkdir -p "$GOPATH" "$GOMODCACHE" "$GOCACHE" "$prom_dir" "$(dirname "$crd_dir")"

# One build at a time per cache (several test runs may share it); a waiter re-execs and finds it cached.
if command -v flock >/dev/null && [[ -z "${DSM_PROM_BUILD_LOCKED:-}" ]]; then
    exec 9>"$cache/prometheus/.build.lock"
    if ! flock -n 9; then
        log "another build holds $cache/prometheus/.build.lock; waiting for it"
        flock 9
    fi
    DSM_PROM_BUILD_LOCKED=1 exec "$0" "$@"
fi

timed=()
[[ -x /usr/bin/time ]] && timed=(/usr/bin/time -f '    peak RSS %M KiB, %e s wall, %U s user')
started=$SECONDS
log "building ${missing[*]} with $("$go_bin" version | cut -d' ' -f3) (cache $cache)"

for b in prometheus promtool; do
    [[ " ${missing[*]} " == *" $b "* ]] || continue
    t0=$SECONDS
    log "building $b $prom_release from github.com/prometheus/prometheus/cmd/$b@$PROMETHEUS_MODULE_VERSION"
    tmp="$(mktemp -d "$prom_dir/.build.XXXX")"
    ver=github.com/prometheus/common/version
    GOBIN="$tmp" "${timed[@]}" "$go_bin" install -p "$procs" -trimpath \
        -ldflags "-s -w -X $ver.Version=$prom_release -X $ver.Revision=$PROMETHEUS_MODULE_VERSION -X $ver.Branch=module-proxy -X $ver.BuildUser=dsm" \
        "github.com/prometheus/prometheus/cmd/$b@$PROMETHEUS_MODULE_VERSION"
    mv -f "$tmp/$b" "$prom_dir/$b"
    rm -rf "$tmp"
    log "built $b in $((SECONDS - t0)) s -> $prom_dir/$b"
done

if [[ " ${missing[*]} " == *" crds "* ]]; then
    log "fetching monitoring.coreos.com CRDs from github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION"
    src="$("$go_bin" mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [[ -d "$src/example/prometheus-operator-crd" ]] || { echo "no example/prometheus-operator-crd in $src" >&2; exit 1; }
    tmp="$(mktemp -d "$(dirname "$crd_dir")/.crds.XXXX")"
    chmod 755 "$tmp"
    cp "$src"/example/prometheus-operator-crd/monitoring.coreos.com_*.yaml "$tmp/"
    chmod -R u+w "$tmp"
    rm -rf "$crd_dir"
    mv "$tmp" "$crd_dir"
    log "CRDs -> $crd_dir"
fi

log "done: ${missing[*]} in $((SECONDS - started)) s"
