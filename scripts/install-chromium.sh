#!/bin/sh
# Installs Debian's Chromium (the console tests drive it through Playwright; no browser is downloaded at
# run time) when none is on PATH. Elsewhere install Chromium with your package manager and re-run.
set -eu
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "==> installing chromium with apt-get"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
else
  echo "chromium not found: install Chromium with your package manager, then re-run" >&2
  exit 1
fi
