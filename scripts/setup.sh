#!/usr/bin/env bash
# Set up a Debian machine for vm-rs: install the Debian packages the build and tests need,
# build the CLI and the static guest init, and fetch + build the guest assets (Debian's cloud
# kernel and busybox via `apt-get download`, initramfs built by vm-rs). Idempotent: a second run
# only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

mapfile -t pkgs < <(grep -v '^\s*#' scripts/apt-packages.txt | sed 's/#.*//' | xargs -n1 | sort -u)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    $SUDO apt-get update -qq
    # cloud-init is installed only for its schema checker (storage tests): keep it from ever
    # running at boot on this host.
    $SUDO mkdir -p /etc/cloud && $SUDO touch /etc/cloud/cloud-init.disabled
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "setup: building vmrs and the guest init" >&2
cargo build -q -p vmrs
scripts/build-guest.sh

echo "setup: guest assets" >&2
target/debug/vmrs setup --init target/x86_64-unknown-linux-gnu/release/vmrs-init
