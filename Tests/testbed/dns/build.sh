#!/bin/bash
# build.sh DIR -- builds the DNS test bed's data in DIR (no daemons started):
#
#   DIR/certs/   test certificates, made here unless DIR/certs/ already has them:
#                ee.pem/ee.key    self-signed end-entity, CN "wrong-name.example"
#                                 (deliberately not an MX name: DANE-EE 3 1 1)
#                ca.pem/ca.key    test CA (DANE-TA 2 1 1)
#                mx2.pem/mx2.key  leaf for mx2.dane.test issued by the CA
#                mx2-chain.pem    mx2.pem followed by ca.pem (what the MX serves)
#   DIR/keys/    KSK and ZSK of dane.test (ECDSAP256SHA256, ldns-keygen)
#   DIR/trust-anchor.key   the KSK's DNSKEY: the trust anchor for dane.test
#   DIR/zones/   dane.test.zone(.signed), insecure.test.zone
#
# dane.test is DNSSEC-signed; after signing, the TLSA rdata of
# _25._tcp.mxbogus is replaced (with the hash that would match ee.pem), so
# its signature no longer verifies: a validating resolver answers SERVFAIL
# (bogus). insecure.test is unsigned and declared insecure in the resolver.
#
# Extra records: if DIR/extra-dane.test.zone or DIR/extra-insecure.test.zone
# exists, its lines are appended to that zone before signing (relative
# names, $ORIGIN is the zone) -- later test beds (MTA-STS, DANE) add theirs.
set -euo pipefail
umask 022

