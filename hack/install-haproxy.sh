#!/usr/bin/env bash
# Makes sure HAProxy exists (the agent tests run it in TCP mode in front of real nodes); installs
# Debian's when missing. Nothing runs as a system service: the tests start their own.
set -euo pipefail
if command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ]; then exit 0; fi
echo "==> HAProxy not found; installing Debian's haproxy"
if [ "$(id -u)" -ne 0 ]; then
  echo "error: need root to apt-get install haproxy" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq haproxy >/dev/null
# Debian starts a system service on install; we do not use it.
(systemctl stop haproxy || service haproxy stop) >/dev/null 2>&1 || true
echo "==> HAProxy installed"
