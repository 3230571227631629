#!/usr/bin/env bash
# Installs Debian's wrk (a native HTTP load generator) for the http benchmark when missing.
# Without it the benchmark falls back to Python clients, which saturate their own CPU first.
set -u
if command -v wrk >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian wrk for the http benchmark (one-time)..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null) \
        || echo "warning: could not install wrk; the http benchmark will use Python clients" >&2
fi
exit 0
