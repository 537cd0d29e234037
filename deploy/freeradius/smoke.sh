#!/bin/sh
# The FreeRADIUS deploy README, followed literally on a copy of Debian's stock tree.
#
# usage: smoke.sh WORKDIR
# env:   REPLAYGUARD_URL, REPLAYGUARD_TOKEN (role callout), ADMIN_TOKEN (role admin),
#        optional SMOKE_USER, STOCK_RADDB (default /etc/freeradius/3.0)
#
# Copies the stock tree to WORKDIR/raddb, changes only its raddbdir (so the copy reads
# itself), runs the README's smoke:install and smoke:client blocks with RADDB set to the
# copy, starts `freeradius -f -d COPY` with a bogus http_proxy in its environment (which
# the installed ENV lines must delete), and runs the smoke:test block. Exit 0 only when
# the README's radclient test passed. Needs root (the copy keeps Debian's freerad group).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${1:?usage: smoke.sh WORKDIR}
STOCK=${STOCK_RADDB:-/etc/freeradius/3.0}
: "${REPLAYGUARD_URL:?}" "${REPLAYGUARD_TOKEN:?}" "${ADMIN_TOKEN:?}"

RADDB="$WORK/raddb"
export RADDB
mkdir -p "$WORK"
cp -a "$STOCK" "$RADDB"
sed -i "s|^raddbdir = .*|raddbdir = $RADDB|" "$RADDB/radiusd.conf"

# The sh block after the line "<!-- smoke:NAME -->" of the README.
block() {
    awk -v tag="<!-- smoke:$1 -->" '
        $0 == tag { want = 1; next }
        want && $0 == "```sh" { inside = 1; next }
        inside && $0 == "```" { exit }
        inside { print }' "$HERE/README.md"
}

cd "$HERE"
for name in install client; do
    block "$name" > "$WORK/$name.sh"
    test -s "$WORK/$name.sh" || { echo "smoke.sh: no smoke:$name block in README.md" >&2; exit 1; }
    sh -eu "$WORK/$name.sh"
done

http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9 \
    freeradius -f -l stdout -d "$RADDB" > "$WORK/radiusd.log" 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true' EXIT INT TERM

tries=0
until grep -qs "Ready to process requests" "$WORK/radiusd.log"; do
    if ! kill -0 "$PID" 2>/dev/null || [ "$tries" -ge 300 ]; then
        echo "smoke.sh: freeradius did not start:" >&2; cat "$WORK/radiusd.log" >&2; exit 1
    fi
    tries=$((tries + 1)); sleep 0.1
done

block test > "$WORK/test.sh"
test -s "$WORK/test.sh" || { echo "smoke.sh: no smoke:test block in README.md" >&2; exit 1; }
if ! sh -eu "$WORK/test.sh"; then
    echo "smoke.sh: the README's smoke test failed; radiusd said:" >&2; cat "$WORK/radiusd.log" >&2; exit 1
fi
echo "smoke.sh: ok"
