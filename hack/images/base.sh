#!/usr/bin/env bash
# Make (once) a local Debian base image for the Dockerfiles on a machine without a container registry:
# a minimal bookworm root file system with python3 and its venv module, built by mmdebstrap from
# Debian's packages and imported into podman. Prints the image name on stdout.
#
# Usage: hack/images/base.sh ENGINE     (ENGINE: podman or docker; called by hack/images/build.sh)
#
# Cached outside the checkout, keyed by the recipe below:
#   $DSM_CACHE_DIR/images/base/<key>.tar  and the image localhost/dsm-base:bookworm-<key>
# A base older than DSM_BASE_MAX_AGE_DAYS (default 30) is made again, so that Debian's security
# updates reach the images. Measured here: 45-230 s to make (network), 13 s to import, 179 MB.
set -euo pipefail
engine="${1:-podman}"
cache="${DSM_CACHE_DIR:-$HOME/.cache/dsm}/images/base"
mirror="${DSM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security="${DSM_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
max_age_days="${DSM_BASE_MAX_AGE_DAYS:-30}"

# The recipe: python3 (3.11 on bookworm) with venv (the Dockerfiles make /opt/dsm a venv), CA
# certificates, nothing else; no documentation, manual pages or translations; no apt lists.
recipe=(
    --variant=minbase
    --include=python3,python3-venv,ca-certificates
    "--dpkgopt=path-exclude=/usr/share/doc/*"
    "--dpkgopt=path-include=/usr/share/doc/*/copyright"
    "--dpkgopt=path-exclude=/usr/share/man/*"
    "--dpkgopt=path-exclude=/usr/share/info/*"
    "--dpkgopt=path-exclude=/usr/share/locale/*"
    '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*'
    bookworm
)
sources=(
    "deb $mirror bookworm main"
    "deb $mirror bookworm-updates main"
    "deb $security bookworm-security main"
)
key="$(printf '%s\n' "${recipe[@]}" "${sources[@]}" | sha256sum | cut -c1-12)"
image="localhost/dsm-base:bookworm-$key"
tar="$cache/$key.tar"

log() { printf '==> %s\n' "$*" >&2; }

mkdir -p "$cache"
exec 8>"$cache/.lock"
flock 8

if [[ -f "$tar" ]] && [[ -n "$(find "$tar" -mtime +"$max_age_days" 2>/dev/null)" ]]; then
    log "base $key is older than $max_age_days days; making it again for Debian's updates"
    rm -f "$tar"
    "$engine" image rm -f "$image" >/dev/null 2>&1 || true
fi
if [[ ! -f "$tar" ]]; then
    command -v mmdebstrap >/dev/null || { echo "mmdebstrap is not installed" >&2; exit 1; }
    log "making the Debian bookworm base with mmdebstrap (python3, venv, CA certificates)"
    t0=$SECONDS
    mmdebstrap --quiet "${recipe[@]}" "$cache/$key.tmp.tar" "${sources[@]}" >&2
    mv -f "$cache/$key.tmp.tar" "$tar"
    log "base made in $((SECONDS - t0)) s: $tar ($(du -m "$tar" | cut -f1) MB)"
fi
if ! "$engine" image inspect "$image" >/dev/null 2>&1; then
    log "importing $tar as $image"
    "$engine" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        --quiet "$tar" "$image" >/dev/null
fi
echo "$image"
