#!/usr/bin/env bash
# The README's test command: set up (idempotent), then lint and run every test, including the
# ones that boot real guests under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy -q --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc -q --workspace --no-deps
cargo nextest run --workspace --no-fail-fast "$@"
cargo test -q --workspace --doc
