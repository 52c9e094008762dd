#!/usr/bin/env bash
# Installs what the integration tests need into <cargo target dir>/test-deps, and nothing
# outside it except two Debian packages:
#   - a Python venv with fluent-logger (PyPI), the Python client;
#   - golang-go and golang-github-fluent-fluent-logger-golang-dev (Debian), built offline
#     into the Go client the Docker fluentd log driver uses.
# Safe to run again; it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

target=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
deps="$target/test-deps"
mkdir -p "$deps"

need=()
command -v go >/dev/null 2>&1 || need+=(golang-go)
[ -d /usr/share/gocode/src/github.com/fluent/fluent-logger-golang ] ||
  need+=(golang-github-fluent-fluent-logger-golang-dev)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q --no-install-recommends "${need[@]}" ||
    { $sudo apt-get update -q && $sudo apt-get install -y -q --no-install-recommends "${need[@]}"; }
fi

if ! "$deps/venv/bin/python" -c 'import fluent' >/dev/null 2>&1; then
  echo "deps: creating the Python venv with fluent-logger"
  python3 -m venv "$deps/venv"
  "$deps/venv/bin/pip" install -q --disable-pip-version-check 'fluent-logger==0.11.1'
fi

echo "deps: building the Go client against Debian's fluent-logger-golang"
GOPATH=/usr/share/gocode GO111MODULE=off GOCACHE="$deps/go-cache" GOFLAGS= \
  go build -o "$deps/fluent-go-client" ./tests/clients/go
echo "deps: ready in $deps"
