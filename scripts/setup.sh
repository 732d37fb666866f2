#!/usr/bin/env bash
# Set up a Debian machine for vm-rs: install the Debian packages the build and tests need,
# build the CLI and the static guest init, and fetch + build the guest assets (Debian's cloud
# kernel and busybox via `apt-get download`, initramfs built by vm-rs). Idempotent: a second run
# only checks.
#
# Needs: Debian 12 (apt), root or sudo, Rust >= the workspace's rust-version (see Cargo.toml).
# cargo-nextest, virtiofsd and vhost-device-vsock are installed with `cargo install --locked` when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# Every binary the build, the tests and the guest assets rely on, and the package that ships it.
# Checked *after* installing: installing one package can remove another (Debian's
# qemu-system-x86 7.2 replaces the image's newer qemu-utils, for example).
binaries=(
    "qemu-system-x86_64 qemu-system-x86"
    "qemu-img qemu-utils"
    "busybox busybox-static"
    "modprobe kmod"
    "cpio cpio"
    "docker-registry docker-registry"
    "skopeo skopeo"
    "htpasswd apache2-utils"
    "mkfs.xfs xfsprogs"
    "mcopy mtools"
    "mkfs.vfat dosfstools"
    "ssh-keygen openssh-client"
    "mkfs.ext4 e2fsprogs"
    "cloud-init cloud-init"
    "ip iproute2"
    "nft nftables"
    "zsh zsh"
    "fish fish"
    "openssl openssl"
    "containerd containerd"
    "ctr containerd"
    "runc runc"
    "protoc protobuf-compiler"
    "slirp4netns slirp4netns"
    "strace strace"
)

mapfile -t pkgs < <(grep -v '^\s*#' scripts/apt-packages.txt | sed 's/#.*//' | xargs -n1 | sort -u)

missing_pkgs() {
    local p
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}

missing_bins() {
    local entry
    for entry in "${binaries[@]}"; do
        set -- $entry
        PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1 || echo "$1 (package $2)"
    done
}

if [ -n "$(missing_pkgs)" ] || [ -n "$(missing_bins)" ]; then
    echo "setup: installing ${pkgs[*]} (one apt transaction)" >&2
    $SUDO apt-get update -qq
    # cloud-init is installed only for its schema checker (storage tests): keep it from ever
    # running at boot on this host.
    $SUDO mkdir -p /etc/cloud && $SUDO touch /etc/cloud/cloud-init.disabled
    # The whole list at once, already-installed packages included, so apt resolves them together
    # and keeps (or reinstalls) every one of them. QEMU's packages must come from one release:
    # a machine image may carry a newer qemu-utils (from backports) whose Breaks: rule refuses
    # Debian's qemu-system-x86, so every qemu-* package is pinned to qemu-system-x86's candidate
    # version (a downgrade of qemu-utils where the image had a newer one).
    qemu_version=$(apt-cache policy qemu-system-x86 | sed -n 's/^ *Candidate: *//p')
    if [ -z "$qemu_version" ] || [ "$qemu_version" = "(none)" ]; then
        echo "setup: apt has no qemu-system-x86 package (is this Debian 12?)" >&2
        exit 1
    fi
    want=()
    for p in "${pkgs[@]}"; do
        case "$p" in
            qemu-system-x86|qemu-utils|qemu-system-common|qemu-system-data|qemu-block-extra) want+=("$p=$qemu_version") ;;
            *) want+=("$p") ;;
        esac
    done
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends --allow-downgrades "${want[@]}"
fi

gone=$(missing_pkgs)
if [ -n "$gone" ]; then
    echo "setup: these Debian packages are still not installed after apt: $gone" >&2
    exit 1
fi
gone=$(missing_bins)
if [ -n "$gone" ]; then
    echo "setup: missing after installing packages:" >&2
    echo "$gone" | sed 's/^/  /' >&2
    exit 1
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install Rust (rustup) >= $(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)" >&2
    exit 1
fi
# The Apple targets' standard libraries, for the macOS type-check in scripts/test.sh (nothing
# is built for them here; see docs/macos.md).
if ! command -v rustup >/dev/null; then
    echo "setup: rustup not found; it is needed for the aarch64/x86_64-apple-darwin targets" >&2
    exit 1
fi
for target in aarch64-apple-darwin x86_64-apple-darwin; do
    if ! rustup target list --installed | grep -qx "$target"; then
        echo "setup: adding the $target target (rustup)" >&2
        rustup target add "$target"
    fi
done
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "setup: installing cargo-nextest (cargo install --locked)" >&2
    cargo install --locked cargo-nextest
fi

# The virtio-fs daemon for shared directories (`vmrs run -v`): the maintained Rust virtiofsd
# (Debian 12's qemu-system-common only ships the old C one, which has no read-only mode).
virtiofsd_version=1.14.0
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
have_virtiofsd() {
    local v
    for v in "${VMRS_VIRTIOFSD:-}" "$(command -v virtiofsd || true)" "$cargo_bin/virtiofsd"; do
        [ -n "$v" ] && [ -x "$v" ] && "$v" --version 2>/dev/null | grep -q '^virtiofsd [0-9]' && return 0
    done
    return 1
}
if ! have_virtiofsd; then
    echo "setup: installing virtiofsd $virtiofsd_version (cargo install --locked)" >&2
    cargo install --locked virtiofsd --version "$virtiofsd_version"
fi
if ! have_virtiofsd; then
    echo "setup: virtiofsd missing after cargo install (looked on PATH and in $cargo_bin)" >&2
    exit 1
fi

# The vhost-user vsock backend for the agent over vsock on QEMU (`--agent-transport vsock`):
# rust-vmm's vhost-device-vsock, serving the hybrid-vsock Unix socket.
vhost_vsock_version=0.3.0
have_vhost_vsock() {
    local v
    for v in "${VMRS_VHOST_DEVICE_VSOCK:-}" "$(command -v vhost-device-vsock || true)" "$cargo_bin/vhost-device-vsock"; do
        [ -n "$v" ] && [ -x "$v" ] && "$v" --version 2>/dev/null | grep -q '^vhost-device-vsock [0-9]' && return 0
    done
    return 1
}
if ! have_vhost_vsock; then
    echo "setup: installing vhost-device-vsock $vhost_vsock_version (cargo install --locked)" >&2
    cargo install --locked vhost-device-vsock --version "$vhost_vsock_version"
fi
if ! have_vhost_vsock; then
    echo "setup: vhost-device-vsock missing after cargo install (looked on PATH and in $cargo_bin)" >&2
    exit 1
fi

echo "setup: building vmrs and the guest init" >&2
cargo build -p vmrs
scripts/build-guest.sh

echo "setup: guest assets" >&2
target/debug/vmrs setup --init target/x86_64-unknown-linux-gnu/release/vmrs-init
echo "setup: done; put vmrs on PATH with: export PATH=\"$PWD/target/debug:\$PATH\"" >&2
