#!/bin/bash
# start.sh DIR -- starts the DNS test bed: nsd (authoritative for dane.test,
# signed, and insecure.test, unsigned) and unbound (validating resolver with
# the dane.test KSK as trust anchor), both private instances whose
# configuration, pid files and logs live in DIR. Builds DIR with build.sh
# first if DIR/zones is missing.
#
# Addresses: nsd on $DNS_TESTBED_NSD_ADDR (default 127.0.0.10), unbound on
# $DNS_TESTBED_RESOLVER_ADDR (default 127.0.0.11), both on one port: 53 when
# root and free on both addresses, else a free high port ($DNS_TESTBED_PORT
# forces one). On success prints the resolver as "ADDR@PORT" (the syntax of
# unbound's forward-addr and ub_ctx_set_fwd) on stdout and writes DIR/env:
#   DNS_RESOLVER=127.0.0.11@PORT   DNS_RESOLVER_ADDR  DNS_PORT
#   DNS_AUTHORITY=127.0.0.10@PORT  DNS_TRUST_ANCHOR=DIR/trust-anchor.key
# Before returning it checks with dig that good answers carry AD and that the
# bogus TLSA record is SERVFAIL. Exit status 2: nsd, unbound, ldns or dig is
# not installed (tests skip); 1: failure (see DIR/*.log).
#
# If $DNS_TESTBED_WATCH_PID is set, a watchdog runs stop.sh DIR as soon as
# that process is gone, so that a crashed test run leaves no daemons behind.
# Stop with stop.sh DIR. Nothing here queries anything but loopback: every
# name outside the test zones is forwarded to nsd, which refuses it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:?usage: start.sh DIR}

for tool in nsd unbound ldns-keygen ldns-signzone dig openssl python3; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        echo "start.sh: $tool is not installed (apt-get install nsd unbound ldnsutils bind9-dnsutils)" >&2
        exit 2
    fi
done
export PATH=$PATH:/usr/sbin

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [ -f "$dir/nsd.pid" ] || [ -f "$dir/unbound.pid" ]; then
    "$here/stop.sh" "$dir" >/dev/null 2>&1 || true
fi
[ -d "$dir/zones" ] || "$here/build.sh" "$dir"

nsd_addr=${DNS_TESTBED_NSD_ADDR:-127.0.0.10}
res_addr=${DNS_TESTBED_RESOLVER_ADDR:-127.0.0.11}

free_port() {  # PREFERRED -> a port free for UDP and TCP on both addresses, or nothing
    python3 - "$nsd_addr" "$res_addr" "$1" <<'PY'
import socket, sys, random
addrs, preferred = sys.argv[1:3], int(sys.argv[3])
def free(port):
    socks = []
    try:
        for a in addrs:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                s = socket.socket(socket.AF_INET, kind)
                socks.append(s)
                s.bind((a, port))
        return True
    except OSError:
        return False
    finally:
        for s in socks: s.close()
candidates = ([preferred] if preferred else []) + [random.randint(20000, 60000) for _ in range(50)]
for p in candidates:
    if free(p):
        print(p); break
PY
}

