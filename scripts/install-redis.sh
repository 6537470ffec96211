#!/bin/sh
# Installs a redis-server binary when none is on PATH. Debian/Ubuntu: apt-get.
# Elsewhere install Redis >= 7 with your package manager (brew install redis,
# dnf install redis, ...) and re-run; the tests only need the binary.
set -eu
if command -v redis-server >/dev/null 2>&1; then exit 0; fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "==> installing redis-server with apt-get"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
else
  echo "redis-server not found: install Redis 7 or newer with your package manager, then re-run" >&2
  exit 1
fi
