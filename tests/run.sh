#!/usr/bin/env bash
# The whole test suite, as a new user (and CI) runs it: install what the tests need,
# run every unit, property and integration test, run the integration suite once more
# where io_uring is refused, check the deployment templates offline, and give every fuzz
# target a short run.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/deps.sh
cargo test --all-targets "$@"
# Fargate and Docker's default seccomp profile refuse the io_uring calls. Under the same
# refusal `io = "auto"` must choose epoll by itself, and every integration test must pass
# on it; SLUICE_EXPECT_IO makes each test check which backend its sluice chose.
if [ "$(uname -m)" = x86_64 ]; then
    target="${CARGO_TARGET_DIR:-target}"
    mkdir -p "$target"
    cc -o "$target/no_uring" tests/it/helpers/no_uring.c
    # The throttling test's two minutes are shown once; here a minute does (the log
    # fills in about ten seconds) and keeps the whole run inside CI's half hour.
    SLUICE_EXPECT_IO=epoll SLUICE_THROTTLE_SECS=60 "$target/no_uring" cargo test --test it "$@"
else
    echo "tests/run.sh: the seccomp helper is x86_64 only; the epoll run is skipped on $(uname -m)" >&2
    exit 1
fi
tests/deploy.sh
# Every fuzz target for 30 s over its seeds and corpus (FUZZING.md runs them longer).
tests/fuzz.sh