write_configs() {  # PORT
    local port=$1
    cat > "$dir/nsd.conf" <<CONF
server:
    ip-address: $nsd_addr
    port: $port
    do-ip6: no
    username: ""
    chroot: ""
    database: ""
    zonesdir: "$dir/zones"
    pidfile: "$dir/nsd.pid.daemon"
    logfile: "$dir/nsd.log"
    xfrdfile: "$dir/nsd.xfrd.state"
    zonelistfile: "$dir/nsd.zone.list"
    xfrdir: "$dir"
    server-count: 1
    verbosity: 1
    hide-version: yes
remote-control:
    control-enable: no
zone:
    name: "dane.test"
    zonefile: "$dir/zones/dane.test.zone.signed"
zone:
    name: "insecure.test"
    zonefile: "$dir/zones/insecure.test.zone"
CONF
    cat > "$dir/unbound.conf" <<CONF
server:
    interface: $res_addr
    port: $port
    do-ip6: no
    access-control: 127.0.0.0/8 allow
    username: ""
    chroot: ""
    directory: "$dir"
    pidfile: "$dir/unbound.pid.daemon"
    logfile: "$dir/unbound.log"
    use-syslog: no
    do-daemonize: no
    num-threads: 1
    verbosity: 1
    val-log-level: 2
    log-servfail: yes
    module-config: "validator iterator"
    trust-anchor-file: "$dir/trust-anchor.key"
    domain-insecure: "insecure.test"
    # test. is an RFC 6761 name unbound answers locally by default.
    local-zone: "test." nodefault
    do-not-query-localhost: no
    qname-minimisation: no
remote-control:
    control-enable: no
stub-zone:
    name: "dane.test"
    stub-addr: $nsd_addr@$port
stub-zone:
    name: "insecure.test"
    stub-addr: $nsd_addr@$port
# Everything else goes to nsd too (which refuses it): no query leaves loopback.
forward-zone:
    name: "."
    forward-addr: $nsd_addr@$port
CONF
}

wait_for() {  # PID SERVER-ADDR PORT QNAME -> 0 once SERVER answers, 1 if PID died or 10 s passed
    local pid=$1 addr=$2 port=$3 name=$4
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 1
        if dig +tries=1 +time=1 -p "$port" "@$addr" "$name" SOA 2>/dev/null | grep -q 'status: NOERROR'; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

preferred=${DNS_TESTBED_PORT:-}
if [ -z "$preferred" ] && [ "$(id -u)" = 0 ]; then preferred=53; fi
started=
for attempt in 1 2 3 4 5; do
    port=$(free_port "${preferred:-0}")
    preferred=
    [ -n "$port" ] || continue
    write_configs "$port"
    nsd-checkconf "$dir/nsd.conf" >&2 || exit 1
    unbound-checkconf "$dir/unbound.conf" >/dev/null || { unbound-checkconf "$dir/unbound.conf" >&2; exit 1; }
    setsid nsd -d -c "$dir/nsd.conf" </dev/null >>"$dir/nsd.log" 2>&1 &
    nsd_pid=$!
    echo "$nsd_pid" > "$dir/nsd.pid"
    if ! wait_for "$nsd_pid" "$nsd_addr" "$port" dane.test; then
        kill "$nsd_pid" 2>/dev/null || true; rm -f "$dir/nsd.pid"; continue
    fi
    setsid unbound -d -c "$dir/unbound.conf" </dev/null >>"$dir/unbound.log" 2>&1 &
    unbound_pid=$!
    echo "$unbound_pid" > "$dir/unbound.pid"
    if ! wait_for "$unbound_pid" "$res_addr" "$port" dane.test; then
        kill "$unbound_pid" "$nsd_pid" 2>/dev/null || true
        rm -f "$dir/nsd.pid" "$dir/unbound.pid"; continue
    fi
    started=1; break
done
if [ -z "$started" ]; then
    echo "start.sh: could not start nsd and unbound (see $dir/nsd.log, $dir/unbound.log)" >&2
    exit 1
fi

cat > "$dir/env" <<ENV
DNS_RESOLVER=$res_addr@$port
DNS_RESOLVER_ADDR=$res_addr
DNS_PORT=$port
DNS_AUTHORITY=$nsd_addr@$port
DNS_TRUST_ANCHOR=$dir/trust-anchor.key
ENV

if [ -n "${DNS_TESTBED_WATCH_PID:-}" ]; then
    # A zombie still answers kill -0: look at its state too.
    setsid bash -c 'while kill -0 "$1" 2>/dev/null && [[ "$(ps -o stat= -p "$1")" != Z* ]]; do sleep 1; done; exec "$2" "$3"' \
        watchdog "$DNS_TESTBED_WATCH_PID" "$here/stop.sh" "$dir" </dev/null >/dev/null 2>&1 &
    echo $! > "$dir/watchdog.pid"
fi

if ! "$here/check.sh" "$dir" >&2; then
    "$here/stop.sh" "$dir" >/dev/null 2>&1 || true
    exit 1
fi
echo "$res_addr@$port"
