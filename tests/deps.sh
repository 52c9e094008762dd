#!/usr/bin/env bash
# Installs what the integration tests need into <cargo target dir>/test-deps, and nothing
# outside it except two Debian packages:
#   - a Python venv with fluent-logger (the Python client), moto[server] (an AWS emulator
#     for Kinesis, Firehose and S3), boto3, aws-kinesis-agg and zstandard (to create
#     and read streams, deaggregating with AWS's own library), and prometheus-client (whose
#     parser reads /metrics);
#   - kinesis-local from npm, a second, independent Kinesis emulator;
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

if ! "$deps/venv/bin/python" -c 'import fluent, moto, boto3, aws_kinesis_agg, zstandard, prometheus_client' >/dev/null 2>&1; then
  echo "deps: creating the Python venv (fluent-logger, moto, boto3, aws-kinesis-agg, zstandard, prometheus-client)"
  python3 -m venv "$deps/venv"
  "$deps/venv/bin/pip" install -q --disable-pip-version-check \
    'fluent-logger==0.11.1' 'moto[server]==5.2.5' 'aws-kinesis-agg==1.2.3' 'zstandard==0.25.0' \
    'prometheus-client==0.21.1'
fi

if [ ! -f "$deps/node/node_modules/kinesis-local/main.js" ]; then
  echo "deps: installing kinesis-local from npm"
  mkdir -p "$deps/node"
  npm install --silent --no-audit --no-fund --prefix "$deps/node" 'kinesis-local@0.6.2'
fi

echo "deps: building the Go client against Debian's fluent-logger-golang"
GOPATH=/usr/share/gocode GO111MODULE=off GOCACHE="$deps/go-cache" GOFLAGS= \
  go build -o "$deps/fluent-go-client" ./tests/clients/go
echo "deps: ready in $deps"
