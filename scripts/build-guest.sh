#!/usr/bin/env bash
# Build the guest init (`vmrs-init`) as a static x86-64 binary (glibc, +crt-static; no musl
# target needed). Output: target/x86_64-unknown-linux-gnu/release/vmrs-init — where
# `vmrs setup` looks for it (see vm_rs::guest::find_init).
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build -p vmrs-guest --release --target x86_64-unknown-linux-gnu "$@"
bin=target/x86_64-unknown-linux-gnu/release/vmrs-init
if command -v file >/dev/null && ! file "$bin" | grep -q 'statically linked\|static-pie linked'; then
    echo "build-guest.sh: $bin is not statically linked" >&2
    exit 1
fi
echo "$bin"
