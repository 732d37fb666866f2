#!/usr/bin/env bash
# The README's test command: set up (idempotent), then lint and run every test, including the
# ones that boot real guests under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
cargo nextest run --workspace --no-fail-fast "$@"
cargo test -q --workspace --doc
# Fuzz smoke: every target in fuzz/ for a few seconds (nightly toolchain). The corpus grows in
# fuzz/corpus (gitignored) across runs; FUZZ_SMOKE_SECONDS=0 skips it.
if [ "${FUZZ_SMOKE_SECONDS:-5}" != 0 ]; then
    scripts/fuzz.sh "${FUZZ_SMOKE_SECONDS:-5}"
fi
