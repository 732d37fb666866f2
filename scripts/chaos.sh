#!/usr/bin/env bash
# Chaos harness for issue 16, invariants 1 (no orphans, whatever dies when) and 2 (damage is
# contained). CHAOS_CLIENTS clients run random `vmrs` verbs (run -d, start, stop, kill, pause,
# resume, rm -f, exec) on four VM names — one on user networking, two on one switch network
# (a vmrs-net sidecar with two members), one on a NAT bridge in a namespace of its own — while a killer SIGKILLs random vmrs CLI processes at
# random moments, a third of the time a `run -d kx3` it started itself (after `rm -f kx3`)
# within its first 200 ms.
# After each round (CHAOS_PER_ROUND kills) the clients stop and the harness checks:
#   - `vmrs ps -a --json` works and lists every VM directory (readable or `damaged`);
#   - every process a VM directory owns (VMRS_OWNER in its environment: VMMs, forwarders) is
#     the VMM `ps` shows for that VM, and every switch sidecar is the one its network records;
#   - `rm -f` removes every VM; then nothing is left: no VM directory, no owned process, no
#     TAP device of these VMs, no switch sidecar, no nft table that was not there before.
# CHAOS_KILLS=20 (default, CI) or 100 (long). Uses its own VMRS_HOME; prints the figures and
# exits non-zero on any violation.
set -uo pipefail
cd "$(dirname "$0")/.."

KILLS=${CHAOS_KILLS:-20}
PER_ROUND=${CHAOS_PER_ROUND:-10}
CLIENTS=${CHAOS_CLIENTS:-3}
VMRS=${VMRS_BIN:-$PWD/target/debug/vmrs}
if [ -z "${VMRS_BIN:-}" ]; then
    cargo build -q -p vmrs || exit 1
fi
# The guest assets `vmrs setup` wrote for the caller's home: the harness's own VMRS_HOME would
# otherwise point the VMs at an assets dir that does not exist (paths::assets_dir).
if [ -z "${VMRS_ASSETS:-}" ]; then
    VMRS_ASSETS=${VMRS_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/vmrs}/assets
fi
export VMRS_ASSETS
if [ ! -e "$VMRS_ASSETS/vmlinuz" ] || [ ! -e "$VMRS_ASSETS/initramfs.img" ]; then
    echo "chaos: no guest assets in $VMRS_ASSETS (run scripts/setup.sh or set VMRS_ASSETS)" >&2
    exit 1
fi
home=$(mktemp -d /tmp/vmrs-chaos.XXXXXX)
export VMRS_HOME=$home
unset RUST_LOG
names=(kx0 kx1 kx2 kx3)
# kx3 (the VM the killer starts and kills within 200 ms) is on a NAT bridge in a network
# namespace of the harness's own: TAP, bridge and nft table windows are hunted too
ns=vmrs-chaos-$$
ip netns add "$ns" || exit 1
declare -A net=([kx0]="" [kx1]="--net switch=kxnet" [kx2]="--net switch=kxnet"
    [kx3]="--net bridge=kxbr0,gateway=10.77.0.1/24,nat,netns=/run/netns/$ns")
log=$home/chaos.log
violations=0
reaped=0
kills=0
early_kills=0
rounds=0
bad_rounds=0

note() { echo "chaos: $*" | tee -a "$log"; }
violation() {
    violations=$((violations + 1))
    note "VIOLATION (round $rounds): $*"
}

