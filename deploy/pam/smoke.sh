#!/bin/sh
# The PAM deploy README, followed literally: its install block under sh, then its
# pamtester check. Installs into the real paths (/usr/local/lib/replayguard,
# /etc/replayguard, /var/lib/replayguard, /etc/pam.d/replayguard): run it in a throwaway
# guest or test machine, as root.
#
# env: REPLAYGUARD_URL, VM_ID, CALLOUT_TOKEN (the install block's inputs), OTP_USER and
#      CODE (a fresh code of an enrolled user, for the pamtester check)
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
: "${OTP_USER:?}" "${CODE:?}"

# The sh block after the line "<!-- smoke:NAME -->" of the README.
block() {
    awk -v tag="<!-- smoke:$1 -->" '
        $0 == tag { want = 1; next }
        want && $0 == "```sh" { inside = 1; next }
        inside && $0 == "```" { exit }
        inside { print }' "$HERE/README.md"
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT INT TERM
cd "$HERE"
for name in install test; do
    block "$name" > "$WORK/$name.sh"
    test -s "$WORK/$name.sh" || { echo "smoke.sh: no smoke:$name block in README.md" >&2; exit 1; }
    sh -eu "$WORK/$name.sh"
done
echo "smoke.sh: ok"
