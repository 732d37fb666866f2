#!/usr/bin/env bash
# Run every cargo-fuzz target in fuzz/ for SECONDS each (default 60) and fail if any crashed,
# hung or leaked past its limits. Needs the nightly toolchain; installs cargo-fuzz if missing.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Environment:
#   FUZZ_CORPUS      corpus root (default fuzz/corpus, gitignored); one directory per target,
#                    grown across runs; fuzz/corpus-seeds/<target> is read as extra seeds
#   FUZZ_TARGET_DIR  cargo target directory (default target/fuzz)
#   FUZZ_JOBS        build jobs (default 2)
#   FUZZ_DEV=1       build without optimizations (cargo fuzz --dev): a much shorter build for
#                    a smoke run whose few seconds need no speed (CI sets it)
# A crash leaves its input in fuzz/artifacts/<target>/; reproduce with
#   cargo +nightly fuzz run --target-dir target/fuzz <target> fuzz/artifacts/<target>/<file>
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
corpus="${FUZZ_CORPUS:-fuzz/corpus}"
target_dir="${FUZZ_TARGET_DIR:-target/fuzz}"
export CARGO_BUILD_JOBS="${FUZZ_JOBS:-2}"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: the nightly toolchain is not installed (rustup toolchain list)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi

mode=()
[ "${FUZZ_DEV:-}" = 1 ] && mode=(--dev)
build=(cargo +nightly fuzz build "${mode[@]}" --target-dir "$target_dir")
start=$(date +%s)
"${build[@]}"
echo "fuzz.sh: build took $(( $(date +%s) - start )) s"

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
log_dir="$target_dir/logs"
mkdir -p "$log_dir"
failed=()
printf '%-16s %10s %8s %8s  %s\n' target execs exec/s corpus result
for t in "${targets[@]}"; do
    mkdir -p "$corpus/$t" "fuzz/artifacts/$t"
    seeds=()
    [ -d "fuzz/corpus-seeds/$t" ] && seeds=("fuzz/corpus-seeds/$t")
    log="$log_dir/$t.log"
    if cargo +nightly fuzz run "${mode[@]}" --target-dir "$target_dir" "$t" "$corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1; then
        result=ok
    else
        result="FAILED (see $log)"
        failed+=("$t")
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    size=$(find "$corpus/$t" -type f | wc -l)
    printf '%-16s %10s %8s %8s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "$size" "$result"
done
echo "fuzz.sh: ${#targets[@]} targets, $secs s each, $(( $(date +%s) - start )) s in all"
if [ ${#failed[@]} -gt 0 ]; then
    for t in "${failed[@]}"; do
        echo "--- $t" >&2
        grep -E -A30 '^(==[0-9]+==|thread .* panicked|ERROR: libFuzzer)' "$log_dir/$t.log" | head -40 >&2 || tail -30 "$log_dir/$t.log" >&2
    done
    echo "fuzz.sh: crashes in: ${failed[*]}" >&2
    exit 1
fi
