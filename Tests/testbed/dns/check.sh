#!/bin/bash
# check.sh DIR -- verifies a running DNS test bed with dig: secure answers
# carry the AD flag, the insecure zone does not, the edited TLSA record of
# mxbogus is SERVFAIL (bogus), and a missing name is NXDOMAIN.
set -uo pipefail
dir=${1:?usage: check.sh DIR}
# shellcheck disable=SC1091
. "$dir/env"
fail=0
q() { dig +dnssec +tries=2 +time=2 -p "$DNS_PORT" "@$DNS_RESOLVER_ADDR" "$@" 2>&1; }
expect() {  # DESCRIPTION PATTERN dig-args...
    local what=$1 pattern=$2; shift 2
    local out; out=$(q "$@")
    if ! grep -Eq "$pattern" <<<"$out"; then
        echo "check.sh: $what: expected /$pattern/ from dig $*" >&2
        grep -E '^;; (->>HEADER|flags)' <<<"$out" >&2
        fail=1
    fi
}
expect "secure MX"        'flags:[^;]* ad[ ;]'      dane.test MX
expect "secure TLSA"      'flags:[^;]* ad[ ;]'      _25._tcp.mx1.dane.test TLSA
expect "secure A"         'status: NOERROR'          mx1.dane.test A
expect "bogus TLSA"       'status: SERVFAIL'         _25._tcp.mxbogus.dane.test TLSA
expect "secure NXDOMAIN"  'status: NXDOMAIN'         nosuchname.dane.test A
expect "insecure zone"    'status: NOERROR'          insecure.test MX
if q insecure.test MX | grep -Eq 'flags:[^;]* ad[ ;]'; then
    echo "check.sh: insecure.test answered with AD" >&2; fail=1
fi
[ $fail = 0 ] && echo "check.sh: DNS test bed at $DNS_RESOLVER ok" >&2
exit $fail
