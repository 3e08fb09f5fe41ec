#!/bin/sh
# Installs Debian's chromium for the atlas's browser tests (tests/atlas/test_atlas_view.py).
# Idempotent: does nothing when a chromium is already there. Call it from .ci/run before `make test`.
set -eu

for b in "${NEURONATLAS_CHROMIUM:-}" chromium chromium-browser google-chrome google-chrome-stable; do
    if [ -n "$b" ] && command -v "$b" >/dev/null 2>&1; then
        echo "ci-setup: browser found: $(command -v "$b")"
        exit 0
    fi
done

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci-setup: no chromium and no apt-get; install chromium by hand or set NEURONATLAS_CHROMIUM" >&2
    echo "ci-setup: the browser tests will be skipped" >&2
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null
echo "ci-setup: installed $(chromium --version 2>/dev/null || echo chromium)"
