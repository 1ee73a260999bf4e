#!/usr/bin/env bash
# Build the node and operator images (node_image/Dockerfile, operator/Dockerfile): `make images`.
#
# Engine: Docker when a Docker engine answers, otherwise podman with the runc runtime (crun cannot
# set up cgroups on our machines); DSM_CONTAINER_ENGINE=podman|docker decides instead. When podman is
# missing and we are root, Debian's podman, runc and mmdebstrap are installed.
#
# Base image: DSM_BASE_IMAGE when set. Otherwise Docker builds on the Dockerfiles' default (the
# official slim Python image, pulled), and podman -- assumed to have no registry, as on our machines
# and CI -- on a Debian base made by hack/images/base.sh (mmdebstrap), cached like the control plane.
#
# Dependencies: a wheelhouse of requirements/operator.txt + build.txt (a superset of node.txt, same
# pins) is downloaded on the host with the host's pip (its CA bundle, its cache) and handed to the
# build as the `wheels` stage; the builds then run with --network none.
#
# Every run builds: the engine's layer cache makes an unchanged tree cost seconds, and a source
# change always reaches the image (the Dockerfiles COPY the source; see the note there). Tags:
#   <DSM_IMAGE_PREFIX>dsm-node:<version>  <DSM_IMAGE_PREFIX>dsm-operator:<version>
# (prefix "localhost/" by default, version from pyproject.toml; DSM_IMAGE_TAG overrides it), with
# OCI labels: version, revision (git commit, "-dirty" when the build context has uncommitted
# changes), created (the commit's time: reproducible), base image, licence.
#
# Without an engine: one loud line and exit 0 (image tests skip), or exit 1 with CI=true.
# Environment: DSM_CACHE_DIR, DSM_CONTAINER_ENGINE, DSM_BASE_IMAGE, DSM_IMAGE_PREFIX, DSM_IMAGE_TAG,
# DSM_IMAGES (default "node operator"), PYTHON (for pip download, default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
here=hack/images
cache="${DSM_CACHE_DIR:-$HOME/.cache/dsm}/images"
python="${PYTHON:-python3}"
prefix="${DSM_IMAGE_PREFIX-localhost/}"
images="${DSM_IMAGES:-node operator}"

log() { printf '==> %s\n' "$*" >&2; }
loud() { printf '\n!!!!!! %s\n\n' "$*" >&2; }
unavailable() {
    loud "IMAGES UNAVAILABLE: $*; image tests will be skipped$([[ "${CI:-}" == "true" ]] && echo ' -- and CI=true, so this is an error')."
    [[ "${CI:-}" == "true" ]] && exit 1
    exit 0
}

engine="${DSM_CONTAINER_ENGINE:-}"
if [[ -z "$engine" ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker; else engine=podman; fi
fi
if [[ "$engine" == podman ]] && ! { command -v podman && command -v runc && command -v mmdebstrap; } >/dev/null; then
    if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null; then
        unavailable "podman, runc and mmdebstrap are needed (apt-get install podman runc mmdebstrap)"
    fi
    log "installing Debian's podman, runc and mmdebstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq podman runc mmdebstrap >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq podman runc mmdebstrap >/dev/null; }
fi
command -v "$engine" >/dev/null || unavailable "no $engine"

version="${DSM_IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)}"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [[ "$revision" != unknown ]] &&
    [[ -n "$(git status --porcelain -- pyproject.toml README.md requirements node_image operator 2>/dev/null)" ]]; then
    revision+="-dirty"
fi
created="$(git log -1 --format=%cI 2>/dev/null || echo 1970-01-01T00:00:00Z)"
source_url="$(git remote get-url origin 2>/dev/null || true)"

build=("$engine" build)
run_opts=()
if [[ "$engine" == podman ]]; then
    build+=(--runtime runc --pull=never --ulimit "nofile=$(ulimit -Hn)" --ulimit nproc=32768)
else
    build=(docker buildx build --load)
fi
base="${DSM_BASE_IMAGE:-}"
if [[ -z "$base" && "$engine" == podman ]]; then
    base="$("$here/base.sh" "$engine")"
fi

# The wheelhouse: every wheel of the pinned dependencies for the images' platform (CPython 3.11,
# glibc 2.36 = bookworm). pip checks each file against the lock's hashes.
arch="$(uname -m)"
key="$(cat requirements/operator.txt requirements/build.txt | sha256sum | cut -c1-12)"
wheels="$cache/wheels/$arch-cp311-$key"
if [[ ! -f "$wheels/.complete" ]]; then
    log "downloading the pinned wheels into $wheels"
    rm -rf "$wheels" && mkdir -p "$wheels"
    platforms=(--platform "manylinux2014_$arch")
    for m in $(seq 17 36); do platforms+=(--platform "manylinux_2_${m}_$arch"); done
    "$python" -m pip download -q --disable-pip-version-check --require-hashes --only-binary=:all: \
        "${platforms[@]}" --python-version 3.11 --implementation cp \
        -r requirements/operator.txt -r requirements/build.txt -d "$wheels"
    touch "$wheels/.complete"
fi

started=$SECONDS
for name in $images; do
    case "$name" in
        node) dockerfile=node_image/Dockerfile ;;
        operator) dockerfile=operator/Dockerfile ;;
        *) echo "unknown image $name (node, operator)" >&2; exit 2 ;;
    esac
    tag="${prefix}dsm-$name:$version"
    args=(--build-arg "VERSION=$version" --build-arg "REVISION=$revision"
          --build-arg "CREATED=$created" --build-arg "SOURCE=$source_url"
          --build-arg PIP_NO_INDEX=1 --build-context "wheels=$wheels" --network none)
    [[ -n "$base" ]] && args+=(--build-arg "BASE_IMAGE=$base")
    # The same labels again on the command line: buildah serves the Dockerfile's LABEL step from
    # its cache when only the build arguments changed (a new commit with an unchanged tree kept
    # the previous commit's revision); --label is applied to the image itself.
    oci=org.opencontainers.image
    args+=(--label "$oci.version=$version" --label "$oci.revision=$revision"
           --label "$oci.created=$created" --label "$oci.source=$source_url")
    [[ -n "$base" ]] && args+=(--label "$oci.base.name=$base")
    log "building $tag ($dockerfile, base ${base:-the Dockerfile default}, $engine)"
    t0=$SECONDS
    "${build[@]}" "${args[@]}" -f "$dockerfile" -t "$tag" . >"$cache/build-$name.log" 2>&1 || {
        tail -40 "$cache/build-$name.log" >&2
        echo "building $tag failed; full log: $cache/build-$name.log" >&2
        exit 1
    }
    size="$("$engine" image inspect --format '{{.Size}}' "$tag")"
    log "built $tag in $((SECONDS - t0)) s: $((size / 1000000)) MB, revision $revision"
done
# Each build after a source change leaves the previous images' layers untagged; keep the recent
# ones (the layer cache of the next build), drop those older than a day.
[[ "$engine" == podman ]] && podman image prune -f --filter until=24h >/dev/null 2>&1 || true
log "images done in $((SECONDS - started)) s"
