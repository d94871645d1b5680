# shellcheck shell=bash
# Shared by Pipeline/start, stop, status and test; sourced, not run.
# Expects $checkout (the repository's top directory).
: "${checkout:?}"

# Debian packages the build needs (the C libraries and pkg-config), and
# openssl for the self-signed certificates of the first start.
# shellcheck disable=SC2034 # used by the scripts that source this file
build_packages="libssl-dev libsodium-dev liblmdb-dev libunbound-dev libcurl4-openssl-dev libevent-dev pkg-config openssl"

say() { printf '%s\n' "$*"; }
die() { printf '%s: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# Puts swift on PATH (from PATH or /opt/swift), or explains how to get it.
find_swift() {
    if command -v swift >/dev/null 2>&1; then return 0; fi
    if [ -x /opt/swift/usr/bin/swift ]; then
        PATH=/opt/swift/usr/bin:$PATH
        export PATH
        return 0
    fi
    cat >&2 <<'MSG'
Swift is not installed (neither on PATH nor in /opt/swift).
Sealpost needs Swift 6.3 or newer. On Debian 12:
  1. download the Debian 12 toolchain from https://www.swift.org/install/linux/
     (swift-6.3.1-RELEASE-debian12.tar.gz for x86_64),
  2. unpack it so that /opt/swift/usr/bin/swift exists:
       sudo mkdir -p /opt/swift && sudo tar -xzf swift-*.tar.gz -C /opt/swift --strip-components=1
  3. run this command again.
MSG
    exit 1
}

# Crash backtraces for the stages. The Swift runtime looks for its
# backtracer (swift-backtrace) next to libswiftCore.so; the stages link the
# runtime statically (Package.swift), so it would find none and a crashing
# stage would die without a word. Unless SWIFT_BACKTRACE is set already,
# name the toolchain's backtracer (its static build, which needs no Swift
# library); the supervisor passes SWIFT_BACKTRACE* on to every stage.
find_backtracer() {
    [ -z "${SWIFT_BACKTRACE:-}" ] || return 0
    swift_path=$(command -v swift) || return 0
    libexec="$(dirname "$(dirname "$(readlink -f "$swift_path")")")/libexec/swift/linux"
    for backtracer in "$libexec/swift-backtrace-static" "$libexec/swift-backtrace"; do
        if [ -x "$backtracer" ]; then
            SWIFT_BACKTRACE="swift-backtrace=$backtracer"
            export SWIFT_BACKTRACE
            return 0
        fi
    done
}

# The packages of "$@" that are not installed.
missing_packages() {
    missing=""
    for package in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
            missing="$missing $package"
        fi
    done
    printf '%s' "${missing# }"
}

# Installs the missing packages of "$@" as root; as another user prints the
# command to run and exits 1. apt-get update runs at most once per script.
apt_updated=0
ensure_packages() {
    missing=$(missing_packages "$@")
    [ -n "$missing" ] || return 0
    if [ "$(id -u)" -ne 0 ]; then
        say "Missing Debian packages: $missing" >&2
        say "Install them with:" >&2
        say "  sudo apt-get install -y $missing" >&2
        exit 1
    fi
    say "installing: $missing"
    if [ "$apt_updated" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    # Postfix (tests and bench only) must not configure or start a system
    # instance: the tests run private instances of their own.
    case " $missing " in
        *" postfix "*)
            printf 'postfix postfix/main_mailer_type select No configuration\n' | debconf-set-selections
            ;;
    esac
    # shellcheck disable=SC2086 # word splitting of the list is wanted
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# swift build -c release, quiet unless it fails; then the sendmail link.
build_release() {
    build_log=$(mktemp "${TMPDIR:-/tmp}/sealpost-build.XXXXXX")
    say "building Sealpost (swift build -c release)..."
    if ! (cd "$checkout" && swift build -c release -j 2) >"$build_log" 2>&1; then
        tail -n 60 "$build_log" >&2
        rm -f "$build_log"
        die "the build failed (the last lines are above)"
    fi
    rm -f "$build_log"
    ln -sfn queue-inject "$checkout/.build/release/sendmail"
}

# Reads the paths supervise derives from the configuration (SEALPOST_CONFIG
# honoured) into shell variables: config, data_directory, inject_socket,
# log_file, pid_file, status_file, ... Exits with the configuration error.
# shellcheck disable=SC2034 # the variables are for the scripts that source this file
load_paths() {
    supervise="$checkout/.build/release/supervise"
    [ -x "$supervise" ] || die "not built yet: run Pipeline/start"
    paths=$("$supervise" --paths) || exit 1
    while IFS='=' read -r key value; do
        case $key in
            config) config=$value ;;
            data_directory) data_directory=$value ;;
            runtime_directory) runtime_directory=$value ;;
            inject_socket) inject_socket=$value ;;
            control_socket) control_socket=$value ;;
            log_file) log_file=$value ;;
            pid_file) pid_file=$value ;;
            status_file) status_file=$value ;;
            mail_directory) mail_directory=$value ;;
            mailbox) mailbox=$value ;;
            hostname) hostname=$value ;;
        esac
    done <<EOF2
$paths
EOF2
}

# Creates in directory $1, when missing, the self-signed certificates the
# default [tls] configuration names, for host name $2: ECDSA P-256 and RSA
# 2048 side by side (self-signed-ecdsa.crt/.key, self-signed-rsa.crt/.key),
# valid ten years. A new installation thus offers STARTTLS from its first
# start; replace them with CA-signed ones, or publish TLSA records (DANE).
# The keys are created 0600; the supervisor gives the files of tls/ to
# crypto-negotiate's user when it runs as root.
ensure_self_signed_certificates() {
    tls_directory=$1
    tls_host=$2
    mkdir -p "$tls_directory"
    chmod 0755 "$tls_directory"
    for tls_kind in ecdsa rsa; do
        tls_cert="$tls_directory/self-signed-$tls_kind.crt"
        tls_key="$tls_directory/self-signed-$tls_kind.key"
        if [ -s "$tls_cert" ] && [ -s "$tls_key" ]; then continue; fi
        case $tls_kind in
            ecdsa) set -- -newkey ec -pkeyopt ec_paramgen_curve:P-256 -addext "keyUsage=critical,digitalSignature" ;;
            rsa) set -- -newkey rsa:2048 -addext "keyUsage=critical,digitalSignature,keyEncipherment" ;;
        esac
        if ! (umask 077 && openssl req -x509 "$@" -nodes -sha256 -days 3650 -subj "/CN=$tls_host" \
            -addext "subjectAltName=DNS:$tls_host" -addext "basicConstraints=critical,CA:FALSE" \
            -addext "extendedKeyUsage=serverAuth" \
            -keyout "$tls_key.new" -out "$tls_cert.new") >/dev/null 2>&1; then
            rm -f "$tls_key.new" "$tls_cert.new"
            die "openssl could not create a self-signed certificate in $tls_directory"
        fi
        chmod 0644 "$tls_cert.new"
        mv -f "$tls_key.new" "$tls_key"
        mv -f "$tls_cert.new" "$tls_cert"
        say "created a self-signed $tls_kind certificate for $tls_host: $tls_cert"
    done
}

# The supervisor's pid if it runs, else nothing.
supervisor_pid() {
    [ -f "$pid_file" ] || return 0
    pid=$(cat "$pid_file" 2>/dev/null || true)
    case $pid in '' | *[!0-9]*) return 0 ;; esac
    if kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = supervise ]; then
        printf '%s' "$pid"
    fi
}
