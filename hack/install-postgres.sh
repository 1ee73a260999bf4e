#!/usr/bin/env bash
# Makes sure PostgreSQL server binaries (initdb, pg_ctl, postgres) exist; installs Debian's when missing.
# The tests and `dsm up` start their own server from these binaries; nothing runs as a system service.
set -euo pipefail
for d in ${DSM_PG_BINDIR:-} /usr/lib/postgresql/*/bin /usr/local/pgsql/bin; do
  if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then exit 0; fi
done
if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then exit 0; fi
echo "==> PostgreSQL server binaries not found; installing Debian's postgresql"
if [ "$(id -u)" -ne 0 ]; then
  echo "error: need root to apt-get install postgresql (or set DSM_PG_BINDIR to a PostgreSQL bin directory)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq postgresql >/dev/null
# Debian starts a system cluster on install; we do not use it.
(pg_ctlcluster --help >/dev/null 2>&1 && pg_lsclusters -h 2>/dev/null | awk '{print $1, $2}' | while read -r v c; do pg_ctlcluster "$v" "$c" stop || true; done) || true
echo "==> PostgreSQL installed"
