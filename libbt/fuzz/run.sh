#!/bin/sh
# run.sh -- build libbt's libFuzzer harnesses (clang, ASan + UBSan) and run
# each for FUZZ_SECONDS.
#
#   sh libbt/fuzz/run.sh [HARNESS...]        (default: fuzz_attach fuzz_ops)
#
#   FUZZ_SECONDS     seconds per harness (default 60)
#   FUZZ_BUILD       build folder (default build-fuzz; corpora persist there)
#   FUZZ_TIMEOUT     libFuzzer's per-input timeout in seconds (default 10): an
#                    input that runs longer is a finding (a loop over shared
#                    links that is not bounded)
#   CC_FUZZ          the compiler (default clang)
#
# It installs nothing: without the compiler it says what to install (`make
# fuzz-deps` does it visibly as root) and exits 2. A clang that cannot link
# libFuzzer makes it say why and exit 0: skipped, not failed. Exit 1 if a harness
# found something: the input is in $FUZZ_BUILD/artifacts, and the harness
# reproduces it with `$FUZZ_BUILD/HARNESS FILE`.
#
# The last lines are one per harness: executions, corpus, findings.

set -u
cd "$(dirname "$0")/../.." || exit 2
secs=${FUZZ_SECONDS:-60}
build=${FUZZ_BUILD:-build-fuzz}
tmo=${FUZZ_TIMEOUT:-10}
cc=${CC_FUZZ:-clang}
[ $# -gt 0 ] || set -- fuzz_attach fuzz_ops

skip() {
    echo "SKIP: libFuzzer harnesses not run: $*"
    exit 0
}

if ! command -v "$cc" >/dev/null 2>&1; then
    echo "fuzz: $cc not found: run \`make fuzz-deps\` (as root it runs \`apt-get install clang\`)," \
         "or apt-get install clang yourself, or set CC_FUZZ" >&2
    exit 2
fi

mkdir -p "$build/artifacts" || exit 2
flags="-g -O1 -std=c11 -D_GNU_SOURCE -Wall -Wextra -fno-omit-frame-pointer -Ilibbt/include -Ilibbt/src"
san="-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all"

# Can this clang link libFuzzer (Debian ships it with clang's runtime)?
probe=$build/probe
if [ ! -x "$probe" ]; then
    printf '#include <stdint.h>\n#include <stddef.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }\n' \
        >"$probe.c"
    "$cc" $san "$probe.c" -o "$probe" >"$probe.log" 2>&1 ||
        skip "$cc cannot build a libFuzzer target: $(head -n 3 "$probe.log")"
fi

# (Re)build what is older than its sources.
srcs="libbt/src/*.c libbt/src/*.h libbt/include/bt.h libbt/fuzz/fuzz_common.h"
stale() {
    [ -x "$1" ] || return 0
    for f in $srcs $2; do
        [ "$f" -nt "$1" ] && return 0
    done
    return 1
}
for h in "$@"; do
    [ -f "libbt/fuzz/$h.c" ] || { echo "fuzz: no harness libbt/fuzz/$h.c"; exit 2; }
    if stale "$build/$h" "libbt/fuzz/$h.c"; then
        echo "fuzz: building $build/$h"
        # shellcheck disable=SC2086
        "$cc" $flags $san "libbt/fuzz/$h.c" libbt/src/*.c -o "$build/$h" -lpthread -lrt || exit 2
    fi
done
if stale "$build/gen_corpus" libbt/fuzz/gen_corpus.c; then
    # shellcheck disable=SC2086
    "$cc" $flags libbt/fuzz/gen_corpus.c libbt/src/*.c -o "$build/gen_corpus" -lpthread -lrt || exit 2
fi
rm -rf "$build/seeds"
mkdir -p "$build/seeds/fuzz_attach" "$build/seeds/fuzz_ops"
"$build/gen_corpus" "$build/seeds/fuzz_attach" "$build/seeds/fuzz_ops" >/dev/null || exit 2

export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
status=0
summary=
for h in "$@"; do
    corpus=$build/corpus/$h
    mkdir -p "$corpus"
    log=$build/$h.log
    seeds=$build/seeds/$h
    [ -d "$seeds" ] || seeds=
    echo "fuzz: $h for ${secs}s (corpus $corpus)"
    # shellcheck disable=SC2086
    "./$build/$h" -max_total_time="$secs" -timeout="$tmo" -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$build/artifacts/$h-" \
        "$corpus" $seeds >"$log" 2>&1
    rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
    files=$(find "$corpus" -type f | wc -l)
    if [ $rc -eq 0 ]; then
        found="no findings"
    else
        status=1
        art=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        why=$(grep -m 1 -E 'fuzz oracle|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error' "$log")
        found="FINDING: ${why:-exit $rc} (input: ${art:-none}; log: $log)"
        sed -n "/ERROR\|fuzz oracle\|runtime error/,+8p" "$log" | head -n 12
    fi
    summary="$summary
fuzz: $h: ${runs:-?} executions in ${secs}s, ${cov:-cov: ?} edges, corpus $files inputs, $found"
done
echo "$summary" | sed '/^$/d'
exit $status
