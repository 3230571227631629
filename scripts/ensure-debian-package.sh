#!/usr/bin/env bash
# Usage: ensure-debian-package.sh COMMAND PACKAGE WHY
# Installs Debian's PACKAGE when COMMAND is missing and we may install it (root + apt-get).
# Never fails the caller: without it, the suite that needs it skips (or, in CI, fails loudly).
set -u
command_name="$1" package="$2" why="$3"
if command -v "$command_name" >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian $package for $why (one-time)..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null) \
        || echo "warning: could not install $package; $why will be skipped or degraded" >&2
else
    echo "note: $command_name not found and cannot be installed here; $why will be skipped or degraded" >&2
fi
exit 0
