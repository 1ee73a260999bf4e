#!/usr/bin/env bash
# Makes sure a Chromium exists for the console's browser tests (tests/console); installs Debian's
# `chromium` when missing. Playwright drives it through executable_path: Playwright's own browser
# download cannot work on a machine that reaches only package registries.
# DSM_CHROMIUM overrides the path (the tests read the same variable).
set -euo pipefail
chromium=${DSM_CHROMIUM:-/usr/bin/chromium}
if [ -x "$chromium" ]; then exit 0; fi
echo "==> $chromium not found; installing Debian's chromium (for the console's browser tests)"
if [ "$(id -u)" -ne 0 ]; then
  echo "error: need root to apt-get install chromium (or set DSM_CHROMIUM to a Chromium binary)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# fonts-dejavu-core: the console's screenshots and layout use the system's sans-serif font
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "==> chromium installed: $("$chromium" --version 2>/dev/null || echo "$chromium")"
