#!/usr/bin/env bash
# Clone benchmark: `vmrs disk clone` against coreutils `cp` in the same run, reported as ratios
# (vmrs time / cp time; < 1 means vmrs is faster).
#   XFS (reflink=1):  vmrs disk clone (FICLONE)            vs  cp --reflink=always
#   ext4:             vmrs disk clone (falls back to its     vs  cp --sparse=always
#                     SEEK_DATA + copy_file_range copy)
# The base is SIZE_MB MiB with data in every other 8 MiB chunk (half holes). Every timed run
# includes an fsync of the result (vmrs does it itself; cp is followed by `sync FILE`).
# Needs root (loop mounts), xfsprogs, e2fsprogs. Env: VMRS (binary), SIZE_MB, RUNS.
set -euo pipefail
VMRS=${VMRS:-target/release/vmrs}
[ -x "$VMRS" ] || VMRS=target/debug/vmrs
SIZE_MB=${SIZE_MB:-1024}
RUNS=${RUNS:-5}
work=$(mktemp -d)
cleanup() {
  for m in "$work/xfs" "$work/ext4"; do mountpoint -q "$m" && umount "$m"; done
  rm -rf "$work"
}
trap cleanup EXIT

mkfs_mount() { # kind dir size
  truncate -s "$3" "$work/$1.img"
  if [ "$1" = xfs ]; then mkfs.xfs -q -f -m reflink=1 "$work/$1.img"; else mkfs.ext4 -q -F "$work/$1.img"; fi
  mkdir -p "$2"
  mount -o loop "$work/$1.img" "$2"
}
make_base() { # path
  truncate -s "${SIZE_MB}M" "$1"
  for ((i = 0; i < SIZE_MB / 8; i += 2)); do
    dd if=/dev/urandom of="$1" bs=8M count=1 seek="$i" conv=notrunc status=none
  done
  sync "$1"
}
now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
one_run() { # dir cmd...  -> ns for one clone + fsync of the result
  local dir=$1; shift
  rm -f "$dir/clone.img"
  sync -f "$dir"
  local t0; t0=$(now)
  "$@" "$dir/base.img" "$dir/clone.img" >/dev/null
  sync "$dir/clone.img"
  echo $(( $(now) - t0 ))
}
# Alternate the two commands run by run so drift in machine load hits both alike.
compare() { # label dir "vmrs args" "cp args"
  local label=$1 dir=$2 v=() c=()
  read -r -a vargs <<<"$3"
  read -r -a cargs <<<"$4"
  for ((r = 0; r < RUNS; r++)); do
    v+=("$(one_run "$dir" "$VMRS" "${vargs[@]}")")
    c+=("$(one_run "$dir" "${cargs[@]}")")
  done
  report "$label" "$(printf '%s\n' "${v[@]}" | median)" "$(printf '%s\n' "${c[@]}" | median)"
}
report() { # label vmrs_ns cp_ns
  awk -v l="$1" -v a="$2" -v b="$3" 'BEGIN {printf "%-26s vmrs %9.2f ms   cp %9.2f ms   ratio %.2f\n", l, a/1e6, b/1e6, a/b}'
}

mkfs_mount xfs "$work/xfs" $(( SIZE_MB * 3 + 400 ))M
mkfs_mount ext4 "$work/ext4" $(( SIZE_MB * 3 ))M
make_base "$work/xfs/base.img"
make_base "$work/ext4/base.img"

echo "clone of a ${SIZE_MB} MiB image (half data, half holes), median of $RUNS runs, $VMRS"
compare "xfs reflink" "$work/xfs" "disk clone --reflink always" "cp --reflink=always"
compare "ext4 sparse copy" "$work/ext4" "disk clone" "cp --sparse=always"
alloc_v=$(rm -f "$work/ext4/clone.img"; "$VMRS" disk clone "$work/ext4/base.img" "$work/ext4/clone.img" >/dev/null; du -k "$work/ext4/clone.img" | cut -f1)
alloc_c=$(rm -f "$work/ext4/clone.img"; cp --sparse=always "$work/ext4/base.img" "$work/ext4/clone.img"; du -k "$work/ext4/clone.img" | cut -f1)
echo "ext4 allocated KiB: vmrs $alloc_v, cp $alloc_c (base $(du -k "$work/ext4/base.img" | cut -f1))"
