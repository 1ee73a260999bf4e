#!/usr/bin/env bash
# Build the Kubernetes control plane the cluster test tier runs on, from source, through the Go module
# proxy: kube-apiserver, kube-controller-manager, kube-scheduler, etcd, kwok and helm.
#
# Why from source: no Docker engine runs on the development and CI machines, so kind cannot start a
# cluster, and the only reachable registry with these programs is the Go module proxy. These are the same
# programs controller-runtime's envtest runs (kube-apiserver, etcd and, for workloads, the controller
# manager and scheduler); kwok stands in for kubelets and needs its stage definitions in --config.
#
# Why a wrapper module: k8s.io/kubernetes cannot be `go install`ed. Its go.mod requires every staging
# module (k8s.io/api, k8s.io/client-go, ...) at v0.0.0 and replaces it with ./staging/src/...; replace
# directives of a dependency are ignored, so we build inside a tiny module of our own that requires
# k8s.io/kubernetes and replaces each staging module (the list is read from that release's go.mod, it
# changes between releases) with its published v0.Y.Z. etcd is built in the same module at the version
# the Kubernetes release pins, because etcd's own go.mod has relative replace lines too. kwok and helm
# have no replace lines and are plain `go install`s, kept apart so they do not move shared libraries.
#
# Cache layout (outside the checkout, keyed by version, reused by CI):
#   $DSM_CACHE_DIR/k8s/<K8S_VERSION>/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,etcd}
#   $DSM_CACHE_DIR/k8s/tools/kwok-<KWOK_VERSION>/{kwok,stages/*.yaml}
#   $DSM_CACHE_DIR/k8s/tools/helm-<HELM_VERSION>/helm
#   $DSM_CACHE_DIR/go/{mod,build,path}       GOMODCACHE, GOCACHE, GOPATH
# A binary is rebuilt only when it is missing; each is moved into place only after a complete build.
#
# Without Go the script cannot build anything: it says so on one loud line and exits 0, so that
# `make test` still runs the other tiers (the cluster tier then skips itself) -- unless CI=true, where it
# exits 1 so that CI can never pass without the cluster tier.
#
# Environment: DSM_CACHE_DIR (default ~/.cache/dsm), GO (path to the go binary), DSM_K8S_BUILD_PROCS
# (go build -p, default 2: 2 cores; a higher value mostly costs memory).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${DSM_CACHE_DIR:-$HOME/.cache/dsm}"
k8s_bin="$cache/k8s/$K8S_VERSION/bin"
kwok_dir="$cache/k8s/tools/kwok-$KWOK_VERSION"
helm_dir="$cache/k8s/tools/helm-$HELM_VERSION"
procs="${DSM_K8S_BUILD_PROCS:-2}"

log() { printf '==> %s\n' "$*" >&2; }
loud() { printf '\n!!!!!! %s\n\n' "$*" >&2; }

missing=()
for b in kube-apiserver kube-controller-manager kube-scheduler etcd; do
    [[ -x "$k8s_bin/$b" ]] || missing+=("$b")
done
[[ -x "$kwok_dir/kwok" && -f "$kwok_dir/stages/pod-ready.yaml" ]] || missing+=(kwok)
[[ -x "$helm_dir/helm" ]] || missing+=(helm)