dir=${1:?usage: build.sh DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
mkdir -p "$dir/certs" "$dir/keys" "$dir/zones"

spki_sha256() {  # certificate file -> hex SHA-256 of its SubjectPublicKeyInfo
    openssl x509 -in "$1" -noout -pubkey |
        openssl pkey -pubin -outform DER |
        openssl dgst -sha256 -r | cut -d' ' -f1
}

# --- certificates -----------------------------------------------------------
c=$dir/certs
if [ ! -f "$c/ee.pem" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$c/ee.key" -out "$c/ee.pem" -days 3650 \
        -subj "/CN=wrong-name.example" 2>/dev/null
fi
if [ ! -f "$c/ca.pem" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$c/ca.key" -out "$c/ca.pem" -days 3650 \
        -subj "/CN=Sealpost Test CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
if [ ! -f "$c/mx2.pem" ]; then
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$c/mx2.key" -out "$c/mx2.csr" -subj "/CN=mx2.dane.test" 2>/dev/null
    printf 'subjectAltName=DNS:mx2.dane.test\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$c/mx2.ext"
    openssl x509 -req -in "$c/mx2.csr" -CA "$c/ca.pem" -CAkey "$c/ca.key" \
        -CAcreateserial -out "$c/mx2.pem" -days 3650 -extfile "$c/mx2.ext" 2>/dev/null
    cat "$c/mx2.pem" "$c/ca.pem" > "$c/mx2-chain.pem"
fi
ee_hash=$(spki_sha256 "$c/ee.pem")
ca_hash=$(spki_sha256 "$c/ca.pem")
# A well-formed hash that matches nothing, and the one signed for mxbogus
# before the edit.
bad_hash=$(printf 'sealpost-no-such-key' | openssl dgst -sha256 -r | cut -d' ' -f1)
bogus_signed_hash=$(printf 'sealpost-bogus' | openssl dgst -sha256 -r | cut -d' ' -f1)

# --- zones ------------------------------------------------------------------
z=$dir/zones
cat > "$z/dane.test.zone" <<ZONE
\$ORIGIN dane.test.
\$TTL 3600
@           SOA   ns.dane.test. hostmaster.dane.test. 1 3600 600 86400 300
@           NS    ns
ns          A     127.0.0.10
@           MX    10 mx1
@           MX    20 mx2
mx1         A     127.0.0.21
_25._tcp.mx1 TLSA 3 1 1 $ee_hash
mx2         A     127.0.0.22
_25._tcp.mx2 TLSA 2 1 1 $ca_hash
mxbad       A     127.0.0.23
_25._tcp.mxbad TLSA 3 1 1 $bad_hash
mxbogus     A     127.0.0.24
_25._tcp.mxbogus TLSA 3 1 1 $bogus_signed_hash
; domains whose MX is one of the hosts above
bad         MX    10 mxbad
bogus       MX    10 mxbogus
; RFC 7505 null MX
nullmx      MX    0 .
; no MX: implicit MX from the address records (RFC 5321 5.1)
implicit    A     127.0.0.26
implicit    AAAA  ::1
; an MX target that is a CNAME (not allowed by RFC 2181 10.3, tolerated)
alias       CNAME mx1
viacname    MX    10 alias
; a host with both address families (documentation prefix: never reached)
dual        A     127.0.0.27
dual        AAAA  2001:db8::27
; an MX whose target has no address at all
noaddr      MX    10 nowhere
; MTA-STS (RFC 8461): TXT split in two character-strings
_mta-sts    TXT   "v=STSv1; " "id=20240501T000000;"
mta-sts     A     127.0.0.25
_smtp._tls  TXT   "v=TLSRPTv1; rua=mailto:tlsrpt@dane.test"
ZONE
# A domain with more MX hosts than a resolution looks up (25 > 20), each
# with an address.
for i in $(seq 1 25); do
    printf 'many        MX    10 m%d.many\nm%d.many      A     127.0.1.%d\n' "$i" "$i" "$i"
done >> "$z/dane.test.zone"
if [ -f "$dir/extra-dane.test.zone" ]; then cat "$dir/extra-dane.test.zone" >> "$z/dane.test.zone"; fi

cat > "$z/insecure.test.zone" <<ZONE
\$ORIGIN insecure.test.
\$TTL 3600
@           SOA   ns.dane.test. hostmaster.dane.test. 1 3600 600 86400 300
@           NS    ns.dane.test.
@           MX    10 mx
mx          A     127.0.0.31
_25._tcp.mx TLSA  3 1 1 $ee_hash
_mta-sts    TXT   "v=STSv1; id=insecure1;"
ZONE
if [ -f "$dir/extra-insecure.test.zone" ]; then cat "$dir/extra-insecure.test.zone" >> "$z/insecure.test.zone"; fi

# --- keys and signing -------------------------------------------------------
k=$dir/keys
if ! ls "$k"/Kdane.test.+013+*.key >/dev/null 2>&1; then
    (cd "$k" && ksk=$(ldns-keygen -a ECDSAP256SHA256 -k dane.test) &&
        zsk=$(ldns-keygen -a ECDSAP256SHA256 dane.test) &&
        echo "$ksk" > ksk.name && echo "$zsk" > zsk.name)
fi
ksk=$(cat "$k/ksk.name"); zsk=$(cat "$k/zsk.name")
cp "$k/$ksk.key" "$dir/trust-anchor.key"
cp "$k/$ksk.ds" "$dir/trust-anchor.ds"

# Inception a day back so that clock skew never makes the signatures "not yet valid".
inception=$(date -u -d '1 day ago' +%Y%m%d%H%M%S)
expiration=$(date -u -d '30 days' +%Y%m%d%H%M%S)
ldns-signzone -i "$inception" -e "$expiration" -f "$z/dane.test.zone.signed" \
    "$z/dane.test.zone" "$k/$ksk" "$k/$zsk"

# Break mxbogus: swap the signed TLSA rdata for the hash that would match ee.pem.
python3 - "$z/dane.test.zone.signed" "$bogus_signed_hash" "$ee_hash" <<'PY'
import sys
path, old, new = sys.argv[1:]
lines = open(path).read().split("\n")
hits = 0
for i, line in enumerate(lines):
    f = line.split()
    if len(f) >= 5 and f[0] == "_25._tcp.mxbogus.dane.test." and f[3] == "TLSA":
        if old not in line:
            sys.exit("mxbogus TLSA does not hold the signed hash: " + line)
        lines[i] = line.replace(old, new)
        hits += 1
if hits != 1:
    sys.exit("expected one mxbogus TLSA record, found %d" % hits)
open(path, "w").write("\n".join(lines))
PY
echo "$ee_hash" > "$dir/ee.spki-sha256"
echo "$ca_hash" > "$dir/ca.spki-sha256"
