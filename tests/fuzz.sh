#!/usr/bin/env bash
# The fuzz targets' smoke run: every target for FUZZ_SECS seconds (30 by default) over its
# hand-written seeds and its checked-in corpus; what it finds new goes to a scratch
# directory, not into the checkout. cargo-fuzz builds the targets with libFuzzer and
# AddressSanitizer, which needs RUSTC_BOOTSTRAP=1 on a stable toolchain (fuzz builds
# only). It is installed into <cargo target dir>/test-deps when missing.
# FUZZING.md says how to run the targets for longer.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECS:-30}
target=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
deps="$target/test-deps"
if ! cargo fuzz --version >/dev/null 2>&1; then
  if [ ! -x "$deps/cargo-fuzz/bin/cargo-fuzz" ]; then
    echo "fuzz: installing cargo-fuzz into $deps/cargo-fuzz"
    cargo install -q --locked --root "$deps/cargo-fuzz" cargo-fuzz@0.13.2
  fi
  export PATH="$deps/cargo-fuzz/bin:$PATH"
fi
export RUSTC_BOOTSTRAP=1
cd fuzz
cargo fuzz build
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in $(cargo fuzz list); do
  dirs=()
  for d in corpus seeds; do
    [ -d "$d/$t" ] && dirs+=("$d/$t")
  done
  [ ${#dirs[@]} -gt 0 ] || { echo "fuzz: $t has no seeds or corpus" >&2; exit 1; }
  mkdir -p "$scratch/$t"
  opts=(-max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1)
  [ -f "dicts/$t.dict" ] && opts+=(-dict="dicts/$t.dict")
  echo "fuzz: $t for ${secs}s"
  if ! cargo fuzz run "$t" "$scratch/$t" "${dirs[@]}" -- "${opts[@]}" >"$scratch/$t.log" 2>&1; then
    tail -60 "$scratch/$t.log" >&2
    echo "fuzz: $t failed; the crash input is under fuzz/artifacts/$t" >&2
    exit 1
  fi
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ *DONE)' "$scratch/$t.log" || true
done
