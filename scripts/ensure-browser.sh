#!/usr/bin/env bash
# Installs Debian's chromium for the browser test when it is missing and we may install it.
# Playwright for Python drives it through executable_path; no browser is downloaded.
set -u
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian chromium for the browser test (one-time)..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: could not install chromium; the browser test will be skipped" >&2
else
    echo "note: chromium not found and cannot be installed here; the browser test will be skipped" >&2
fi
exit 0
