#!/usr/bin/env bash
# The whole test suite, as a new user (and CI) runs it: install what the tests need,
# then run every unit, property and integration test.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/deps.sh
cargo test --all-targets "$@"
