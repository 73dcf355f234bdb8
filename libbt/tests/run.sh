#!/bin/sh
# run.sh -- run libbt's C test programs (after liburing's test/runtests.sh).
#
#   sh libbt/tests/run.sh BUILDDIR [TEST...]
#
# TEST is a path or a name looked up in BUILDDIR; with none, every
# BUILDDIR/test_*. A test exits 0 (pass), 77 (skip) or anything else (fail).
#
#   BT_TEST_TIMEOUT  seconds per test (default 120); a test past it fails
#   BT_TEST_FILTER   words (space or comma separated): run only the tests with
#                    one of them as a _-separated word of the name, e.g. "mt"
#                    runs test_mt_stress (what `make tsan` runs) but not
#                    test_segment, whose name merely contains the letters
#   BT_TEST_VERBOSE  1: show every test's output, not only a failing one's
#
# The last line is always "ctest: N passed, N failed, N skipped"; the exit
# status is 1 if any test failed.

[ $# -ge 1 ] || { echo "usage: $0 BUILDDIR [TEST...]" >&2; exit 2; }
dir=$1
shift
[ $# -gt 0 ] || set -- "$dir"/test_*

limit=${BT_TEST_TIMEOUT:-120}
filter=$(printf '%s' "${BT_TEST_FILTER:-}" | tr ',' ' ')
verbose=${BT_TEST_VERBOSE:-0}

if command -v timeout >/dev/null 2>&1; then
    tmo="timeout -k 5 $limit"
else
    echo "run.sh: no timeout(1); tests run without a time limit" >&2
    tmo=
fi

log=$(mktemp "${TMPDIR:-/tmp}/bt-test.XXXXXX") || exit 2
trap 'rm -f "$log"' EXIT
trap 'exit 130' INT TERM

wanted() {
    [ -n "$filter" ] || return 0
    words=_${1#test_}_
    for w in $filter; do
        case $words in *"_${w}_"*) return 0 ;; esac
    done
    return 1
}

now_ms() {
    t=$(date +%s%N 2>/dev/null)
    case $t in *N|'') echo $(( $(date +%s) * 1000 )) ;; *) echo $(( t / 1000000 )) ;; esac
}

pass=0 fail=0 skip=0 failed=
for t in "$@"; do
    case $t in */*) path=$t ;; *) path=$dir/$t ;; esac
    name=${path##*/}
    case $name in *.c|*.o|*.d|*.h) continue ;; esac
    wanted "$name" || continue
    if [ ! -f "$path" ] || [ ! -x "$path" ]; then
        echo "FAIL  $name (no such program: $path)"
        fail=$((fail + 1)); failed="$failed $name"
        continue
    fi
    t0=$(now_ms)
    # shellcheck disable=SC2086
    $tmo "$path" >"$log" 2>&1 </dev/null
    rc=$?
    ms=$(( $(now_ms) - t0 ))
    secs=$(printf '%d.%02d' $((ms / 1000)) $((ms % 1000 / 10)))
    case $rc in
    0)
        pass=$((pass + 1))
        echo "PASS  $name (${secs}s)"
        [ "$verbose" = 1 ] && sed 's/^/      /' "$log"
        ;;
    77)
        skip=$((skip + 1))
        why=$(tail -n 1 "$log")
        why=${why#SKIP: }
        echo "SKIP  $name${why:+: $why}"
        ;;
    *)
        fail=$((fail + 1)); failed="$failed $name"
        case $rc in
        124|137) why="timed out after ${limit}s" ;;
        1) why="exit 1" ;;
        *) if [ "$rc" -gt 128 ]; then why="killed by signal $((rc - 128))"; else why="exit $rc"; fi ;;
        esac
        echo "FAIL  $name ($why, ${secs}s)"
        sed 's/^/      /' "$log"
        ;;
    esac
done

[ -z "$failed" ] || echo "failed:$failed"
echo "ctest: $pass passed, $fail failed, $skip skipped"
[ "$fail" -eq 0 ]
