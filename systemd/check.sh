#!/bin/sh
# Check the unit: `systemd-analyze verify` and the exposure score of
# `systemd-analyze security --offline=true`, which must be at most 2.5.
# Skips (exit 0, with a message) where systemd-analyze is missing.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
unit="$here/btd.service"
max=${BT_MAX_EXPOSURE:-2.5}
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-systemd: SKIP (systemd-analyze not installed)"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# verify wants ExecStart= to exist: point it at a stand-in binary.
mkdir -p "$tmp/bin"
printf '#!/bin/sh\nexit 0\n' > "$tmp/bin/btd"
chmod +x "$tmp/bin/btd"
sed "s#/usr/local/bin/btd#$tmp/bin/btd#" "$unit" > "$tmp/btd.service"
echo "check-systemd: systemd-analyze verify"
if ! systemd-analyze verify "$tmp/btd.service" > "$tmp/verify.log" 2>&1; then
    cat "$tmp/verify.log"
    echo "check-systemd: FAIL (verify)"
    exit 1
fi
# Messages about other units on this host are not ours.
grep "btd.service" "$tmp/verify.log" || true
systemd-analyze security --offline=true --no-pager "$tmp/btd.service" > "$tmp/security.log" 2>&1 || true
score=$(sed -n 's/.*Overall exposure level for btd.service: \([0-9.]*\).*/\1/p' "$tmp/security.log")
if [ -z "$score" ]; then
    cat "$tmp/security.log"
    echo "check-systemd: FAIL (no exposure score)"
    exit 1
fi
echo "check-systemd: exposure $score (at most $max)"
if awk -v s="$score" -v m="$max" 'BEGIN { exit !(s > m) }'; then
    grep -E '^✗' "$tmp/security.log" | head -30
    echo "check-systemd: FAIL (exposure $score > $max)"
    exit 1
fi
echo "check-systemd: OK"
