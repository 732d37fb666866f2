#!/usr/bin/env bash
# The README's first command: set up this machine, then boot the built-in guest, show it in
# `vmrs ps`, stop it gracefully and remove it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
vmrs=target/debug/vmrs
name="demo-$$"
echo "+ vmrs run -d --name $name" >&2
$vmrs run -d --name "$name"
echo "+ vmrs ps" >&2
$vmrs ps
echo "+ vmrs logs $name | tail -n 3" >&2
$vmrs logs "$name" | tail -n 3
echo "+ vmrs stop $name" >&2
$vmrs stop "$name"
$vmrs ps -a
$vmrs rm "$name"