# pid and owner of every live process some directory under this home owns: named by its
# VMRS_OWNER, or (not relying on that marker: QEMU runs in its VM directory) by its working
# directory, even a deleted one
owned() {
    local p env cwd
    for p in /proc/[0-9]*; do
        if env=$(tr '\0' '\n' 2>/dev/null <"$p/environ" | grep -m1 "^VMRS_OWNER=$home/"); then
            echo "${p#/proc/} ${env#VMRS_OWNER=}"
        elif cwd=$(readlink "$p/cwd" 2>/dev/null) && [[ $cwd == "$home"/vms/* ]]; then
            grep -q '^State:.*[ZX]' "$p/status" 2>/dev/null || echo "${p#/proc/} ${cwd% (deleted)}"
        fi
    done
}

# pids of our vmrs CLI processes (not the switch sidecars, which run `vmrs net-sidecar`)
cli_pids() {
    local p
    for p in $(pgrep -x vmrs); do
        tr '\0' '\n' 2>/dev/null <"/proc/$p/environ" | grep -qx "VMRS_HOME=$home" || continue
        tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | grep -q " net-sidecar " && continue
        echo "$p"
    done
}

# TAP devices of these VMs (none are asked for, but a switch or user NIC must not leave one)
taps() {
    { ip -d -o link show; ip -n "$ns" -d -o link show; } 2>/dev/null |
        grep -oE "alias vmrs:[0-9a-f]+:tap:kx[0-9]:[0-9]+" || true
}
nft_tables() { nft list tables 2>/dev/null | sort; }
ns_leftovers() {
    ip -n "$ns" -o link show kxbr0 2>/dev/null | cut -d: -f2
    ip netns exec "$ns" nft list tables 2>/dev/null
}

client() {
    local n v
    while [ ! -e "$home/.stop" ]; do
        n=${names[RANDOM % 4]}
        v=$((RANDOM % 11))
        case $v in
        # a VM that exists is started again rather than refused (a VM that gets ready is what
        # the other verbs need)
        0 | 1 | 2) if [ -d "$home/vms/$n" ]; then set -- start "$n"; else set -- run -d --name "$n" ${net[$n]}; fi ;;
        3) set -- stop -t 2 "$n" ;;
        4) set -- kill "$n" ;;
        5) set -- pause "$n" ;;
        6) set -- resume "$n" ;;
        7) set -- rm -f "$n" ;;
        8) set -- exec "$n" true ;;
        9) set -- ps -a ;;
        10) set -- run -d --name "$n" ${net[$n]} ;;
        esac
        timeout 180 "$VMRS" "$@" >/dev/null 2>&1
        echo "verb $1 rc=$?" >>"$home/verbs.log"
    done
}

frac() { printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }

killer() {
    local k=0 n p victims
    while [ $k -lt "$1" ]; do
        sleep "$(frac $((200 + RANDOM % 1300)))"
        if [ $((RANDOM % 3)) = 0 ]; then
            n=kx3
            timeout 60 "$VMRS" rm -f "$n" >/dev/null 2>&1
            "$VMRS" run -d --name "$n" ${net[$n]} >/dev/null 2>&1 &
            p=$!
            sleep "$(frac $((RANDOM % 200)))"
            kill -9 "$p" 2>/dev/null && echo early >>"$home/kills.log"
            wait "$p" 2>/dev/null
        else
            mapfile -t victims < <(cli_pids)
            [ ${#victims[@]} = 0 ] && continue
            p=${victims[RANDOM % ${#victims[@]}]}
            kill -9 "$p" 2>/dev/null && echo any >>"$home/kills.log"
        fi
        k=$((k + 1))
    done
}

check_round() {
    local before after rows dirs pid owner vm want
    before=$(owned | wc -l)
    if ! rows=$(timeout 60 "$VMRS" ps -a --json 2>>"$log"); then
        violation "ps -a --json failed"
        rows='[]'
    fi
    # every VM directory is listed, readable or damaged
    dirs=$(find "$home/vms" -mindepth 1 -maxdepth 1 -type d ! -name '.*' -printf '%f\n' 2>/dev/null | sort)
    for vm in $dirs; do
        echo "$rows" | python3 -c 'import json,sys; rows=json.load(sys.stdin); sys.exit(0 if any(r["name"]==sys.argv[1] for r in rows) else 1)' "$vm" ||
            violation "vm dir $vm not listed by ps"
    done
    echo "$rows" | python3 -c 'import json,sys
for r in json.load(sys.stdin):
    print("state", r["name"], r["state"], r.get("pid"))' >>"$log"
    # every owned process is tracked: a VM's VMM as ps shows it, a switch as its network records
    after=$(owned)
    reaped=$((reaped + before - $(echo -n "$after" | grep -c .)))
    while read -r pid owner; do
        [ -z "$pid" ] && continue
        case $owner in
        "$home"/vms/*)
            vm=${owner#"$home"/vms/}
            want=$(echo "$rows" | python3 -c 'import json,sys
for r in json.load(sys.stdin):
    if r["name"]==sys.argv[1] and r["state"] in ("starting","running","ready","paused"): print(r.get("pid"))' "$vm")
            # a forwarder of a live VM is tracked by its net.json; a VMM by the record
            if [ "$want" != "$pid" ] && ! grep -q "\"pid\": *$pid\b" "$owner/net.json" 2>/dev/null; then
                violation "process $pid ($(cat /proc/$pid/comm 2>/dev/null)) owned by $vm is tracked by no record (ps: ${want:-not live})"
            fi
            ;;
        "$home"/networks/*)
            grep -q "\"pid\": *$pid\b" "$owner/switch.json" 2>/dev/null ||
                violation "switch sidecar $pid of $owner is tracked by no record"
            ;;
        esac
    done <<<"$after"
    # every VM is removable
    for vm in $dirs; do
        timeout 60 "$VMRS" rm -f "$vm" >>"$log" 2>&1 || violation "rm -f $vm failed"
    done
    # and then nothing is left
    sleep 0.5
    left=$(find "$home/vms" -mindepth 1 -maxdepth 1 2>/dev/null)
    [ -n "$left" ] && violation "left in vms/: $left"
    after=$(owned)
    [ -n "$after" ] && violation "processes outlived their vms: $after"
    local t
    t=$(taps)
    [ -n "$t" ] && violation "TAP devices left: $t"
    t=$(ns_leftovers)
    [ -n "$t" ] && violation "bridge or nft table left in the namespace: $(echo $t)"
    if [ "$(nft_tables)" != "$nft_before" ]; then
        violation "nft tables changed: $(diff <(echo "$nft_before") <(nft_tables) | tr '\n' ' ')"
    fi
}

cleanup() {
    touch "$home/.stop" 2>/dev/null
    for p in $(cli_pids); do kill -9 "$p" 2>/dev/null; done
    while read -r pid _; do [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; done <<<"$(owned)"
    # and anything else started with this home (switch sidecars of a binary without markers)
    local p
    for p in /proc/[0-9]*; do
        tr '\0' '\n' 2>/dev/null <"$p/environ" | grep -qx "VMRS_HOME=$home" && kill -9 "${p#/proc/}" 2>/dev/null
    done
}
trap 'cleanup; ip netns del "$ns" 2>/dev/null' EXIT

nft_before=$(nft_tables)
note "home $home, $KILLS kills, $PER_ROUND per round, $CLIENTS clients"
started=$SECONDS
while [ $kills -lt "$KILLS" ]; do
    rounds=$((rounds + 1))
    rm -f "$home/.stop"
    n=$((KILLS - kills < PER_ROUND ? KILLS - kills : PER_ROUND))
    pids=()
    for _ in $(seq "$CLIENTS"); do
        client 2>/dev/null &
        pids+=($!)
    done
    killer "$n"
    touch "$home/.stop"
    wait "${pids[@]}" 2>/dev/null
    kills=$((kills + n))
    v0=$violations
    check_round
    [ $violations != "$v0" ] && bad_rounds=$((bad_rounds + 1))
    note "round $rounds: $n kills, $((violations - v0)) violations"
done
# a harness whose VMs never boot tests nothing
booted=$(grep -cE "^verb (run|start) rc=0$" "$home/verbs.log" 2>/dev/null || true)
if [ "${booted:-0}" = 0 ]; then
    bad_rounds=$rounds
    violation "no run -d or start ever succeeded (guest assets? see $log)"
    "$VMRS" run -d --name kx-probe >>"$log" 2>&1
    "$VMRS" rm -f kx-probe >/dev/null 2>&1
fi
early_kills=$(grep -c early "$home/kills.log" 2>/dev/null || true)
verbs=$(wc -l <"$home/verbs.log" 2>/dev/null || echo 0)
note "$rounds rounds, $kills kills (${early_kills:-0} within 200 ms of a start), $verbs verbs ($booted booted)," \
    "$reaped untracked-by-record processes reconciled by ps, $violations violations, $((SECONDS - started)) s"
echo "chaos: $((rounds - bad_rounds)) passed, $bad_rounds failed"
awk '{print $2, $3}' "$home/verbs.log" | sort | uniq -c | sort -rn | head -20 | tr -s ' ' | paste -sd ';' | sed 's/^/chaos: verbs: /'
if [ "$violations" = 0 ] && [ -z "${CHAOS_KEEP:-}" ]; then
    rm -rf "$home"
    exit 0
fi
note "log kept in $home"
exit 1
