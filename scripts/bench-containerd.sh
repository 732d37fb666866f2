#!/usr/bin/env bash
# containerd benchmark: `ctr run --rm IMAGE ID true` through the vm-rs shim
# (runtime io.containerd.vmrs.v1, a VM per container) against containerd's default runc shim
# (io.containerd.runc.v2) on the same busybox image, in the same run, alternating the two.
# Reports both medians and the ratio (vmrs / runc). Starts its own containerd (config, root,
# state and socket in a temp dir; nothing system-wide). Needs root, containerd, ctr, runc,
# busybox-static and the guest assets (VMRS_ASSETS, default ~/.local/share/vmrs/assets).
# Env: SHIM (the shim binary; default target/release, else target/debug), RUNS (default 9).
set -euo pipefail
SHIM=${SHIM:-target/release/containerd-shim-vmrs-v1}
[ -x "$SHIM" ] || SHIM=target/debug/containerd-shim-vmrs-v1
[ -x "$SHIM" ] || { echo "build it first: cargo build -p containerd-shim-vmrs" >&2; exit 1; }
SHIM=$(realpath "$SHIM")
RUNS=${RUNS:-9}
IMAGE=docker.io/library/vmrs-bench:latest
export VMRS_ASSETS=${VMRS_ASSETS:-$HOME/.local/share/vmrs/assets}
work=$(mktemp -d /tmp/ctrbench.XXXXXX)
cpid=""
cleanup() {
  [ -n "$cpid" ] && kill "$cpid" 2>/dev/null && wait "$cpid" 2>/dev/null
  # the shims and VMMs this run started name its directory on their command lines
  for p in $(pgrep -f "$work" || true); do kill -9 "$p" 2>/dev/null || true; done
  grep -o " $work[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# the image: busybox (static) and a few applet links, as an OCI archive
mkdir -p "$work/layer/bin" "$work/oci/blobs/sha256"
cp /usr/bin/busybox "$work/layer/bin/busybox"
for a in sh true echo; do ln -s busybox "$work/layer/bin/$a"; done
tar -C "$work/layer" -cf "$work/layer.tar" .
blob() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); cp "$1" "$work/oci/blobs/sha256/$d"; echo "$d"; }
layer=$(blob "$work/layer.tar")
printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$layer" >"$work/config.json"
config=$(blob "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%d}]}' \
  "$config" "$(stat -c %s "$work/config.json")" "$layer" "$(stat -c %s "$work/layer.tar")" >"$work/manifest.json"
manifest=$(blob "$work/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"latest"}}]}' \
  "$manifest" "$(stat -c %s "$work/manifest.json")" "$IMAGE" >"$work/oci/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' >"$work/oci/oci-layout"
tar -C "$work/oci" -cf "$work/image.tar" .

cat >"$work/config.toml" <<TOML
version = 2
disabled_plugins = ["io.containerd.grpc.v1.cri"]
root = "$work/root"
state = "$work/state"
[grpc]
  address = "$work/c.sock"
TOML
PATH="$(dirname "$SHIM"):$PATH" VMRS_SHIM_HOME="$work/vmrs" containerd --config "$work/config.toml" >"$work/containerd.log" 2>&1 &
cpid=$!
for _ in $(seq 100); do [ -S "$work/c.sock" ] && break; sleep 0.1; done
ctr() { command ctr -a "$work/c.sock" -n bench "$@"; }
ctr image import "$work/image.tar" >/dev/null

now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
one() { # runtime id -> ns
  local t0; t0=$(now)
  ctr run --rm --runtime "$1" "$IMAGE" "$2" true </dev/null >/dev/null
  echo $(( $(now) - t0 ))
}
v=() r=()
for ((i = 0; i < RUNS; i++)); do
  v+=("$(one io.containerd.vmrs.v1 "v$i")")
  r+=("$(one io.containerd.runc.v2 "r$i")")
done
vm=$(printf '%s\n' "${v[@]}" | median)
rc=$(printf '%s\n' "${r[@]}" | median)
awk -v a="$vm" -v b="$rc" -v n="$RUNS" 'BEGIN {printf "ctr run --rm true (%d runs)   vmrs shim %8.1f ms   runc %8.1f ms   ratio %.1f\n", n, a/1e6, b/1e6, a/b}'
