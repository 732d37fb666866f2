#!/usr/bin/env bash
# The README's test command: set up (idempotent), then lint and run every test, including the
# ones that boot real guests under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# macOS hosts: the library and the CLI (their lib and bin targets, VZ backend and vmrs-vz
# included) type-check and are clippy-clean for both Apple targets. Compiled only, never run:
# no test binary is built for them (docs/macos.md says what was run where). Clippy runs the
# compiler's own checks too, so a separate `cargo check` would only repeat them.
for target in aarch64-apple-darwin x86_64-apple-darwin; do
    cargo clippy -p vm-rs -p vmrs --target "$target" -- -D warnings
done
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
cargo nextest run --workspace --no-fail-fast "$@"
cargo test -q --workspace --doc
# Chaos round (issue 16 invariants 1-2): random verbs on a few VMs while vmrs processes are
# SIGKILLed; CHAOS_KILLS=100 for a long run, CHAOS_KILLS=0 skips it.
if [ "${CHAOS_KILLS:-20}" != 0 ]; then
    CHAOS_KILLS="${CHAOS_KILLS:-20}" scripts/chaos.sh
fi
# Fuzz smoke: every target in fuzz/ for a few seconds (nightly toolchain). The corpus grows in
# fuzz/corpus (gitignored) across runs; FUZZ_SMOKE_SECONDS=0 skips it.
if [ "${FUZZ_SMOKE_SECONDS:-5}" != 0 ]; then
    FUZZ_DEV="${FUZZ_DEV:-1}" scripts/fuzz.sh "${FUZZ_SMOKE_SECONDS:-5}"
fi