if ((${#missing[@]} == 0)); then
    log "Kubernetes $K8S_VERSION control plane, kwok $KWOK_VERSION, helm $HELM_VERSION: cached in $cache/k8s"
    exit 0
fi

# GO names the toolchain explicitly; otherwise go on PATH, otherwise the usual tarball location.
if [[ -n "${GO:-}" ]]; then
    go_bin="$(command -v "$GO" || true)"
else
    go_bin="$(command -v go || true)"
    [[ -n "$go_bin" || ! -x /usr/local/go/bin/go ]] || go_bin=/usr/local/go/bin/go
fi
if [[ -z "$go_bin" ]]; then
    loud "CLUSTER TIER UNAVAILABLE: no Go toolchain (${GO:-go}) to build ${missing[*]}; install Go >= 1.26 or set GO=/path/to/go. Cluster tests will be skipped$([[ "${CI:-}" == "true" ]] && echo ' -- and CI=true, so this is an error')."
    [[ "${CI:-}" == "true" ]] && exit 1
    exit 0
fi

export GOPATH="$cache/go/path" GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build"
export GOTOOLCHAIN=local GOFLAGS="-buildvcs=false" CGO_ENABLED=0
mkdir -p "$GOPATH" "$GOMODCACHE" "$GOCACHE" "$k8s_bin" "$kwok_dir" "$helm_dir"

# One build at a time per cache: test runs of several people (or CI jobs) may share it. Whoever waits
# re-execs once the lock is free and then finds the binaries cached.
if command -v flock >/dev/null && [[ -z "${DSM_K8S_BUILD_LOCKED:-}" ]]; then
    exec 9>"$cache/k8s/.build.lock"
    if ! flock -n 9; then
        log "another build holds $cache/k8s/.build.lock; waiting for it"
        flock 9
    fi
    DSM_K8S_BUILD_LOCKED=1 exec "$0" "$@"
fi

# Peak memory per step, when GNU time is installed (apt-get install time).
timed=()
[[ -x /usr/bin/time ]] && timed=(/usr/bin/time -f '    peak RSS %M KiB, %e s wall, %U s user')

total=${#missing[@]}
step=0
started=$SECONDS
log "building ${missing[*]} with $("$go_bin" version | cut -d' ' -f3) (cache $cache)"

# --- kube-* and etcd, inside the wrapper module ------------------------------------------------------
k8s_missing=()
for b in "${missing[@]}"; do
    case "$b" in kwok | helm) ;; *) k8s_missing+=("$b") ;; esac
done

if ((${#k8s_missing[@]})); then
    wrapper="$cache/k8s/$K8S_VERSION/wrapper"
    if [[ ! -f "$wrapper/go.sum" ]]; then
        log "preparing wrapper module for k8s.io/kubernetes $K8S_VERSION (downloads modules on a cold cache)"
        t0=$SECONDS
        rm -rf "$wrapper" && mkdir -p "$wrapper"
        (
            cd "$wrapper"
            "$go_bin" mod init dsm.local/k8s-build >/dev/null 2>&1
            gomod="$("$go_bin" mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
                sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
            staging_minor="v0.${K8S_VERSION#v1.}"
            edits=(-require="k8s.io/kubernetes@$K8S_VERSION" -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION")
            while read -r mod; do
                edits+=(-replace="$mod=$mod@$staging_minor")
            done < <(sed -n 's#^[[:space:]]*\([^[:space:]]*\) => \./staging/src/.*#\1#p' "$gomod")
            ((${#edits[@]} > 10)) || { echo "no staging replace lines found in $gomod" >&2; exit 1; }
            # Newest go directive wins; the wrapper must accept what k8s.io/kubernetes declares.
            go_line="$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod")"
            "$go_bin" mod edit -go="$go_line" "${edits[@]}"
            cat >tools.go <<'GO'
//go:build tools

// Package tools pins the commands built from this wrapper module (see hack/k8s/build.sh).
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
GO
            "$go_bin" mod tidy
            # Fail early if MVS moved etcd or kubernetes away from the pins.
            for pin in "k8s.io/kubernetes $K8S_VERSION" "go.etcd.io/etcd/server/v3 $ETCD_VERSION"; do
                got="$("$go_bin" list -m -f '{{.Path}} {{.Version}}' "${pin% *}")"
                [[ "$got" == "$pin" ]] || { echo "wrapper resolved $got, expected $pin" >&2; exit 1; }
            done
        )
        log "wrapper module ready ($((SECONDS - t0)) s)"
    fi

    minor="${K8S_VERSION#v1.}"
    minor="${minor%%.*}"
    date_now="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    vflags=""
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        vflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        vflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date_now"
    done

    for b in "${k8s_missing[@]}"; do
        step=$((step + 1))
        case "$b" in
            etcd) pkg=go.etcd.io/etcd/server/v3 flags="-s -w" ;;
            *) pkg="k8s.io/kubernetes/cmd/$b" flags="-s -w$vflags" ;;
        esac
        log "building $b ($step/$total) from $pkg"
        t0=$SECONDS
        (cd "$wrapper" && "${timed[@]}" "$go_bin" build -p "$procs" -trimpath -tags selinux,notest \
            -ldflags "$flags" -o "$k8s_bin/.$b.tmp" "$pkg")
        mv -f "$k8s_bin/.$b.tmp" "$k8s_bin/$b"
        log "built $b in $((SECONDS - t0)) s -> $k8s_bin/$b"
    done
fi

# --- kwok and helm, plain go install at a pinned version ---------------------------------------------
for b in "${missing[@]}"; do
    case "$b" in
        kwok)
            step=$((step + 1))
            log "building kwok ($step/$total) sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
            t0=$SECONDS
            tmp="$(mktemp -d "$kwok_dir/.build.XXXX")"
            GOBIN="$tmp" "${timed[@]}" "$go_bin" install -p "$procs" -trimpath \
                -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" \
                "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
            # Stage definitions ship in the module, not in the binary; kwok needs them in --config.
            # (tests/k8s/kwok/ replaces pod-delete.yaml at run time: see hack/k8s/README.md.)
            src="$GOMODCACHE/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage"
            mkdir -p "$tmp/stages"
            cp "$src/node/fast/node-initialize.yaml" "$src/node/heartbeat/node-heartbeat.yaml" \
                "$src/pod/fast/pod-ready.yaml" "$src/pod/fast/pod-complete.yaml" \
                "$src/pod/fast/pod-delete.yaml" "$tmp/stages/"
            chmod -R u+w "$tmp"
            rm -rf "$kwok_dir/stages"
            mv "$tmp/stages" "$kwok_dir/stages"
            mv -f "$tmp/kwok" "$kwok_dir/kwok"
            rm -rf "$tmp"
            log "built kwok in $((SECONDS - t0)) s -> $kwok_dir"
            ;;
        helm)
            step=$((step + 1))
            log "building helm ($step/$total) helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
            t0=$SECONDS
            hmod="$("$go_bin" mod download -json "helm.sh/helm/v3@$HELM_VERSION" |
                sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
            # Helm's own Makefile derives the Kubernetes version it assumes from its client-go; without
            # these flags `helm template` claims Kubernetes 1.20 and kubeVersion checks misfire.
            cg="$(sed -n 's/^[[:space:]]*k8s.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "$hmod" | head -1)"
            hflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
            hflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
            for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
                hflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$cg"
            done
            tmp="$(mktemp -d "$helm_dir/.build.XXXX")"
            GOBIN="$tmp" "${timed[@]}" "$go_bin" install -p "$procs" -trimpath -ldflags "$hflags" \
                "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
            mv -f "$tmp/helm" "$helm_dir/helm"
            rm -rf "$tmp"
            log "built helm in $((SECONDS - t0)) s -> $helm_dir/helm"
            ;;
    esac
done

log "done: built ${missing[*]} in $((SECONDS - started)) s"
